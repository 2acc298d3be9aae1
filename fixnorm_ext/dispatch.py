"""One functional entry point, :func:`fixnorm_step`, and the backend table.

Every backend implements the same step (DESIGN.md section 2) behind the same
keyword-only signature. Availability is decided once, when this module is
imported, and a missing backend always comes with the reason it is missing.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from fixnorm_ext import reference

log = logging.getLogger("fixnorm_ext")

try:
    importlib.import_module("fixnorm_ext._C")  # loading it registers the torch.ops.fixnorm_ext ops

    EXTENSION_ERROR: Optional[str] = None

    @torch.library.register_fake("fixnorm_ext::fixnorm_step")
    def _fixnorm_step_fake(params, grads, momentum_buffers, hparams, meta, targets, plan, grad_scale=None,
                           found_inf=None, sums=None):
        # In-place on its inputs and returns nothing: no output shapes to describe.
        return None
except ImportError as exc:  # the package still works without its compiled part
    EXTENSION_ERROR = (
        f"the compiled extension fixnorm_ext._C could not be imported ({exc}); "
        "build it with `pip install --no-build-isolation -e .`"
    )

NORM_MODES = reference.NORM_MODES
MODE_CODE = {None: 0, "fixed": 1, "max": 2}  # NormMode of csrc/fixnorm_meta.h
BACKENDS = ("auto", "reference", "foreach", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class GroupHyper:
    """The hyperparameters of one parameter group as the kernels see them.
    ``lr`` is a number, or (for every backend but 'reference') a one-element
    tensor, left on its device: on a GPU it is read there, and while
    torch.compile traces the step, in the graph."""

    lr: Union[float, torch.Tensor]
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    norm: Optional[str]
    norm_dim: Optional[int]


def available_backends(device: str = "cpu") -> dict[str, Optional[str]]:
    """Map each concrete backend to ``None`` if it can run on ``device`` type,
    else to the reason it cannot."""
    device = torch.device(device).type
    out: dict[str, Optional[str]] = {"reference": None, "foreach": None}
    if EXTENSION_ERROR is not None:
        out["cpu"] = EXTENSION_ERROR
    elif device != "cpu":
        out["cpu"] = f"the 'cpu' backend runs on CPU tensors, not {device}"
    else:
        out["cpu"] = None
    out["cuda"] = _cuda_unavailable(device)
    out["triton"] = _triton_unavailable(device)
    return out


def _cuda_unavailable(device: str) -> Optional[str]:
    """Why the 'cuda' backend cannot run on ``device`` type, or ``None``."""
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not getattr(importlib.import_module("fixnorm_ext._C"), "WITH_CUDA", False):
        return ("the compiled extension was built without its CUDA kernel (torch without CUDA, or no nvcc at "
                "build time; FIXNORM_BUILD_CUDA=1 makes the build fail instead of leaving it out)")
    if device != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors, not {device}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


_TRITON_BACKEND = None  # fixnorm_ext.triton_backend once imported


def _triton_backend():
    """fixnorm_ext.triton_backend, imported only when asked (it may import
    Triton). Choosing the backend imports it, so a step traced by torch.compile
    finds it here and never traces an import."""
    global _TRITON_BACKEND
    if _TRITON_BACKEND is None:
        _TRITON_BACKEND = importlib.import_module("fixnorm_ext.triton_backend")
    return _TRITON_BACKEND


def _triton_unavailable(device: str) -> Optional[str]:
    """Why the 'triton' backend cannot run on ``device`` type, or ``None``."""
    return _triton_backend().unavailable(device)


def resolve_backend(requested: str, device_types: set[str]) -> tuple[str, str]:
    """Return ``(backend, why)`` for parameters on ``device_types``.

    An explicit backend that cannot run raises ``RuntimeError`` naming the
    reason; only ``"auto"`` falls back, and ``why`` says what it chose.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested != "auto":
        for dev in sorted(device_types):
            reason = available_backends(dev)[requested]
            if reason is not None:
                raise RuntimeError(f"backend {requested!r} is unavailable: {reason}")
        return requested, f"backend {requested!r} was requested"
    if device_types <= {"cpu"} and EXTENSION_ERROR is None:
        return "cpu", "auto chose 'cpu': the fused C++ kernel, for parameters on the CPU"
    if device_types == {"cuda"} and _cuda_unavailable("cuda") is None:
        return "cuda", "auto chose 'cuda': the fused CUDA kernel, for parameters on the GPU"
    # Triton only on the GPU: on CPU tensors it runs in its (slow) interpreter.
    if device_types == {"cuda"} and _triton_unavailable("cuda") is None:
        return "triton", f"auto chose 'triton': the fused Triton kernels, because {_cuda_unavailable('cuda')}"
    if EXTENSION_ERROR is not None and device_types <= {"cpu"}:
        why = f"auto chose 'foreach' because {EXTENSION_ERROR}"
    elif device_types == {"cuda"}:
        why = (f"auto chose 'foreach' because {_cuda_unavailable('cuda')} (cuda) and "
               f"{_triton_unavailable('cuda')} (triton)")
    else:
        why = f"auto chose 'foreach': no fused kernel for parameters on several device types {sorted(device_types)}"
    return "foreach", why


def _target_tensor(t) -> Optional[torch.Tensor]:
    """A target given as a number (a group's explicit target_norm) as a float64 tensor."""
    return torch.tensor(t, dtype=torch.float64) if isinstance(t, float) else t


def _segments(p: torch.Tensor, norm_dim: Optional[int]) -> int:
    return p.shape[0] if norm_dim == 0 and p.dim() > 0 else 1


def _skip(found_inf: Optional[torch.Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item())


def _step_reference(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, workspace):
    if _skip(found_inf):
        return list(bufs)
    scale = None if grad_scale is None else float(grad_scale)
    out = []
    for p, g, buf, gi, t in zip(params, grads, bufs, group_index, targets):
        h = groups[gi]
        out.append(reference.fixnorm_step_one(
            p, g, buf, lr=h.lr, momentum=h.momentum, dampening=h.dampening,
            weight_decay=h.weight_decay, nesterov=h.nesterov, maximize=h.maximize,
            norm=h.norm, target=_target_tensor(t), norm_dim=h.norm_dim, grad_scale=scale))
    return out


NORM_BLOCK = 1024  # elements per float32 partial sum in the foreach backend's norms


def _blocked_norm(p: torch.Tensor) -> torch.Tensor:
    """||p|| (float64): float32 norms of blocks of NORM_BLOCK elements, their
    squares and the tail's added in float64."""
    flat = p.reshape(-1)
    whole = flat.numel() // NORM_BLOCK * NORM_BLOCK
    blocks = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_BLOCK), dim=1).double()
    return (blocks.square().sum() + flat[whole:].double().square().sum()).sqrt()


def _renorm_foreach(ps: list[torch.Tensor], ts: list[torch.Tensor], mode: str, norm_dim: Optional[int]) -> None:
    """Rescale ``ps`` in place: one ``_foreach_norm`` for whole-tensor norms,
    a per-tensor row norm for ``norm_dim=0``. Whole-tensor norms are summed as
    the C++ kernel sums them, in float32 within blocks and in float64 across
    blocks (:func:`_blocked_norm`): a float32 sum over a few hundred thousand
    elements is off by ~1e-6 relative, re-imposed every step, and a float64
    sum of every element costs 3x the time of the float32 one."""
    if norm_dim is None:
        norms = [_blocked_norm(p) for p in ps]
    else:
        norms = [torch.linalg.vector_norm(p.reshape(p.shape[0], math.prod(p.shape[1:])) if p.dim() else p, dim=-1,
                                          dtype=torch.float64)
                 for p in ps]
    factors = []
    for p, n, t in zip(ps, norms, ts):
        n = n.to(torch.float64)
        f = t / n if mode == "fixed" else torch.clamp(t / n, max=1.0)
        f = torch.where(n == 0, torch.ones_like(f), f).to(p.dtype)
        factors.append(f.reshape(f.shape + (1,) * (p.dim() - f.dim())))
    torch._foreach_mul_(ps, factors)


def _step_foreach(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, workspace):
    """torch ``_foreach_*`` ops, one group at a time; low precision is computed
    on float32 copies and rounded once, like the fused kernels."""
    if _skip(found_inf):
        return list(bufs)
    out = list(bufs)
    by_group: dict[int, list[int]] = {}
    for i, gi in enumerate(group_index):
        by_group.setdefault(gi, []).append(i)
    for gi, idx in by_group.items():
        h = groups[gi]
        low = [params[i].dtype in (torch.float16, torch.bfloat16) for i in idx]
        ps = [params[i].float() if lo else params[i] for i, lo in zip(idx, low)]
        gs = [grads[i].to(ps[k].dtype) for k, i in enumerate(idx)]
        if grad_scale is not None:
            gs = torch._foreach_div(gs, grad_scale.to(torch.float64).item())
        if h.maximize:
            gs = torch._foreach_neg(gs)
        if h.weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=h.weight_decay)
        if h.momentum != 0:
            old = [k for k, i in enumerate(idx) if bufs[i] is not None]
            fresh = [k for k, i in enumerate(idx) if bufs[i] is None]
            bs: list = [None] * len(idx)
            for k in fresh:
                bs[k] = gs[k].clone()
            if old:
                run = [bufs[idx[k]].to(ps[k].dtype) for k in old]
                torch._foreach_mul_(run, h.momentum)
                torch._foreach_add_(run, [gs[k] for k in old], alpha=1 - h.dampening)
                for k, b in zip(old, run):
                    bs[k] = b
            d = torch._foreach_add(gs, bs, alpha=h.momentum) if h.nesterov else bs
            for k, i in enumerate(idx):
                if bufs[i] is None:
                    out[i] = bs[k].to(params[i].dtype)
                elif bs[k] is not bufs[i]:
                    bufs[i].copy_(bs[k])
        else:
            d = gs
        if isinstance(h.lr, torch.Tensor):  # as SGD's foreach path does with a tensor lr
            torch._foreach_add_(ps, torch._foreach_mul(d, -h.lr.to(ps[0].device)))
        else:
            torch._foreach_add_(ps, d, alpha=-h.lr)
        if h.norm is not None:
            _renorm_foreach(ps, [_target_tensor(targets[i]) for i in idx], h.norm, h.norm_dim)
        for k, i in enumerate(idx):
            if low[k]:
                params[i].copy_(ps[k])
    return out


def build_hparams(groups) -> torch.Tensor:
    """The hparams table of csrc/fixnorm_meta.h (rebuilt every step: lr moves)."""
    return torch.tensor(
        [[h.lr, h.momentum, h.dampening, h.weight_decay, float(h.nesterov), float(h.maximize)] for h in groups],
        dtype=torch.float64).reshape(len(groups), 6)


def build_meta(params, bufs, *, group_index, groups) -> torch.Tensor:
    """The meta table of csrc/fixnorm_meta.h. ``bufs[i]`` is ``None`` for a
    buffer the kernel must create from the gradient; every tensor of a group
    with momentum gets the next buffer slot, every segment with norm control
    the next target."""
    rows = meta_rows(params, bufs, group_index=group_index, groups=groups)
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 6)


def meta_rows(params, bufs, *, group_index, groups) -> list[tuple[int, ...]]:
    """The rows of :func:`build_meta`'s table as Python numbers (what the
    host-side planning reads: no tensor values, so torch.compile can trace it)."""
    rows, offset, slot = [], 0, 0
    for p, buf, gi in zip(params, bufs, group_index):
        h = groups[gi]
        init = int(h.momentum != 0 and buf is None)
        buffer = slot if h.momentum != 0 else -1
        slot += h.momentum != 0
        if h.norm is None:
            rows.append((gi, 0, -1, init, -1, buffer))
            continue
        rows.append((gi, MODE_CODE[h.norm], 0 if h.norm_dim == 0 else -1, init, offset, buffer))
        offset += _segments(p, h.norm_dim)
    return rows


def flat_targets(params, *, group_index, groups, targets, device=None) -> torch.Tensor:
    """The targets table of csrc/fixnorm_meta.h (float64, one value per
    segment with norm control, in meta's order), built on ``device`` (default:
    the CPU) without reading device values on the host."""
    device = torch.device("cpu") if device is None else device
    parts = [_segment_targets(t, _segments(p, groups[gi].norm_dim), device)
             for p, gi, t in zip(params, group_index, targets) if groups[gi].norm is not None]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


def _segment_targets(target, segs: int, device) -> torch.Tensor:
    """One tensor's target per segment (float64 on ``device``), from a number
    or a tensor of one value or one per segment."""
    if isinstance(target, float):
        return torch.full((segs,), target, dtype=torch.float64, device=device)
    target = target.detach().to(device=device, dtype=torch.float64).reshape(-1)
    return target.expand(segs) if target.numel() == 1 else target


def build_tables(params, bufs, *, group_index, groups, targets):
    """The meta and targets tables of csrc/fixnorm_meta.h, on the CPU."""
    return (build_meta(params, bufs, group_index=group_index, groups=groups),
            flat_targets(params, group_index=group_index, groups=groups, targets=targets))


def _targets_key(targets) -> Optional[tuple]:
    """The part of a table's cache key that the targets make: recorded
    targets enter by identity and version counter, so replacing one or
    editing it in place both rebuild the table. ``None`` while torch.compile
    traces the step: a version counter is not a value it can guard on, so the
    traced step builds the table from the live targets every time (no cache)."""
    if torch.compiler.is_compiling():
        return None
    return tuple(t if t is None or isinstance(t, float) else (id(t), t._version) for t in targets)


def _layout_key(params, bufs, group_index, groups, targets) -> Optional[tuple]:
    """What the meta / targets tables depend on (``None``: do not cache, see
    :func:`_targets_key`)."""
    targets_key = _targets_key(targets)
    if targets_key is None:
        return None
    return (
        tuple(id(p) for p in params), tuple(group_index), tuple(b is None for b in bufs),
        tuple((h.norm, h.norm_dim, h.momentum != 0) for h in groups), targets_key,
    )


def _dense(p: torch.Tensor) -> bool:
    """Whether ``p``'s elements fill one block of memory without gaps or
    overlaps, in any order of dimensions (contiguous, channels_last, transposed)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(p.shape, p.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _walks_flat(p: torch.Tensor, norm_dim: Optional[int]) -> bool:
    """Whether the kernel can step ``p`` in place as one block of memory (with
    ``norm_dim=0``, each dim-0 slice must be a block of its own)."""
    if p.numel() == 0:
        return p.is_contiguous()
    if not _dense(p):
        return False
    if norm_dim == 0 and p.dim() > 0 and p.shape[0] > 1:
        return p.stride(0) == p.numel() // p.shape[0]
    return True


def _like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in ``p``'s memory layout."""
    return torch.empty_like(p).copy_(t)


def _flat_flags(params, group_index, groups) -> list[bool]:
    """Per tensor, whether the kernels can step it in place (see _walks_flat)."""
    return [_walks_flat(p, groups[gi].norm_dim if groups[gi].norm else None) for p, gi in zip(params, group_index)]


def _run_flat(params, grads, bufs, flat, momentum, launch) -> list:
    """Call ``launch(ps, gs, bs)`` on tensors the kernels can walk as flat
    blocks and return the momentum buffers after the step. Any dense layout
    works in place (channels_last, transposed) when grad and buffer share the
    param's strides; anything else goes through contiguous copies, written
    back after. ``bufs[i]`` is None where the step creates the buffer
    (``momentum[i]``) or there is none."""
    out = [
        (torch.empty_like(p) if ok else torch.empty_like(p, memory_format=torch.contiguous_format))
        if buf is None and mom else buf
        for p, buf, mom, ok in zip(params, bufs, momentum, flat)
    ]
    ps = [p if ok else p.contiguous() for p, ok in zip(params, flat)]
    # Only the buffers of tensors whose group has momentum reach the kernel:
    # meta numbers exactly those (a buffer passed for a tensor without
    # momentum is returned as it is).
    bs = [None if b is None or not mom else b if b.stride() == p.stride() else _like(p, b)
          for p, b, mom in zip(ps, out, momentum)]
    gs = [g if g.stride() == p.stride() else _like(p, g) for p, g in zip(ps, grads)]
    launch(ps, gs, bs)
    for dst, src in zip(params, ps):
        if dst is not src:
            dst.copy_(src)
    for dst, src in zip(out, bs):
        if src is not None and dst is not src:
            dst.copy_(src)
    return out


def _step_cpu(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, workspace, sums=None):
    key = _layout_key(params, bufs, group_index, groups, targets)
    if key is None or workspace.get("cpu_key") != key:
        workspace["cpu_key"] = key
        workspace["cpu_key_objects"] = list(params) + list(targets)  # keeps the ids in the key unique
        workspace["cpu_tables"] = build_tables(params, bufs, group_index=group_index, groups=groups, targets=targets)
        workspace["cpu_flat"] = _flat_flags(params, group_index, groups)
    meta, flat_targets = workspace["cpu_tables"]
    # An lr tensor reaches here only while torch.compile traces the step.
    hparams = _splice_lr(build_hparams(_without_lr_tensors(groups)), groups)

    def launch(ps, gs, bs):
        torch.ops.fixnorm_ext.fixnorm_step(ps, gs, [b for b in bs if b is not None], hparams, meta, flat_targets, [],
                                           grad_scale, found_inf, sums)

    return _run_flat(params, grads, bufs, workspace["cpu_flat"], [groups[gi].momentum != 0 for gi in group_index],
                     launch)


# --- the CUDA kernel's plan (csrc/fixnorm_meta.h, "plan") ---------------------

CUDA_CHUNK_BYTES = 16384  # of parameter data per chunk (4096 float32 elements)
CUDA_LAG_WAVES = 2  # apply passes start this many waves of chunks after their tensor's norm passes
CUDA_BLOCKS_PER_SM = 2  # resident blocks of the fused kernel (kMinBlocksPerSm in csrc/cuda): a wave


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, not {value!r}") from None
    if out <= 0:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return out


def build_cuda_plan(shapes: Sequence[tuple[int, ...]], element_sizes: Sequence[int],
                    meta: Union[torch.Tensor, Sequence[tuple[int, ...]]], *,
                    lag_chunks: int, chunk_bytes: int = CUDA_CHUNK_BYTES,
                    pack_segments: bool = True) -> list[torch.Tensor]:
    """The four plan tensors of csrc/fixnorm_meta.h, on the CPU.

    ``meta`` is the table of :func:`build_tables` for tensors of these shapes
    and element sizes, or its rows (:func:`meta_rows`). Each segment is cut into chunks of ``chunk_bytes`` of
    parameter data; segments shorter than that are packed several to a chunk
    (unless ``pack_segments`` is False: then every chunk is within one segment).
    In the queue, a tensor's apply passes follow its last norm pass after
    ``lag_chunks`` other items, so that its blocks are done by then, and go
    through its chunks last to first: the most recently read are the likeliest
    to be still in L2.
    """
    if chunk_bytes % 16:
        raise ValueError(f"chunk_bytes must be a multiple of 16, not {chunk_bytes}")
    rows = meta.tolist() if isinstance(meta, torch.Tensor) else meta
    tensors, chunks, seg_slots = [], [], [0]
    for i, (shape, size, row) in enumerate(zip(shapes, element_sizes, rows)):
        group, mode, norm_dim, _, target_offset, _ = row
        numel = math.prod(shape)
        per_chunk = max(1, chunk_bytes // size)
        first = len(chunks)
        if mode == 0:
            chunks.extend((i, s, min(per_chunk, numel - s), -1, 0, -1) for s in range(0, numel, per_chunk))
            tensors.append((numel, group, mode, 0, -1, 0, first, len(chunks)))
            continue
        segs = shape[0] if norm_dim == 0 and len(shape) > 0 else 1
        seg_len = numel // segs if segs else 0
        if target_offset != len(seg_slots) - 1:
            raise ValueError(f"tensor {i}: target offset {target_offset} is not the next segment ({len(seg_slots) - 1})")
        slot = seg_slots[-1]
        if segs == 1 or seg_len > per_chunk or seg_len == 0 or not pack_segments:
            # Each segment on its own chunks: one norm partial per chunk.
            for s in range(segs):
                for start in range(0, seg_len, per_chunk):
                    chunks.append((i, s * seg_len + start, min(per_chunk, seg_len - start), target_offset + s, 1, slot))
                    slot += 1
                seg_slots.append(slot)
        else:
            # Short segments, several whole ones per chunk: one partial each.
            per = per_chunk // seg_len
            for s in range(0, segs, per):
                m = min(per, segs - s)
                chunks.append((i, s * seg_len, m * seg_len, target_offset + s, m, slot))
                seg_slots.extend(range(slot + 1, slot + m + 1))
                slot += m
        tensors.append((numel, group, mode, seg_len, target_offset, segs, first, len(chunks)))

    queue: list[int] = []
    pending: collections.deque = collections.deque()  # (first chunk, end chunk, queue length when due)

    def emit(item: int) -> None:
        queue.append(item)
        while pending and pending[0][2] <= len(queue):
            first, end, _ = pending.popleft()
            queue.extend(2 * c + 1 for c in range(end - 1, first - 1, -1))

    for numel, group, mode, seg_len, seg_begin, segs, first, end in tensors:
        if mode == 0:
            for c in range(first, end):
                emit(2 * c + 1)
        elif end > first:
            for c in range(first, end):
                emit(2 * c)
            pending.append((first, end, len(queue) + lag_chunks))
    for first, end, _ in pending:
        queue.extend(2 * c + 1 for c in range(end - 1, first - 1, -1))
    return [
        torch.tensor(tensors, dtype=torch.int64).reshape(len(tensors), 8),
        torch.tensor(chunks, dtype=torch.int64).reshape(len(chunks), 6),
        torch.tensor(queue, dtype=torch.int32),
        torch.tensor(seg_slots, dtype=torch.int64),
    ]


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host table on ``device``, without blocking the host."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "FusedFixNorm's CUDA tables must be built before CUDA graph capture: take a step outside the graph "
            "first (warm-up), and keep the parameters, groups and float hyperparameters unchanged during capture")
    return t.pin_memory().to(device, non_blocking=True)


def _without_lr_tensors(groups) -> list:
    """The groups with every lr tensor replaced by 0: what a table built once
    and kept holds (the tensors are spliced in each step, see _splice_lr)."""
    return [dataclasses.replace(h, lr=0.0) if isinstance(h.lr, torch.Tensor) else h for h in groups]


def _hparams_key(groups, device) -> tuple:
    """What a kept hparams table depends on, from Python values only (no
    tensor is read, so a traced step can look it up)."""
    return (str(device), tuple((h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, h.maximize)
                               for h in _without_lr_tensors(groups)))


def _splice_lr(static: torch.Tensor, groups) -> torch.Tensor:
    """``static`` (an hparams table with 0 for lr tensors) with each group's
    lr tensor put in its lr column, on ``static``'s device, without reading it
    on the host."""
    if not any(isinstance(h.lr, torch.Tensor) for h in groups):
        return static
    lrs = torch.stack([h.lr.reshape(()).to(static.device, torch.float64) if isinstance(h.lr, torch.Tensor)
                       else static[k, 0] for k, h in enumerate(groups)])
    return torch.cat([lrs[:, None], static[:, 1:]], dim=1)


def _cuda_hparams(groups, device: torch.device, workspace: dict) -> torch.Tensor:
    """The hparams table: on the CPU while every lr is a number (the kernel
    takes it in its launch arguments), else on the device, built there from
    the lr tensors without a host synchronization."""
    if not any(isinstance(h.lr, torch.Tensor) for h in groups):
        return build_hparams(groups)
    static = _remember(workspace.setdefault("hparams", {}), _hparams_key(groups, device),
                       lambda: _upload(build_hparams(_without_lr_tensors(groups)), device))
    return _splice_lr(static, groups)


def _plan_key(params, group_index, groups) -> tuple:
    """What the plan depends on: which tensors, their shapes and dtypes, and
    their groups' norm settings (not the targets' values nor the buffers)."""
    return (
        tuple((id(p), tuple(p.shape), p.dtype, p.device) for p in params), tuple(group_index),
        tuple((h.norm, h.norm_dim, h.momentum != 0) for h in groups),
    )


def _on(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A GradScaler tensor on the device of the parameters it applies to."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _step_cuda(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, workspace):
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    out: list = [None] * len(params)
    for device, idx in by_device.items():
        sub = _step_cuda_device(
            [params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
            group_index=[group_index[i] for i in idx], groups=groups, targets=[targets[i] for i in idx],
            grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device), device=device,
            workspace=workspace.setdefault(("cuda", str(device)), {}))
        for i, b in zip(idx, sub):
            out[i] = b
    return out


CACHED_LAYOUTS = 8  # device tables kept per optimizer and device (a captured graph may still use an older one)


def _remember(cache: dict, key, make: Callable):
    """``cache[key]``, made by ``make()`` when missing; the oldest entries go
    beyond CACHED_LAYOUTS. Entries hold the objects whose ids are in their key,
    so those ids cannot be reused while the entry lives."""
    if key in cache:
        cache[key] = cache.pop(key)  # most recent last
    else:
        cache[key] = make()
        while len(cache) > CACHED_LAYOUTS:
            cache.pop(next(iter(cache)))
    return cache[key]


def _device_targets(params, group_index, groups, targets, device, workspace, plan_key) -> torch.Tensor:
    """The flat target table on ``device``, kept per plan and targets (see
    :func:`_targets_key`; rebuilt from the live targets while traced)."""
    def make():
        return (flat_targets(params, group_index=group_index, groups=groups, targets=targets, device=device),
                list(params) + list(targets))

    targets_key = _targets_key(targets)
    if targets_key is None:
        return make()[0]
    return _remember(workspace.setdefault("targets", {}), (plan_key, targets_key), make)[0]


def _make_plan(params, group_index, groups, device) -> tuple:
    meta = meta_rows(params, [None] * len(params), group_index=group_index, groups=groups)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    lag = _env_int("FIXNORM_CUDA_LAG_CHUNKS", CUDA_LAG_WAVES * CUDA_BLOCKS_PER_SM * sms)
    chunk_bytes = _env_int("FIXNORM_CUDA_CHUNK_BYTES", CUDA_CHUNK_BYTES)
    plan = build_cuda_plan([tuple(p.shape) for p in params], [p.element_size() for p in params], meta,
                           lag_chunks=lag, chunk_bytes=chunk_bytes)
    return [_upload(t, device) for t in plan], _flat_flags(params, group_index, groups), list(params)


def _step_cuda_device(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, device, workspace):
    # Device tables are made once per layout and kept (see _remember); the
    # step itself uploads nothing and reads nothing back.
    plan_key = _plan_key(params, group_index, groups)
    plan, flat, _ = _remember(workspace.setdefault("plans", {}), plan_key,
                              lambda: _make_plan(params, group_index, groups, device))
    meta, _ = _remember(workspace.setdefault("metas", {}), (plan_key, tuple(b is None for b in bufs)),
                        lambda: (build_meta(params, bufs, group_index=group_index, groups=groups), list(params)))
    device_targets = _device_targets(params, group_index, groups, targets, device, workspace, plan_key)
    hparams = _cuda_hparams(groups, device, workspace)

    def launch(ps, gs, bs):
        torch.ops.fixnorm_ext.fixnorm_step(ps, gs, [b for b in bs if b is not None], hparams, meta, device_targets,
                                           plan, grad_scale, found_inf)

    return _run_flat(params, grads, bufs, flat, [groups[gi].momentum != 0 for gi in group_index], launch)


# Backends whose kernel fills the ``sums`` table of the step (see :func:`fixnorm_step`).
SUMS_BACKENDS = ("cpu",)
SUM_COLS = 4  # new_sq, old_sq, old_dot_delta, delta_sq (csrc/fixnorm_ops.cpp)


@dataclass(frozen=True)
class SumsLayout:
    """The rows of a ``sums`` table, one per segment of every tensor (a
    tensor without norm control is one segment), and what turns them into
    per-tensor figures: per row, its tensor, norm mode code and target (0
    without norm control); tensor i's rows are [starts[i], starts[i + 1])."""
    tensor: torch.Tensor   # int64 [rows]
    mode: torch.Tensor     # int64 [rows]
    target: torch.Tensor   # float64 [rows]
    starts: tuple          # num_tensors + 1 row offsets
    num_tensors: int

    @property
    def rows(self) -> int:
        return self.starts[-1]


def sums_layout(params, *, group_index, groups, targets) -> SumsLayout:
    tensor, mode, parts, starts = [], [], [], [0]
    for i, (p, gi, t) in enumerate(zip(params, group_index, targets)):
        h = groups[gi]
        segs = _segments(p, h.norm_dim) if h.norm else 1
        tensor += [i] * segs
        mode += [MODE_CODE[h.norm]] * segs
        starts.append(starts[-1] + segs)
        parts.append(torch.zeros(segs, dtype=torch.float64) if h.norm is None else _segment_targets(t, segs, "cpu"))
    target = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return SumsLayout(torch.tensor(tensor, dtype=torch.int64), torch.tensor(mode, dtype=torch.int64), target,
                      tuple(starts), len(params))


def cached_sums_layout(params, bufs, *, group_index, groups, targets, workspace: dict) -> SumsLayout:
    """:func:`sums_layout`, kept in ``workspace`` while the layout and targets stay the same."""
    key = _layout_key(params, bufs, group_index, groups, targets)
    if key is None or workspace.get("sums_key") != key:
        workspace["sums_key"] = key
        workspace["sums_key_objects"] = list(params) + list(targets)  # keeps the ids in the key unique
        workspace["sums_layout"] = sums_layout(params, group_index=group_index, groups=groups, targets=targets)
    return workspace["sums_layout"]


def rescale_factors(new_sq: torch.Tensor, layout: SumsLayout) -> torch.Tensor:
    """Per row, the factor the step rescales its segment by, as the kernels
    compute it: target / norm, at most 1 for "max", 1 without norm control or
    for a zero norm."""
    norm = new_sq.sqrt()
    factor = layout.target / norm
    factor = torch.where(layout.mode == MODE_CODE["max"], factor.clamp(max=1.0), factor)
    return torch.where((layout.mode == 0) | (norm == 0), torch.ones_like(factor), factor)


def segment_partials(sums: torch.Tensor, factors: torch.Tensor, tensor: torch.Tensor,
                     num_tensors: int) -> torch.Tensor:
    """Per tensor, three sums (float64, [num_tensors, 3]) from which its angle
    follows, each a sum over its segments, so that shards of a tensor can add
    theirs (see :func:`angles_from_partials`).

    Row s of ``sums`` holds a_s = ||w_old||^2, x_s = <w_old, delta> and d_s =
    ||delta||^2 of a segment whose updated weights w_old + delta the step
    scaled by f_s (``factors``), giving w_new. The partials are
    ||w_new - w_old||^2 = sum_s (f_s - 1)^2 a_s + 2 (f_s - 1) f_s x_s + f_s^2 d_s,
    <w_new - w_old, w_old> = sum_s (f_s - 1) a_s + f_s x_s, and ||w_old||^2:
    every term is of the size of the step, not of the weights."""
    a, x, d = sums[:, 1], sums[:, 2], sums[:, 3]
    h = factors - 1.0
    cols = torch.stack([h * h * a + 2 * h * factors * x + factors * factors * d, h * a + factors * x, a], dim=1)
    return torch.zeros(num_tensors, 3, dtype=torch.float64).index_add_(0, tensor, cols)


def angles_from_partials(partials: torch.Tensor) -> torch.Tensor:
    """Per tensor, the angle (radians, float64) between its weights before
    and after the step, from :func:`segment_partials`: with q = ||w_new -
    w_old||^2, l = <w_new - w_old, w_old> and A = ||w_old||^2, w_new has
    (1 + l / A) sqrt(A) along w_old and sqrt(q - l^2 / A) across it, which
    keeps the small tangential part of a step without the cancellation of
    1 - cos. 0 for a tensor that was all zeros, or a step skipped for an
    overflow (all sums 0)."""
    q, l, total = partials[:, 0], partials[:, 1], partials[:, 2]
    safe = torch.where(total > 0, total, 1.0)
    across = (q - l * l / safe).clamp(min=0.0).sqrt()
    along = (1.0 + l / safe) * total.sqrt()
    return torch.where(total > 0, torch.atan2(across, along), torch.zeros_like(along))


def angles_from_sums(sums: torch.Tensor, layout: SumsLayout) -> torch.Tensor:
    """Per tensor, the angle (radians, float64) it turned in a step whose
    kernel filled ``sums`` (rescaled by :func:`rescale_factors`)."""
    factors = rescale_factors(sums[:, 0], layout)
    return angles_from_partials(segment_partials(sums, factors, layout.tensor, layout.num_tensors))


def _step_triton(*args, **kwargs):
    # Imported on first use: fixnorm_ext.triton_backend imports this module.
    return _triton_backend()._step_triton(*args, **kwargs)


_IMPLS: dict[str, Callable] = {
    "reference": _step_reference, "foreach": _step_foreach, "cpu": _step_cpu, "cuda": _step_cuda,
    "triton": _step_triton,
}


def fixnorm_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    group_index: Sequence[int],
    groups: Sequence[GroupHyper],
    targets: Sequence[Optional[torch.Tensor]],
    backend: str,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    workspace: Optional[dict] = None,
    sums: Optional[torch.Tensor] = None,
) -> list[Optional[torch.Tensor]]:
    """Apply one FixNorm step to every tensor, in place, with ``backend``.

    ``group_index[i]`` picks the :class:`GroupHyper` of tensor ``i``;
    ``targets[i]`` is its segment target norm: a number, a float64 tensor of
    one value per segment, or ``None`` without norm control;
    ``momentum_buffers[i]`` is ``None`` when there is none yet. Returns the
    momentum buffers after the step (new ones where there were none).
    ``workspace`` is a dict the backend may keep tables in between calls
    with the same layout (the optimizer passes one per instance).

    ``sums`` (the backends of ``SUMS_BACKENDS``): a float64 tensor of shape
    ``[sums_layout(...).rows, 4]`` that the step fills, per segment, with the updated
    weights' sum of squares before rescaling, ``||w_old||^2``,
    ``<w_old, delta>`` and ``||delta||^2``.
    """
    extra = {}
    if sums is not None:
        if backend not in SUMS_BACKENDS:
            raise ValueError(f"backend {backend!r} does not report sums (backends that do: {SUMS_BACKENDS})")
        extra = {"sums": sums}
    return _IMPLS[backend](
        list(params), list(grads), list(momentum_buffers), group_index=list(group_index),
        groups=list(groups), targets=list(targets), grad_scale=grad_scale, found_inf=found_inf,
        workspace={} if workspace is None else workspace, **extra)
