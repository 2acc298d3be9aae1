"""The ``"triton"`` backend: the kernels of ``kernels/fixnorm_triton.py``
behind the custom op ``fixnorm_ext::fixnorm_step_triton``.

The op is registered with ``torch.library`` (with a fake implementation) so
that ``torch.compile`` can trace a step that calls it; importing this module
never imports Triton. The kernels are imported on the first step, so that
``TRITON_INTERPRET`` (read when they are decorated) can still be set before.

Host work per step: no table is built again while the layout stays the same
(plan, targets, hparams and the pointer table are cached); the pointer table
is uploaded again only when a tensor's address or a buffer's first-step flag
changes (``zero_grad(set_to_none=True)`` gives new gradients, the first step
creates buffers). Nothing reads a device value on the host.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch

from fixnorm_ext.dispatch import (CUDA_CHUNK_BYTES, _device_targets, _env_int, _flat_flags, _hparams_key, _on,
                                  _plan_key, _remember, _run_flat, _splice_lr, _upload, _without_lr_tensors,
                                  build_cuda_plan, build_hparams, meta_rows)

KERNELS = "kernels.fixnorm_triton"
TRITON_CHUNK_BYTES = CUDA_CHUNK_BYTES  # of parameter data per chunk of the plan (FIXNORM_TRITON_CHUNK_BYTES)
TRITON_BLOCK = 1024  # elements per tile (FIXNORM_TRITON_BLOCK)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def import_error() -> Optional[str]:
    """Why Triton or the kernels are missing here, or ``None``. Found, not
    imported: Triton reads TRITON_INTERPRET when it is imported, which a test
    on CPU tensors sets first."""
    if _missing("triton"):
        return "Triton is not installed (no module named 'triton'); install it with `pip install triton`"
    if _missing(KERNELS):
        return (f"the Triton kernels ({KERNELS}) are not importable: they are installed with fixnorm_ext "
                "(pip install -e . from the repository root)")
    return None


def unavailable(device: str) -> Optional[str]:
    """Why the 'triton' backend cannot run on ``device`` type, or ``None``."""
    reason = import_error()
    if reason is not None:
        return reason
    if device == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    return f"the 'triton' backend runs on CUDA tensors (or CPU tensors in Triton's interpreter), not {device}"


def _kernels() -> ModuleType:
    try:
        return importlib.import_module(KERNELS)
    except ImportError as exc:
        raise RuntimeError(f"the 'triton' backend could not import its kernels ({KERNELS}): {exc}") from exc


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host table on ``device`` (without blocking the host on a GPU)."""
    return _upload(t, device) if device.type == "cuda" else t.to(device)


# Pointer and flag tables by (device, addresses, first-step flags, dtypes).
# A table is a function of its key alone, so an entry can serve any tensors
# that happen to have those addresses; a few are kept for a captured graph.
_POINTER_TABLES: dict = {}


def _pointer_tables(params, grads, has_buffer, init, momentum_buffers, device):
    it = iter(momentum_buffers)
    bufs = [next(it) if has else None for has in has_buffer]
    key = (str(device), tuple(p.data_ptr() for p in params), tuple(g.data_ptr() for g in grads),
           tuple(0 if b is None else b.data_ptr() for b in bufs), tuple(init), tuple(p.dtype for p in params))

    def make():
        ptrs, flags = _kernels().tensor_tables(params, grads, bufs, init, device=torch.device("cpu"))
        return _to_device(ptrs, device), _to_device(flags, device)

    return _remember(_POINTER_TABLES, key, make)


@torch.library.custom_op("fixnorm_ext::fixnorm_step_triton", mutates_args=("params", "momentum_buffers"))
def fixnorm_step_triton(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                        has_buffer: list[bool], init: list[bool], hparams: torch.Tensor, targets: torch.Tensor,
                        plan: list[torch.Tensor], grad_scale: Optional[torch.Tensor],
                        found_inf: Optional[torch.Tensor], block: int) -> None:
    """One FixNorm step of ``params`` in place (DESIGN.md section 2), three
    launches per dtype present. ``momentum_buffers`` are those of the tensors
    with ``has_buffer``, in order (``init``: new, written from the gradient);
    ``hparams``, ``targets`` and ``plan`` (``dispatch.build_cuda_plan``) are
    on the params' device, as are ``grad_scale`` and ``found_inf``."""
    if not params:
        return
    if len(has_buffer) != len(params) or len(init) != len(params) or sum(has_buffer) != len(momentum_buffers):
        raise ValueError("fixnorm_step_triton: has_buffer and init need one entry per param, and momentum_buffers "
                         "one tensor per True in has_buffer")
    K = _kernels()
    device = params[0].device
    ptrs, flags = _pointer_tables(params, grads, has_buffer, init, momentum_buffers, device)
    scratch = torch.empty(K.scratch_size(plan, targets), dtype=torch.float64, device=device)
    present = {p.dtype for p in params}
    for dtype in K.DTYPE_CODES:
        if dtype in present:
            K.fixnorm_triton_step(dtype, plan, ptrs, flags, hparams, targets, grad_scale=grad_scale,
                                  found_inf=found_inf, scratch=scratch, block=block)


@fixnorm_step_triton.register_fake
def _(params, grads, momentum_buffers, has_buffer, init, hparams, targets, plan, grad_scale, found_inf, block):
    # In-place on its inputs and returns nothing: no output shapes to describe.
    return None


def _hparams(groups, device: torch.device, workspace: dict) -> torch.Tensor:
    """The hparams table on ``device``: uploaded again only when a number in
    it changes; lr tensors are read on the device."""
    static = _remember(workspace.setdefault("hparams", {}), _hparams_key(groups, device),
                       lambda: _to_device(build_hparams(_without_lr_tensors(groups)), device))
    return _splice_lr(static, groups)


def _make_plan(params, group_index, groups, device) -> tuple:
    meta = meta_rows(params, [None] * len(params), group_index=group_index, groups=groups)
    # Short rows packed several to a chunk: fewer, fuller programs. The
    # kernels do not use the queue, so no lag.
    plan = build_cuda_plan([tuple(p.shape) for p in params], [p.element_size() for p in params], meta,
                           lag_chunks=0, chunk_bytes=_env_int("FIXNORM_TRITON_CHUNK_BYTES", TRITON_CHUNK_BYTES),
                           pack_segments=True)
    return [_to_device(t, device) for t in plan], _flat_flags(params, group_index, groups), list(params)


def _step_triton_device(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, device,
                        workspace):
    plan_key = _plan_key(params, group_index, groups)
    plan, flat, _ = _remember(workspace.setdefault("plans", {}), plan_key,
                              lambda: _make_plan(params, group_index, groups, device))
    device_targets = _device_targets(params, group_index, groups, targets, device, workspace, plan_key)
    hparams = _hparams(groups, device, workspace)
    momentum = [groups[gi].momentum != 0 for gi in group_index]
    init = [m and b is None for m, b in zip(momentum, bufs)]
    block = _env_int("FIXNORM_TRITON_BLOCK", TRITON_BLOCK)

    def launch(ps, gs, bs):
        torch.ops.fixnorm_ext.fixnorm_step_triton(ps, gs, [b for b in bs if b is not None],
                                                  [b is not None for b in bs], init, hparams, device_targets, plan,
                                                  grad_scale, found_inf, block)

    return _run_flat(params, grads, bufs, flat, momentum, launch)


def _step_triton(params, grads, bufs, *, group_index, groups, targets, grad_scale, found_inf, workspace):
    """The step of :func:`fixnorm_ext.dispatch.fixnorm_step` with the Triton
    kernels: one op call per device of the parameters."""
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    out: list = [None] * len(params)
    for device, idx in by_device.items():
        sub = _step_triton_device(
            [params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
            group_index=[group_index[i] for i in idx], groups=groups, targets=[targets[i] for i in idx],
            grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device), device=device,
            workspace=workspace.setdefault(("triton", str(device)), {}))
        for i, b in zip(idx, sub):
            out[i] = b
    return out
