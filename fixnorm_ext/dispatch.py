"""One functional entry point, :func:`fixnorm_step`, and the backend table.

Every backend implements the same step (DESIGN.md section 2) behind the same
keyword-only signature. Availability is decided once, when this module is
imported, and a missing backend always comes with the reason it is missing.
"""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fixnorm_ext import reference

log = logging.getLogger("fixnorm_ext")

try:
    importlib.import_module("fixnorm_ext._C")  # loading it registers the torch.ops.fixnorm_ext ops

    EXTENSION_ERROR: Optional[str] = None

    @torch.library.register_fake("fixnorm_ext::fixnorm_step")
    def _fixnorm_step_fake(params, grads, momentum_buffers, hparams, meta, targets, grad_scale=None, found_inf=None):
        # In-place on its inputs and returns nothing: no output shapes to describe.
        return None
except ImportError as exc:  # the package still works without its compiled part
    EXTENSION_ERROR = (
        f"the compiled extension fixnorm_ext._C could not be imported ({exc}); "
        "build it with `pip install --no-build-isolation -e .`"
    )

NORM_MODES = reference.NORM_MODES
_MODE_CODE = {None: 0, "fixed": 1, "max": 2}
BACKENDS = ("auto", "reference", "foreach", "cpu")


@dataclass(frozen=True)
class GroupHyper:
    """The hyperparameters of one parameter group as the kernels see them."""

    lr: float
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
    return out


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
    if EXTENSION_ERROR is not None and device_types <= {"cpu"}:
        why = f"auto chose 'foreach' because {EXTENSION_ERROR}"
    else:
        why = f"auto chose 'foreach': no fused kernel yet for devices {sorted(device_types)}"
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


def _renorm_foreach(ps: list[torch.Tensor], ts: list[torch.Tensor], mode: str, norm_dim: Optional[int]) -> None:
    """Rescale ``ps`` in place: one ``_foreach_norm`` for whole-tensor norms,
    a per-tensor row norm for ``norm_dim=0``."""
    if norm_dim is None:
        norms = torch._foreach_norm(ps)
    else:
        norms = [torch.linalg.vector_norm(p.reshape(p.shape[0], math.prod(p.shape[1:])) if p.dim() else p, dim=-1)
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


def build_tables(params, bufs, *, group_index, groups, targets):
    """The meta / targets tables of csrc/fixnorm_meta.h. ``bufs[i]`` is
    ``None`` for a buffer the kernel must create from the gradient; every
    tensor of a group with momentum gets the next buffer slot."""
    rows, flat, offset, slot = [], [], 0, 0
    for p, buf, gi, t in zip(params, bufs, group_index, targets):
        h = groups[gi]
        init = int(h.momentum != 0 and buf is None)
        buffer = slot if h.momentum != 0 else -1
        slot += h.momentum != 0
        if h.norm is None:
            rows.append((gi, 0, -1, init, -1, buffer))
            continue
        rows.append((gi, _MODE_CODE[h.norm], 0 if h.norm_dim == 0 else -1, init, offset, buffer))
        t = _target_tensor(t).detach().to(torch.float64).reshape(-1).cpu()
        flat.append(t.expand(_segments(p, h.norm_dim)) if t.numel() == 1 else t)
        offset += flat[-1].numel()
    meta = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 6)
    flat_targets = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    return meta, flat_targets


def _layout_key(params, bufs, group_index, groups, targets) -> tuple:
    """What the meta / targets tables depend on. Recorded targets enter by
    identity and version counter, so replacing one or editing it in place
    both rebuild the tables."""
    return (
        tuple(id(p) for p in params), tuple(group_index), tuple(b is None for b in bufs),
        tuple((h.norm, h.norm_dim, h.momentum != 0) for h in groups),
        tuple(t if t is None or isinstance(t, float) else (id(t), t._version) for t in targets),
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


def _step_cpu(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, workspace):
    key = _layout_key(params, bufs, group_index, groups, targets)
    if workspace.get("cpu_key") != key:
        workspace["cpu_key"] = key
        workspace["cpu_tables"] = build_tables(params, bufs, group_index=group_index, groups=groups, targets=targets)
        # The kernel walks each tensor as one flat block: any dense layout
        # works (channels_last, transposed) when grad and buffer share the
        # param's strides; anything else goes through contiguous copies
        # written back after.
        workspace["cpu_flat"] = [_walks_flat(p, groups[gi].norm_dim if groups[gi].norm else None)
                                 for p, gi in zip(params, group_index)]
    meta, flat_targets = workspace["cpu_tables"]
    flat = workspace["cpu_flat"]
    hparams = build_hparams(groups)
    out = [
        (torch.empty_like(p) if ok else torch.empty_like(p, memory_format=torch.contiguous_format))
        if buf is None and groups[gi].momentum != 0 else buf
        for p, buf, gi, ok in zip(params, bufs, group_index, flat)
    ]
    ps = [p if ok else p.contiguous() for p, ok in zip(params, flat)]
    bs = [b if b is None or b.stride() == p.stride() else _like(p, b) for p, b in zip(ps, out)]
    gs = [g if g.stride() == p.stride() else _like(p, g) for p, g in zip(ps, grads)]
    torch.ops.fixnorm_ext.fixnorm_step(ps, gs, [b for b in bs if b is not None], hparams, meta, flat_targets,
                                       grad_scale, found_inf)
    for dst, src in zip(params, ps):
        if dst is not src:
            dst.copy_(src)
    for dst, src in zip(out, bs):
        if dst is not src:
            dst.copy_(src)
    return out


_IMPLS: dict[str, Callable] = {"reference": _step_reference, "foreach": _step_foreach, "cpu": _step_cpu}


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
) -> list[Optional[torch.Tensor]]:
    """Apply one FixNorm step to every tensor, in place, with ``backend``.

    ``group_index[i]`` picks the :class:`GroupHyper` of tensor ``i``;
    ``targets[i]`` is its segment target norm: a number, a float64 tensor of
    one value per segment, or ``None`` without norm control;
    ``momentum_buffers[i]`` is ``None`` when there is none yet. Returns the
    momentum buffers after the step (new ones where there were none).
    ``workspace`` is a dict the backend may keep tables in between calls
    with the same layout (the optimizer passes one per instance).
    """
    return _IMPLS[backend](
        list(params), list(grads), list(momentum_buffers), group_index=list(group_index),
        groups=list(groups), targets=list(targets), grad_scale=grad_scale, found_inf=found_inf,
        workspace={} if workspace is None else workspace)
