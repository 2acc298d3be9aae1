"""Triton kernels for the fused FixNorm step (DESIGN.md section 2).

The step for all tensors of one dtype takes three launches, each over the
chunks of the CUDA backend's plan (csrc/fixnorm_meta.h, built by
``dispatch.build_cuda_plan``):

* norm pass (chunks with norm control): read p, g and the momentum buffer,
  compute the updated weights and store each segment's sum of squares in its
  norm partial. Nothing else is written, so the apply pass can compute the
  same update again from the same inputs and round only once.
* finalize (one tensor per iteration): sum each segment's partials in slot
  order and turn the norm into a factor: ``"fixed"``: r/n, ``"max"``:
  min(1, r/n), n = 0: 1.
* apply pass (every chunk): the update times its segment's factor (1 without
  norm control), rounded once to the parameter dtype, and the new buffer.

Tensor addresses come from a device table, so the launches do not depend on
the number of tensors and the tables are reused between steps. ``lr`` (in the
hparams table), ``grad_scale`` and ``found_inf`` are read on the device:
nothing here synchronizes with the host. Norms are deterministic: a chunk's
sum of squares is a fixed per-lane accumulation followed by one ``tl.sum``,
and a segment's partials are added in a fixed order.

The update is float32 for float32, bfloat16 and float16 parameters and
float64 for float64 ones. Both passes compute it with the same explicitly
rounded operations (``tl.fma``, ``div_rn``), never a bare ``a * b + c`` that
the compiler could contract in one kernel and not the other, so the apply pass
rescales exactly the values whose norm the norm pass measured.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

# --- table layouts (csrc/fixnorm_meta.h) ----------------------------------------

# hparams: float64 (or float32) [num_groups, 6]
HPARAM_COLS: tl.constexpr = tl.constexpr(6)
LR: tl.constexpr = tl.constexpr(0)
MOMENTUM: tl.constexpr = tl.constexpr(1)
DAMPENING: tl.constexpr = tl.constexpr(2)
WEIGHT_DECAY: tl.constexpr = tl.constexpr(3)
NESTEROV: tl.constexpr = tl.constexpr(4)
MAXIMIZE: tl.constexpr = tl.constexpr(5)

# plan[0] tensors: int64 [num_tensors, 8]
TENSOR_COLS: tl.constexpr = tl.constexpr(8)
TENSOR_GROUP: tl.constexpr = tl.constexpr(1)
TENSOR_MODE: tl.constexpr = tl.constexpr(2)
TENSOR_SEG_BEGIN: tl.constexpr = tl.constexpr(4)
TENSOR_NUM_SEGS: tl.constexpr = tl.constexpr(5)
MODE_MAX: tl.constexpr = tl.constexpr(2)

# plan[1] chunks: int64 [num_chunks, 6]
CHUNK_COLS: tl.constexpr = tl.constexpr(6)
CHUNK_TENSOR: tl.constexpr = tl.constexpr(0)
CHUNK_START: tl.constexpr = tl.constexpr(1)
CHUNK_LEN: tl.constexpr = tl.constexpr(2)
CHUNK_SEG0: tl.constexpr = tl.constexpr(3)
CHUNK_SEGS: tl.constexpr = tl.constexpr(4)
CHUNK_SLOT0: tl.constexpr = tl.constexpr(5)

# flags: int32 [num_tensors], the same bits as the CUDA kernel's flags.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPE_MASK: tl.constexpr = tl.constexpr(3)
FLAG_INIT: tl.constexpr = tl.constexpr(4)  # the momentum buffer is new: set it to the gradient
FLAG_BUFFER: tl.constexpr = tl.constexpr(8)  # the tensor has a momentum buffer

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}

# Pointers whose address is a multiple of this get the vectorized path.
ALIGN: tl.constexpr = tl.constexpr(16)

# Compile options of every launch. The update already spells out each fused
# multiply-add (tl.fma); with contraction off the compiler cannot fuse any
# other product into a sum in one kernel and not in the other.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# --- element math ---------------------------------------------------------------

@triton.jit
def _load_acc(ptr, mask, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """Load and widen to the math type. bfloat16 is widened by its bits
    (exact, and the same in the interpreter and compiled)."""
    if mask is None:
        raw = tl.load(ptr)
    else:
        raw = tl.load(ptr, mask=mask, other=0)
    if DTYPE == tl.bfloat16:
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(ACC)


@triton.jit
def _store_rounded(ptr, x, mask, DTYPE: tl.constexpr):
    """Round ``x`` once to the storage type (to nearest, ties to even) and
    store it. bfloat16 is rounded on the bits: Triton's interpreter truncates
    a plain float32 -> bfloat16 cast, and this gives the same bits as the
    compiled rounding everywhere."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # a NaN stays a NaN
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DTYPE)
    if mask is None:
        tl.store(ptr, out)
    else:
        tl.store(ptr, out, mask=mask)


@triton.jit
def _update(p, g, b, hyper, grad_scale, HAS_GRAD_SCALE: tl.constexpr, ACC: tl.constexpr):
    """Steps 1-4 for a tile: returns the updated weights and the new buffer
    (``b`` is the old buffer, ignored on the first step)."""
    lr, momentum, one_minus_dampening, weight_decay, sign, nesterov, decay, has_buf, init = hyper
    if HAS_GRAD_SCALE:
        if ACC == tl.float64:
            g = g / grad_scale  # float64 division is always correctly rounded
        else:
            g = tl.math.div_rn(g, grad_scale)
    g = g * sign
    g = tl.where(decay, tl.fma(weight_decay, p, g), g)
    b = tl.where(init, g, tl.fma(one_minus_dampening, g, momentum * b))
    d = tl.where(has_buf, tl.where(nesterov, tl.fma(momentum, b, g), b), g)
    return tl.fma(-lr, d, p), b


@triton.jit
def _tile(p_ptr, g_ptr, b_ptr, offs, mask, factor, acc, hyper, grad_scale, APPLY: tl.constexpr,
          HAS_GRAD_SCALE: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """One tile: the norm pass adds the squares of the updated weights to the
    per-lane ``acc``; the apply pass writes p and the buffer."""
    _, _, _, _, _, _, _, has_buf, init = hyper
    read_buf = has_buf & (init == 0)
    p = _load_acc(p_ptr + offs, mask, DTYPE, ACC)
    g = _load_acc(g_ptr + offs, mask, DTYPE, ACC)
    b = _load_acc(b_ptr + offs, read_buf if mask is None else mask & read_buf, DTYPE, ACC)
    x, b = _update(p, g, b, hyper, grad_scale, HAS_GRAD_SCALE, ACC)
    if APPLY:
        _store_rounded(p_ptr + offs, x * factor, mask, DTYPE)
        _store_rounded(b_ptr + offs, b, has_buf if mask is None else mask & has_buf, DTYPE)
    else:
        if mask is not None:
            x = tl.where(mask, x, 0.0)
        acc = tl.fma(x, x, acc)
    return acc


@triton.jit
def _run_range(p_ptr, g_ptr, b_ptr, length, factor, hyper, grad_scale, APPLY: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``length`` elements from the given pointers, in tiles of BLOCK: whole
    tiles without a mask (so aligned pointers give vector accesses), then the
    tail. Returns the sum of squares of the updated weights (norm pass)."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    full = length - length % BLOCK
    for off in range(0, full, BLOCK):
        acc = _tile(p_ptr + off, g_ptr + off, b_ptr + off, cols, None, factor, acc, hyper, grad_scale, APPLY,
                    HAS_GRAD_SCALE, DTYPE, ACC)
    if full < length:
        acc = _tile(p_ptr + full, g_ptr + full, b_ptr + full, cols, cols < length - full, factor, acc, hyper,
                    grad_scale, APPLY, HAS_GRAD_SCALE, DTYPE, ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def _run_segment(ptrs, t, start, length, factor, hyper, grad_scale, APPLY: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [start, start + length) of tensor ``t``, whose addresses are
    row ``t`` of ``ptrs`` (p, g, buffer; 0 without a buffer)."""
    ELEMENT: tl.constexpr = DTYPE.primitive_bitwidth // 8
    row = ptrs + t * 3
    p_addr = tl.load(row) + start * ELEMENT
    g_addr = tl.load(row + 1) + start * ELEMENT
    b_addr = tl.load(row + 2)
    b_addr = tl.where(b_addr != 0, b_addr + start * ELEMENT, 0)
    if ((p_addr | g_addr | b_addr) % ALIGN) == 0:
        # The same code with the alignment known, so whole tiles load and
        # store 16 bytes at a time.
        ss = _run_range(tl.multiple_of(p_addr.to(tl.pointer_type(DTYPE)), ALIGN),
                        tl.multiple_of(g_addr.to(tl.pointer_type(DTYPE)), ALIGN),
                        tl.multiple_of(b_addr.to(tl.pointer_type(DTYPE)), ALIGN),
                        length, factor, hyper, grad_scale, APPLY, HAS_GRAD_SCALE, DTYPE, ACC, BLOCK)
    else:
        ss = _run_range(p_addr.to(tl.pointer_type(DTYPE)), g_addr.to(tl.pointer_type(DTYPE)),
                        b_addr.to(tl.pointer_type(DTYPE)), length, factor, hyper, grad_scale, APPLY,
                        HAS_GRAD_SCALE, DTYPE, ACC, BLOCK)
    return ss


@triton.jit
def _chunk_hyper(hparams, tensors, flags, t, ACC: tl.constexpr):
    """The hyperparameters of tensor ``t``'s group, in the math type, and its
    buffer flags."""
    row = hparams + tl.load(tensors + t * TENSOR_COLS + TENSOR_GROUP) * HPARAM_COLS
    fl = tl.load(flags + t)
    weight_decay = tl.load(row + WEIGHT_DECAY)
    sign = tl.where(tl.load(row + MAXIMIZE) != 0, -1.0, 1.0)
    return (
        tl.load(row + LR).to(ACC),
        tl.load(row + MOMENTUM).to(ACC),
        (1.0 - tl.load(row + DAMPENING)).to(ACC),
        weight_decay.to(ACC),
        sign.to(ACC),
        tl.load(row + NESTEROV) != 0,
        weight_decay != 0,
        (fl & FLAG_BUFFER) != 0,
        (fl & FLAG_INIT) != 0,
    )


@triton.jit
def _load_grad_scale(grad_scale, HAS_GRAD_SCALE: tl.constexpr, ACC: tl.constexpr):
    if HAS_GRAD_SCALE:
        return tl.load(grad_scale).to(ACC)
    else:
        return tl.full([], 1.0, ACC)


@triton.jit
def _work_end(found_inf, n, HAS_FOUND_INF: tl.constexpr):
    """``n``, or 0 when found_inf says to skip the step (read on the device)."""
    if HAS_FOUND_INF:
        return tl.where(tl.load(found_inf) != 0, 0, n)
    else:
        return n


# --- the three kernels --------------------------------------------------------------

@triton.jit
def _fixnorm_norm_pass_kernel(tensors, chunks, ptrs, flags, hparams, grad_scale, found_inf, partials, num_chunks,
                              DTYPE: tl.constexpr, ACC: tl.constexpr, DTYPE_CODE: tl.constexpr,
                              HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    end = _work_end(found_inf, num_chunks, HAS_FOUND_INF)
    scale = _load_grad_scale(grad_scale, HAS_GRAD_SCALE, ACC)
    for c in range(tl.program_id(0), end, tl.num_programs(0)):
        chunk = chunks + c * CHUNK_COLS
        t = tl.load(chunk + CHUNK_TENSOR)
        mine = (tl.load(flags + t) & DTYPE_MASK) == DTYPE_CODE
        segs = tl.where(mine, tl.load(chunk + CHUNK_SEGS), 0)  # 0: no norm control, or another dtype
        if segs > 0:
            hyper = _chunk_hyper(hparams, tensors, flags, t, ACC)
            start = tl.load(chunk + CHUNK_START)
            seg_len = tl.load(chunk + CHUNK_LEN) // segs
            slot0 = tl.load(chunk + CHUNK_SLOT0)
            for j in range(0, segs):
                ss = _run_segment(ptrs, t, start + j * seg_len, seg_len, 1.0, hyper, scale, False,
                                  HAS_GRAD_SCALE, DTYPE, ACC, BLOCK)
                tl.store(partials + slot0 + j, ss.to(tl.float64))


@triton.jit
def _fixnorm_finalize_kernel(tensors, flags, seg_slots, partials, targets, factors, found_inf, num_tensors,
                             DTYPE_CODE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SEG_BLOCK: tl.constexpr):
    end = _work_end(found_inf, num_tensors, HAS_FOUND_INF)
    lanes = tl.arange(0, SEG_BLOCK)
    for t in range(tl.program_id(0), end, tl.num_programs(0)):
        row = tensors + t * TENSOR_COLS
        mode = tl.load(row + TENSOR_MODE)
        mine = (tl.load(flags + t) & DTYPE_MASK) == DTYPE_CODE
        segs = tl.where(mine & (mode != 0), tl.load(row + TENSOR_NUM_SEGS), 0)
        seg_begin = tl.load(row + TENSOR_SEG_BEGIN)
        for j in range(0, segs, SEG_BLOCK):
            s = seg_begin + j + lanes
            live = j + lanes < segs
            lo = tl.load(seg_slots + s, mask=live, other=0)
            count = tl.load(seg_slots + s + 1, mask=live, other=0) - lo
            total = tl.zeros([SEG_BLOCK], dtype=tl.float64)
            for k in range(0, tl.max(count, axis=0)):
                total += tl.load(partials + lo + k, mask=k < count, other=0.0)
            n = tl.sqrt(total)
            factor = tl.load(targets + s, mask=live, other=1.0).to(tl.float64) / tl.where(n == 0, 1.0, n)
            # A comparison, not tl.minimum: a NaN norm must stay NaN (as in the
            # reference), and the compiled minimum would turn it into 1.
            factor = tl.where((mode == MODE_MAX) & (factor > 1.0), 1.0, factor)
            factor = tl.where(n == 0, 1.0, factor)  # a zero segment is left as it is
            tl.store(factors + s, factor, mask=live)


@triton.jit
def _fixnorm_apply_pass_kernel(tensors, chunks, ptrs, flags, hparams, grad_scale, found_inf, factors, num_chunks,
                               DTYPE: tl.constexpr, ACC: tl.constexpr, DTYPE_CODE: tl.constexpr,
                               HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    end = _work_end(found_inf, num_chunks, HAS_FOUND_INF)
    scale = _load_grad_scale(grad_scale, HAS_GRAD_SCALE, ACC)
    for c in range(tl.program_id(0), end, tl.num_programs(0)):
        chunk = chunks + c * CHUNK_COLS
        t = tl.load(chunk + CHUNK_TENSOR)
        if (tl.load(flags + t) & DTYPE_MASK) == DTYPE_CODE:
            hyper = _chunk_hyper(hparams, tensors, flags, t, ACC)
            start = tl.load(chunk + CHUNK_START)
            segs = tl.load(chunk + CHUNK_SEGS)
            seg0 = tl.load(chunk + CHUNK_SEG0)
            parts = tl.maximum(segs, 1)  # a chunk without norm control is one part with factor 1
            part_len = tl.load(chunk + CHUNK_LEN) // parts
            for j in range(0, parts):
                factor = tl.load(factors + seg0 + j, mask=segs > 0, other=1.0).to(ACC)
                _run_segment(ptrs, t, start + j * part_len, part_len, factor, hyper, scale, True,
                             HAS_GRAD_SCALE, DTYPE, ACC, BLOCK)


# --- host side ---------------------------------------------------------------------

def tensor_tables(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  buffers: Sequence[Optional[torch.Tensor]], init: Sequence[bool],
                  device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ptrs`` (int64 [T, 3]: p, g, buffer addresses; 0 without a buffer)
    and ``flags`` (int32 [T]: dtype code | FLAG_BUFFER | FLAG_INIT) tables for
    tensors in the plan's order. ``buffers[i]`` is the tensor the step writes
    the momentum buffer into (allocated already when ``init[i]``), or None.
    They hold addresses, not values: keep them between steps, and rebuild
    them when a tensor is replaced and after the step that created buffers."""
    rows, flags = [], []
    for p, g, b, first in zip(params, grads, buffers, init):
        if p.dtype not in DTYPE_CODES:
            raise TypeError(f"fixnorm_triton_step: unsupported dtype {p.dtype} (float32, float64, bfloat16, float16)")
        rows.append((p.data_ptr(), g.data_ptr(), 0 if b is None else b.data_ptr()))
        flags.append(DTYPE_CODES[p.dtype] | (0 if b is None else FLAG_BUFFER.value)
                     | (FLAG_INIT.value if b is not None and first else 0))
    device = params[0].device if device is None and len(params) else device
    ptrs = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 3)
    return ptrs.to(device), torch.tensor(flags, dtype=torch.int32).to(device)


def fixnorm_triton_step(dtype: torch.dtype, plan: Sequence[torch.Tensor], ptrs: torch.Tensor, flags: torch.Tensor,
                        hparams: torch.Tensor, targets: torch.Tensor, *,
                        grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
                        scratch: Optional[torch.Tensor] = None, block: int = 1024, num_warps: int = 4,
                        max_programs: Optional[int] = None) -> None:
    """One FixNorm step of the plan's tensors of ``dtype``, in place:
    norm pass, finalize, apply pass (three launches, whatever the number of
    tensors; tensors of other dtypes in the same plan are left alone).

    ``plan``: the four tables of ``dispatch.build_cuda_plan`` on the device
    (packed segments or not; the queue is not used); ``ptrs`` / ``flags``:
    :func:`tensor_tables`;
    ``hparams``: [groups, 6] float64 or float32 (lr may come from device
    tensors); ``targets``: float64, one per segment; ``grad_scale`` /
    ``found_inf``: one-element device tensors or None. ``scratch``: float64
    of at least :func:`scratch_size` elements, reused between steps if given.
    Never reads a device value on the host.
    """
    tensors, chunks, _, seg_slots = plan
    num_chunks, num_tensors = chunks.shape[0], tensors.shape[0]
    if num_chunks == 0:
        return
    if dtype not in DTYPE_CODES:
        raise TypeError(f"fixnorm_triton_step: unsupported dtype {dtype} (float32, float64, bfloat16, float16)")
    device = chunks.device
    need = scratch_size(plan, targets)
    if scratch is None:
        scratch = torch.empty(need, dtype=torch.float64, device=device)
    elif scratch.numel() < need or scratch.dtype != torch.float64:
        raise ValueError(f"fixnorm_triton_step: scratch must be float64 with at least {need} elements")
    factors = scratch[:targets.numel()]
    partials = scratch[targets.numel():]
    has_scale, has_inf = grad_scale is not None, found_inf is not None
    # Placeholders for absent pointers: never read (the flags are compile-time).
    scale_arg = grad_scale.to(device=device, dtype=torch.float32) if has_scale else scratch
    inf_arg = found_inf.to(device=device, dtype=torch.float32) if has_inf else scratch
    common = dict(DTYPE=_TL_DTYPES[dtype], ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                  DTYPE_CODE=DTYPE_CODES[dtype], HAS_GRAD_SCALE=has_scale, HAS_FOUND_INF=has_inf, BLOCK=block,
                  num_warps=num_warps, **LAUNCH_OPTIONS)
    cap = max_programs or num_chunks
    grid = (min(num_chunks, cap),)
    if targets.numel():  # some segment has norm control
        _fixnorm_norm_pass_kernel[grid](tensors, chunks, ptrs, flags, hparams, scale_arg, inf_arg, partials,
                                        num_chunks, **common)
        _fixnorm_finalize_kernel[(min(num_tensors, cap),)](
            tensors, flags, seg_slots, partials, targets, factors, inf_arg, num_tensors,
            DTYPE_CODE=DTYPE_CODES[dtype], HAS_FOUND_INF=has_inf, SEG_BLOCK=128, num_warps=4, **LAUNCH_OPTIONS)
    _fixnorm_apply_pass_kernel[grid](tensors, chunks, ptrs, flags, hparams, scale_arg, inf_arg, factors, num_chunks,
                                     **common)


def scratch_size(plan: Sequence[torch.Tensor], targets: torch.Tensor) -> int:
    """float64 elements of scratch a step needs: one factor per segment and
    the norm partials (at most one per chunk plus one per segment)."""
    return 2 * targets.numel() + plan[1].shape[0]
