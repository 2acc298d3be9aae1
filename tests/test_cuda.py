"""The CUDA backend of FusedFixNorm, on a GPU (issue 3, item 3).

Every test here needs a CUDA device and the compiled CUDA kernel; without them
the whole file is skipped with the reason, and importing it never touches the
device. Numbers are judged as in tests/test_backends.py: before each step the
optimizer's params and buffers are upcast to float64, ``fixnorm_ext.reference``
takes the same step, and the kernel's result must be within that file's
one-step tolerance table (``assert_close_dtype``) of the rounded float64 result.
Two refinements of how that table is applied, both in its own terms:

* the table's ``scale`` is "the size of what cancelled"; for a tensor of one
  element its own value does not show that, so the scale given is the largest
  of the values combined into each result (``expected_step``);
* a segment under norm control shares one factor r/n whose n is summed from
  all its L squares; for L in the millions that sum's rounding passes the
  per-element table, so the factor is checked on its own, with an allowance
  that grows like sqrt(L), and the elements are held to the table after it
  (``assert_param_close``).

The kernel has two schedules, chosen by ``FIXNORM_CUDA_SCHEDULE`` (``fused``,
the default, or ``phased``); tests that are cheap run under both.

``DEVICE`` and ``BACKEND`` are the only places the device is named: set to
``"cpu"`` the tests that are not about CUDA itself (graphs, launch counts, host
synchronization, the 2**31-element tensor) run against the C++ CPU backend,
which is how their comparisons were checked on a machine without a GPU.

The 2**31-element test takes about 45 GiB of device memory (it skips with
less than 60 GiB free) and is marked ``slow``: ``-m "not slow"`` leaves it out.
"""
import math
from typing import NamedTuple, Optional

import pytest
import torch

from fixnorm_ext import FusedFixNorm, available_backends, reference
from test_backends import DTYPES, TOLERANCE, assert_close_dtype, group_specs
from test_optimizer import assert_unchanged, snapshot

DEVICE = "cuda"
BACKEND = "cuda"
SCHEDULES = ["fused", "phased"]


def _why_missing():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    return available_backends(DEVICE).get(BACKEND, f"fixnorm_ext has no {BACKEND!r} backend")


MISSING = _why_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"backend {BACKEND!r} unavailable: {MISSING}")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="tests CUDA itself (graphs, profiler, stream syncs)")


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    monkeypatch.setenv("FIXNORM_CUDA_SCHEDULE", request.param)
    return request.param


# --------------------------------------------------------------------------- helpers


def device_params(specs, dtype, seed=0):
    """Parameters on DEVICE from ``specs``: a shape, optionally ending in a
    layout tag: "t" (a transposed 2-D view), "cl" (channels_last 4-D) or
    "slice" (every other column of a wider matrix: not dense). Values are drawn
    on the CPU in float64, so every device starts from the same numbers."""
    gen = torch.Generator().manual_seed(seed)

    def draw(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)

    params = []
    for spec in specs:
        layout = spec[-1] if spec and isinstance(spec[-1], str) else None
        shape = tuple(spec[:-1]) if layout else tuple(spec)
        if layout == "t":
            p = draw(shape[::-1]).t()
            assert not p.is_contiguous()
        elif layout == "cl":
            p = draw(shape).contiguous(memory_format=torch.channels_last)
            assert not p.is_contiguous() or shape[2] * shape[3] == 1
        elif layout == "slice":
            p = draw((shape[0], 2 * shape[1]))[:, ::2]
            assert not p.is_contiguous()
        else:
            assert layout is None, spec
            p = draw(shape)
        params.append(p.detach().requires_grad_())
    return params


def device_grads(params, step, scale=1.0):
    """Gradients of ``step`` in each param's dtype (times ``scale`` before the
    rounding). On even steps a dense param's grad shares its strides (what
    autograd gives); on odd steps every grad is contiguous, so the kernel also
    meets grads laid out differently from their params."""
    gen = torch.Generator(DEVICE).manual_seed(1000 + step)
    grads = []
    for p in params:
        g = (scale * torch.randn(p.shape, generator=gen, device=DEVICE, dtype=torch.float64)).to(p.dtype)
        grads.append(torch.empty_like(p).copy_(g) if step % 2 == 0 else g)
    return grads


def make_opt(params, **kw):
    opt = FusedFixNorm(params, backend=BACKEND, **kw)
    assert opt.backend == BACKEND, opt.backend_reason
    return opt


def expected_step(opt, grads):
    """``{param: Expected}``: one float64 reference step from the optimizer's
    current state for every param in ``grads`` (param -> its unscaled
    gradient); params absent from ``grads`` are not stepped."""
    out = {}
    for group in opt.param_groups:
        mu, tau, lam = group["momentum"], group["dampening"], group["weight_decay"]
        lr = float(group["lr"])
        for p in group["params"]:
            if p not in grads:
                continue
            st = opt.state.get(p, {})
            buf = st.get("momentum_buffer") if mu != 0 else None
            p_old, g = p.detach().double(), grads[p].double()
            b_old = None if buf is None else buf.double()
            # The reference's SGD update u, then its norm control on top.
            u = p_old.clone()
            new_buf = reference.fixnorm_step_one(
                u, g, None if b_old is None else b_old.clone(), lr=lr, momentum=mu, dampening=tau,
                weight_decay=lam, nesterov=group["nesterov"], maximize=group["maximize"])
            ref, factor = u, 1.0
            if group["norm"] is not None:
                target = (torch.tensor(float(group["target_norm"]), dtype=torch.float64)
                          if group["target_norm"] is not None else st["target_norm"])
                ref = reference.renormalize(u, target, group["norm"], group["norm_dim"])
                factor = _per_element(segment_ratio(ref, u, group["norm_dim"]), ref)
            # What each result is made of, for values that come out of cancellation.
            param_terms = factor * torch.maximum(p_old.abs(), (p_old - u).abs())
            if mu == 0:
                buf_terms = None
            elif b_old is None:
                buf_terms = torch.maximum(g.abs(), lam * p_old.abs())
            else:
                buf_terms = torch.maximum(mu * b_old.abs(), (1 - tau) * torch.maximum(g.abs(), lam * p_old.abs()))
            out[p] = Expected(ref, new_buf, _largest(param_terms), _largest(buf_terms), group["norm"],
                              group["norm_dim"])
    return out


class Expected(NamedTuple):
    param: torch.Tensor  # float64
    buf: Optional[torch.Tensor]  # float64, None without momentum
    param_scale: float  # the largest value combined into the param (scale of assert_close_dtype)
    buf_scale: float  # the same for the buffer
    norm: Optional[str]
    norm_dim: Optional[int]


def _largest(t):
    return 0.0 if t is None or t.numel() == 0 else t.max().item()


def _per_element(seg, like):
    """Per-segment values broadcast over the elements of ``like``."""
    return seg if seg.dim() == 0 else seg.reshape((-1,) + (1,) * (like.dim() - 1))


def segment_ratio(a, b, norm_dim):
    """||a_s|| / ||b_s|| per segment (1 where b_s is zero), in float64."""
    na, nb = reference.segment_norms(a, norm_dim), reference.segment_norms(b, norm_dim)
    return torch.where(nb > 0, na / torch.where(nb > 0, nb, 1.0), 1.0)


def norm_sum_allowance(length, dtype):
    """Relative error allowed on a norm summed from ``length`` squares in the
    kernel's accumulation type (float64 for float64 params, else float32): a
    sum whose additions are nested at most ``d`` deep is off by at most ``d``
    roundings, and blocked sums (blocks of ~sqrt(L), then the blocks) nest
    ~2 sqrt(L) deep; the square root halves it. Plus two roundings for the
    squares and the root."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (math.sqrt(length) + 2) * torch.finfo(acc).eps / 2


def assert_param_close(out, ref, dtype, what, norm, norm_dim, scale=0.0):
    """``out`` against the float64 reference ``ref`` with the one-step table.

    Under norm control each segment's elements share one factor r/n, and n is
    summed from the segment's L squares: its rounding, common to all L
    elements, grows with L past the table's per-element allowance (segments of
    millions of elements) although every element is right. So the factor is
    checked on its own: s = ||out_s|| / ||ref_s|| may differ from 1 by what
    the table allows the elements (summed over the segment) plus
    ``norm_sum_allowance``; then the elements must match ``ref_s * s`` within
    the table, as strictly as anywhere else."""
    if norm is not None and ref.numel() > 0:
        rtol, atol = TOLERANCE[dtype]
        finfo = torch.finfo(dtype)
        n_ref = reference.segment_norms(ref, norm_dim)
        length = ref.numel() // n_ref.numel()
        s = segment_ratio(out.detach().double(), ref, norm_dim)
        scale = max(scale, ref.abs().max().item())
        allowed = (rtol + math.sqrt(length) * (atol * scale + finfo.smallest_normal * finfo.eps) / n_ref
                   + norm_sum_allowance(length, dtype))
        off = torch.where(n_ref > 0, (s - 1).abs() - allowed, 0.0)
        assert off.max().item() <= 0, (
            f"{what}: a segment norm is {(s - 1).abs().max().item():.3e} off, relatively (segments of {length})")
        ref = ref * _per_element(s, ref)
    assert_close_dtype(out.detach(), ref.to(dtype), dtype, what, scale=scale)


def assert_matches(opt, params, expected, what):
    for i, p in enumerate(params):
        if p not in expected:
            continue
        e = expected[p]
        assert_param_close(p, e.param, p.dtype, f"{what} param {i}", e.norm, e.norm_dim, e.param_scale)
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if e.buf is None:
            assert buf is None, f"{what} param {i}: a buffer without momentum"
        else:
            assert buf is not None, f"{what} param {i}: no momentum buffer"
            assert buf.dtype == p.dtype and buf.shape == p.shape and buf.device == p.device
            assert_close_dtype(buf, e.buf.to(p.dtype), p.dtype, f"{what} buffer {i}", scale=e.buf_scale)


def step_and_check(opt, params, grads, what, scale=None):
    """Step with ``grads`` (``None``: that param has no grad this step; with
    ``scale``, the grads are scaled and ``opt.grad_scale`` must undo it) and
    compare every param and buffer with the reference; params without a grad,
    and the memory of every param, must stay as they were."""
    unscaled = {p: g.double() / scale if scale else g for p, g in zip(params, grads) if g is not None}
    expected = expected_step(opt, unscaled)
    untouched = {p: [p.detach().clone()] + [b.clone() for b in opt.state.get(p, {}).values()]
                 for p, g in zip(params, grads) if g is None}
    layout = [(p.data_ptr(), p.stride()) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert [(p.data_ptr(), p.stride()) for p in params] == layout, f"{what}: params were not stepped in place"
    assert_matches(opt, params, expected, what)
    for i, p in enumerate(params):
        if p in untouched:
            now = [p.detach()] + list(opt.state.get(p, {}).values())
            assert len(now) == len(untouched[p]) and all(torch.equal(a, b) for a, b in zip(now, untouched[p])), \
                f"{what} param {i} has no grad but it or its state changed"


def run_and_check(opt, params, steps, what):
    for step in range(steps):
        step_and_check(opt, params, device_grads(params, step), f"{what} step {step}")


# --------------------------------------------------------------------------- against the reference

# Shape lists for group_specs, which deals tensors round-robin to four groups:
# 0 fixed + Nesterov, 1 fixed per dim-0 slice + dampening + weight decay,
# 2 max (1.5) + maximize without momentum, 3 plain SGD + weight decay.
CASES = {
    "odd": [(7,), (33, 5), (3, 3, 3, 3), (1,), (5, 1, 1, 1), (129, 31), (1023,), (65537,), (257, 3)],
    "size_one_and_0d": [(1,), (), (1, 1), (), (), (1, 1, 1, 1), (1,), ()],
    # empty tensors between tensors of millions of elements, each spanning many
    # chunks; the second one's rows (per-row norms) span chunks too
    "empty_between_large": [(3_000_001,), (7, 500_001), (0,), (0, 4), (2_999_999,), (0,), (1531, 2003), (9,)],
    "transposed_and_sliced": [(31, 17, "t"), (600, 1001, "t"), (8, 9), (12, 10, "t"), (40, 33, "slice"),
                              (1000, 301, "t"), (5, 3, "slice")],
    "channels_last": [(16, 8, 3, 3, "cl"), (24, 5, 3, 3, "cl"), (32, 16, 1, 1, "cl"), (7, 3, 5, 5, "cl"),
                      (128, 64, 3, 3, "cl"), (64, 32, 3, 3, "cl")],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_by_step_against_reference(dtype, case, schedule):
    params = device_params(CASES[case], dtype)
    opt = make_opt(group_specs(params), lr=0.05)
    run_and_check(opt, params, 4, case)  # which also checks that each param keeps its strides


# Rows of very different lengths under norm_dim=0: 3, 70000 (spanning chunks),
# 27 (a conv filter), 5, 1 (a 1-D tensor: every element is a row) and a 0-d
# tensor (one segment), each kind of control with its own SGD settings.
ROW_GROUPS = [
    (dict(norm="fixed", norm_dim=0, momentum=0.9, nesterov=True),
     [(1000, 3), (64, 3, 3, 3), (3,), (2, 1_500_001)]),
    (dict(norm="max", norm_dim=0, target_norm=1.5, momentum=0.5, dampening=0.3, weight_decay=0.01),
     [(7, 70000), (1, 5), (), (129, 1), (1000, 3)]),
    (dict(norm="fixed", norm_dim=0, target_norm=2.0, maximize=True, lr=0.2),
     [(0, 7), (64, 3, 3, 3), (7, 70000)]),
    (dict(norm="max", momentum=0.9, weight_decay=0.05, maximize=True),
     [(1000, 3), (33,)]),
    (dict(momentum=0.9, dampening=0.5),
     [(7, 70000), (17, 3)]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_dim_0_rows_of_varied_lengths(dtype, schedule):
    groups, params = [], []
    for k, (spec, shapes) in enumerate(ROW_GROUPS):
        ps = device_params(shapes, dtype, seed=k)
        groups.append({**spec, "params": ps})
        params += ps
    opt = make_opt(groups, lr=0.05)
    run_and_check(opt, params, 4, "rows")


def test_many_tensors_and_dtypes_in_one_optimizer(schedule):
    """600 tensors, four groups, four dtypes mixed within each group: more than
    one launch's worth of per-tensor arguments in any chunked scheme."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 300, (600,), generator=gen).tolist()
    cols = torch.randint(1, 9, (600,), generator=gen).tolist()
    shapes = [(r, c) if i % 5 else ((r,) if i % 2 else ()) for i, (r, c) in enumerate(zip(rows, cols))]
    params = []
    for i, shape in enumerate(shapes):
        params += device_params([shape], DTYPES[(i // 5) % len(DTYPES)], seed=i)
    specs = group_specs(params)
    assert len(specs) == 4 and all(len({p.dtype for p in g["params"]}) == 4 for g in specs)
    opt = make_opt(specs, lr=0.1)
    run_and_check(opt, params, 3, "600 tensors")


def test_layout_changes_between_steps(schedule):
    """Params without a grad in some steps, a group added mid-training and a
    target changed: each step must use the tensors and settings of that step,
    not tables kept from an earlier one."""
    params = device_params([(300_001,), (40, 7), (0,), (9, 5), (1,), (77,)], torch.float32)
    opt = make_opt(group_specs(params), lr=0.05)
    run_and_check(opt, params, 2, "all grads")
    grads = device_grads(params, 2)
    step_and_check(opt, params, [g if i % 2 else None for i, g in enumerate(grads)], "odd grads only")
    step_and_check(opt, params, [None if i % 2 else g for i, g in enumerate(grads)], "even grads only")
    more = device_params([(1_000_003,), (6, 11)], torch.float32, seed=1)
    opt.add_param_group({"params": more, "norm": "fixed", "norm_dim": 0, "momentum": 0.9, "lr": 0.3})
    params += more
    run_and_check(opt, params, 2, "after add_param_group")
    opt.param_groups[2]["target_norm"] = 0.75
    opt.param_groups[0]["lr"] = 0.01
    run_and_check(opt, params, 1, "new target and lr")


# --------------------------------------------------------------------------- GradScaler's tensors and a tensor lr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_grad_scale_divides(dtype, schedule):
    """Grads scaled by 1000 (not a power of two, so the division really rounds)
    with opt.grad_scale = 1000: the same step as the reference on the unscaled
    float64 grads. Without the division the step would be 1000 times too large."""
    params = device_params(CASES["odd"], dtype)
    opt = make_opt(group_specs(params), lr=0.05)
    opt.grad_scale = torch.full((), 1000.0, device=DEVICE)
    opt.found_inf = torch.zeros((), device=DEVICE)
    for step in range(3):
        step_and_check(opt, params, device_grads(params, step, scale=1000.0), f"step {step}", scale=1000.0)


def test_found_inf_skips_everything(schedule):
    """A non-zero found_inf is a no-op: on the first step (no buffer may be
    created) and later (no param, buffer or recorded target may change); the
    steps after it continue as if the skipped ones never happened."""
    params = device_params(CASES["odd"] + [(2_000_003,)], torch.float32)
    opt = make_opt(group_specs(params), lr=0.05)
    opt.grad_scale = torch.full((), 4.0, device=DEVICE)
    opt.found_inf = torch.ones((), device=DEVICE)
    for p, g in zip(params, device_grads(params, 0)):
        p.grad = g
    before = snapshot(opt)
    opt.step()
    assert_unchanged(opt, before)
    assert not any("momentum_buffer" in opt.state.get(p, {}) for p in params)

    opt.found_inf.zero_()
    step_and_check(opt, params, device_grads(params, 1, scale=4.0), "first real step", scale=4.0)
    assert any("momentum_buffer" in opt.state[p] for p in params)

    opt.found_inf.fill_(3.0)  # GradScaler adds up the flags of several devices
    for p, g in zip(params, device_grads(params, 2, scale=4.0)):
        p.grad = g
    before = snapshot(opt)
    opt.step()
    assert_unchanged(opt, before)

    opt.found_inf.zero_()
    step_and_check(opt, params, device_grads(params, 3, scale=4.0), "after the skipped step", scale=4.0)


def test_tensor_lr_changed_in_place(schedule):
    """Two groups each hold a 0-d device tensor lr, edited with fill_ between
    steps (as a capturable scheduler does); the others keep a float lr. Every
    step must use the values the tensors hold at that step."""
    params = device_params(CASES["odd"] + [(300_001,)], torch.float32)
    specs = group_specs(params)
    lr_a, lr_b = torch.tensor(0.05, device=DEVICE), torch.tensor(0.1, device=DEVICE)
    specs[0]["lr"], specs[1]["lr"] = lr_a, lr_b
    opt = make_opt(specs, lr=0.02)
    for step, (a, b) in enumerate([(0.05, 0.1), (0.2, 0.1), (0.2, 0.0), (0.001, 0.3)]):
        lr_a.fill_(a)
        lr_b.fill_(b)
        step_and_check(opt, params, device_grads(params, step), f"step {step} (lr {a}, {b})")
    assert opt.param_groups[0]["lr"] is lr_a and opt.param_groups[1]["lr"] is lr_b


# --------------------------------------------------------------------------- determinism and size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_inputs_same_bits(dtype, schedule):
    """Three runs from the same inputs give bitwise the same params and buffers,
    with tensors of millions of elements whose norms are summed from many
    blocks' partials (whole tensor, and rows of 1223)."""
    shapes = [(5_000_011,), (4099, 1223), (0,), (77, 3), (2_000_003,), (33,)]
    runs = []
    start = device_params(shapes[:1], dtype)[0].detach()  # the same first draws
    for _ in range(3):
        params = device_params(shapes, dtype)
        opt = make_opt(group_specs(params), lr=0.5)
        for step in range(3):
            for p, g in zip(params, device_grads(params, step)):
                p.grad = g
            opt.step()
        bufs = [opt.state[p].get("momentum_buffer") for p in params]
        runs.append(([p.detach().clone() for p in params], [None if b is None else b.clone() for b in bufs]))
    first_params, first_bufs = runs[0]
    assert not torch.equal(first_params[0], start)  # it did step
    for run, (ps, bs) in enumerate(runs[1:], 1):
        for i, (a, b) in enumerate(zip(ps, first_params)):
            assert torch.equal(a, b), f"run {run} param {i} differs from run 0"
        for i, (a, b) in enumerate(zip(bs, first_bufs)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"run {run} buffer {i}"


# Above 2**31 elements, so 32-bit element offsets would wrap: a flat tensor
# with one norm, and rows whose last ones start beyond 2**31.
HUGE_NUMEL = 2**31 + 1029
HUGE_ROWS = (1_048_583, 2049)  # 2**31 + 1_062_919 elements
HUGE_CHUNK = 2**26  # elements per slice of the float64 reference
HUGE_GIB = 60  # device memory the test needs free (5 bfloat16 copies of each tensor, float64 slices)


def _chunks(t, size):
    flat = t.view(-1)
    return [flat[i:i + size] for i in range(0, flat.numel(), size)]


@pytest.mark.slow
@cuda_only
def test_more_than_2_31_elements(schedule):
    """bfloat16 tensors of more than 2**31 elements with norm control "fixed":
    after a step with running momentum, the norms are on target and every
    element (compared slice by slice) equals the float64 reference."""
    if DEVICE == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if free < HUGE_GIB * 2**30:
            pytest.skip(f"needs {HUGE_GIB} GiB of free device memory, {free / 2**30:.0f} GiB free")
    assert HUGE_NUMEL > 2**31 and math.prod(HUGE_ROWS) > 2**31
    dtype = torch.bfloat16
    gen = torch.Generator(DEVICE).manual_seed(31)
    flat = torch.randn(HUGE_NUMEL, generator=gen, device=DEVICE, dtype=dtype).requires_grad_()
    rows = torch.randn(HUGE_ROWS, generator=gen, device=DEVICE, dtype=dtype).requires_grad_()
    lr, mu, tau, flat_target, row_target = 0.1, 0.9, 0.1, 1000.0, 2.0
    opt = make_opt([{"params": [flat], "norm": "fixed", "target_norm": flat_target, "dampening": tau},
                    {"params": [rows], "norm": "fixed", "norm_dim": 0, "target_norm": row_target,
                     "nesterov": True}], lr=lr, momentum=mu)
    width = HUGE_ROWS[1]
    block = (HUGE_CHUNK // width) * width  # whole rows

    def flat_norm():
        return math.sqrt(sum(c.double().square().sum().item() for c in _chunks(flat.detach(), HUGE_CHUNK)))

    def check_norms(when):
        # rounding each element to bfloat16 moves a norm by at most eps/2, relatively
        u = torch.finfo(dtype).eps / 2
        n = flat_norm()
        assert abs(n / flat_target - 1) <= u + norm_sum_allowance(HUGE_NUMEL, dtype), f"{when}: norm {n}"
        for b in _chunks(rows.detach(), block):
            norms = torch.linalg.vector_norm(b.view(-1, width).double(), dim=1)
            worst = (norms / row_target - 1).abs().max().item()
            assert worst <= u + norm_sum_allowance(width, dtype), f"{when}: a row norm is {worst:.3e} off"

    for p in (flat, rows):
        p.grad = torch.randn(p.shape, generator=gen, device=DEVICE, dtype=dtype)
    opt.step()  # creates the buffers
    check_norms("step 0")

    before = {p: (p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in (flat, rows)}
    for p in (flat, rows):
        p.grad.normal_(generator=gen)
    opt.step()
    check_norms("step 1")

    # flat: one norm over all its elements, so two passes over float64 slices:
    # the sum of squares of the updated values, then each slice scaled.
    p0, b0 = before[flat]
    slices = list(zip(_chunks(p0, HUGE_CHUNK), _chunks(b0, HUGE_CHUNK), _chunks(flat.grad, HUGE_CHUNK),
                      _chunks(flat.detach(), HUGE_CHUNK), _chunks(opt.state[flat]["momentum_buffer"], HUGE_CHUNK)))

    def sgd_slice(p_, b_, g_):
        p64 = p_.double()
        b64 = reference.fixnorm_step_one(p64, g_, b_.double(), lr=lr, momentum=mu, dampening=tau)
        return p64, b64

    sq = 0.0
    for k, (p_, b_, g_, _, out_b) in enumerate(slices):
        p64, b64 = sgd_slice(p_, b_, g_)
        sq += p64.square().sum().item()
        assert_close_dtype(out_b, b64.to(dtype), dtype, f"flat buffer slice {k}")
    # As in assert_param_close: the reference's factor target / ||u|| times the
    # kernel's own ratio ||out|| / target (checked by check_norms), so the
    # elements are held to the table apart from the common factor.
    factor = flat_norm() / math.sqrt(sq)
    for k, (p_, b_, g_, out_p, _) in enumerate(slices):
        p64, _ = sgd_slice(p_, b_, g_)
        assert_close_dtype(out_p, (p64 * factor).to(dtype), dtype, f"flat param slice {k}")
    del before[flat], slices

    # rows: each row is its own segment, so blocks of whole rows are independent.
    p0, b0 = before[rows]
    target = torch.tensor(row_target, dtype=torch.float64, device=DEVICE)
    for k, (p_, b_, g_, out_p, out_b) in enumerate(zip(
            _chunks(p0, block), _chunks(b0, block), _chunks(rows.grad, block), _chunks(rows.detach(), block),
            _chunks(opt.state[rows]["momentum_buffer"], block))):
        p64 = p_.view(-1, width).double()
        b64 = reference.fixnorm_step_one(p64, g_.view(-1, width), b_.view(-1, width).double(), lr=lr, momentum=mu,
                                         nesterov=True, norm="fixed", target=target, norm_dim=0)
        assert_param_close(out_p.view(-1, width), p64, dtype, f"rows param block {k}", "fixed", 0)
        assert_close_dtype(out_b.view(-1, width), b64.to(dtype), dtype, f"rows buffer block {k}")


# --------------------------------------------------------------------------- CUDA graphs, launches, syncs


def _graph_params(seed):
    return (device_params([(1_000_003,), (300, 129), (0,), (7,), (17, 33), (64, 3, 3, 3, "cl")], torch.float32,
                          seed=seed)
            + device_params([(70001,), (5, 3), ()], torch.bfloat16, seed=seed + 1))


@cuda_only
@pytest.mark.parametrize("variant", ["float_lr", "tensor_lr", "grad_scaler"])
def test_graph_replay_equals_eager_steps(variant, schedule):
    """step() captured once in a CUDA graph and replayed N times, with new
    grads (and lr, and GradScaler flags) copied into the captured tensors
    before each replay, equals N eager steps of an identical optimizer.

    Bitwise: a replay launches the kernels that the eager step launches, with
    the same arguments on the same data, and the kernels are deterministic
    (test_same_inputs_same_bits), so there is no rounding to differ in."""
    graphed, eager = _graph_params(0), _graph_params(0)

    def build(params):
        lr = 0.05 if variant == "float_lr" else torch.tensor(0.05, device=DEVICE)
        opt = make_opt(group_specs(params), lr=lr)
        if variant == "grad_scaler":
            opt.grad_scale = torch.full((), 1024.0, device=DEVICE)
            opt.found_inf = torch.zeros((), device=DEVICE)
        return opt

    opt_g, opt_e = build(graphed), build(eager)
    lrs = [0.05, 0.05, 0.05, 0.2, 0.01, 0.1, 0.3]
    skips = [0, 0, 0, 0, 1, 0, 0]

    def prepare(opt, params, step):
        grads = device_grads(params, step, scale=1024.0 if variant == "grad_scaler" else 1.0)
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        if variant != "float_lr":
            opt.param_groups[0]["lr"].fill_(lrs[step])
        if variant == "grad_scaler":
            opt.found_inf.fill_(float(skips[step]))

    warmup = 3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(warmup):
            prepare(opt_g, graphed, step)
            opt_g.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for step in range(warmup):
        prepare(opt_e, eager, step)
        opt_e.step()
    torch.cuda.synchronize()
    after_warmup = [p.detach().clone() for p in graphed]

    for step in range(warmup, len(lrs)):
        prepare(opt_g, graphed, step)
        graph.replay()
        prepare(opt_e, eager, step)
        opt_e.step()
    torch.cuda.synchronize()
    assert not torch.equal(graphed[0].detach(), after_warmup[0]), "the replays did not step"
    for i, (p, q) in enumerate(zip(graphed, eager)):
        assert torch.equal(p.detach(), q.detach()), f"param {i}: replay differs from eager"
        bp, bq = opt_g.state[p].get("momentum_buffer"), opt_e.state[q].get("momentum_buffer")
        assert (bp is None) == (bq is None) and (bp is None or torch.equal(bp, bq)), f"buffer {i}"


def _kernels_in_one_step(opt, params):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for p, g in zip(params, device_grads(params, 1)):
        p.grad = g
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]


@cuda_only
def test_launches_per_step_do_not_grow_with_tensors(schedule):
    """A steady-state step of 10 and of 600 tensors (four groups, every kind
    of norm control) launches the same kernels: at most 3 of fixnorm's, and
    nothing else per tensor."""
    launches = {}
    for n in (10, 600):
        gen = torch.Generator().manual_seed(n)
        sizes = torch.randint(1, 5000, (n,), generator=gen).tolist()
        params = device_params([(s,) if i % 3 else (s // 7 + 1, 7) for i, s in enumerate(sizes)], torch.float32)
        opt = make_opt(group_specs(params), lr=0.1)
        for p, g in zip(params, device_grads(params, 0)):
            p.grad = g
        opt.step()  # the first step builds tables and buffers
        launches[n] = _kernels_in_one_step(opt, params)
    ours = {n: [k for k in names if "fixnorm" in k.lower()] for n, names in launches.items()}
    assert 1 <= len(ours[10]) <= 3, launches[10]
    assert len(ours[600]) == len(ours[10]), (ours[10], ours[600])
    assert len(launches[600]) == len(launches[10]), (launches[10], launches[600])


@cuda_only
@pytest.mark.parametrize("variant", ["float_lr", "float_lr_changed", "tensor_lr", "grad_scaler"])
def test_no_host_sync_inside_step(variant, schedule):
    """A steady-state step runs with CUDA's sync debug mode set to "error":
    no .item(), no blocking copy to or from the host, whether lr is a float
    (changed since the last step, as a scheduler does, or not), a device
    tensor, or GradScaler's grad_scale / found_inf are set."""
    params = device_params(CASES["odd"] + [(1_000_003,)], torch.float32)
    lr = 0.05 if variant.startswith("float") else torch.tensor(0.05, device=DEVICE)
    opt = make_opt(group_specs(params), lr=lr)
    if variant == "grad_scaler":
        opt.grad_scale = torch.full((), 8.0, device=DEVICE)
        opt.found_inf = torch.zeros((), device=DEVICE)
    scale = 8.0 if variant == "grad_scaler" else None
    for step in range(2):
        step_and_check(opt, params, device_grads(params, step, scale=scale or 1.0), f"step {step}", scale=scale)
    if variant == "float_lr_changed":
        for group in opt.param_groups:
            group["lr"] = 0.03
    grads = device_grads(params, 2, scale=scale or 1.0)
    expected = expected_step(opt, {p: g.double() / scale if scale else g for p, g in zip(params, grads)})
    for p, g in zip(params, grads):
        p.grad = g
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches(opt, params, expected, "step under sync debug mode")


# --------------------------------------------------------------------------- checkpoints and the op itself


def test_checkpoint_loaded_with_map_location_cpu_moves_to_the_params_device():
    """A checkpoint read with map_location="cpu" (every state tensor on the
    CPU) loaded into an optimizer whose params live on DEVICE: the buffers and
    recorded targets go to the params' device, and training continues
    bitwise as if never interrupted."""
    import io

    params = device_params([(40, 3), (17,), (5, 6), (9,)], torch.float32)
    opt = make_opt(group_specs(params), lr=0.05)
    for step in range(2):
        step_grads(params, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu")
    assert all(v.device.type == "cpu" for s in saved["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor))
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = make_opt(group_specs(twins), lr=0.05)
    resumed.load_state_dict(saved)
    for p, q in zip(params, twins):
        mine, theirs = resumed.state.get(q, {}), opt.state.get(p, {})
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            assert value.device == q.device, f"{key} on {value.device}"
            assert torch.equal(value, theirs[key]), key
    for step in range(2, 4):
        step_grads(params, step)
        step_grads(twins, step)
        opt.step()
        resumed.step()
    for i, (p, q) in enumerate(zip(params, twins)):
        assert torch.equal(p, q), f"param {i}"


def step_grads(params, step):
    for p, g in zip(params, device_grads(params, step)):
        p.grad = g


@cuda_only
@pytest.mark.parametrize("with_scaler", [False, True])
def test_opcheck_of_the_cuda_kernel(with_scaler):
    """torch.library.opcheck on the op's CUDA kernel, with the tables the
    cuda backend builds (schema, fake kernel, aliasing, torch.compile)."""
    from fixnorm_ext import dispatch

    params = device_params([(7,), (33, 5), (300,), (4, 45)], torch.float32)
    groups = [dispatch.GroupHyper(0.1, 0.9, 0.0, 0.0, False, False, "fixed", None),
              dispatch.GroupHyper(0.05, 0.9, 0.0, 0.01, True, False, "fixed", 0),
              dispatch.GroupHyper(0.1, 0.0, 0.0, 0.0, False, False, None, None)]
    group_index, targets = [0, 1, 2, 0], [2.0, 1.5, None, 3.0]
    grads = device_grads(params, 0)
    bufs = [torch.randn_like(p) if groups[gi].momentum else None for p, gi in zip(params, group_index)]
    workspace: dict = {}
    plan, _, _ = dispatch._make_plan(params, group_index, groups, params[0].device)
    meta = dispatch.build_meta(params, bufs, group_index=group_index, groups=groups)
    device_targets = dispatch._device_targets(params, group_index, groups, targets, params[0].device, workspace, 0)
    hparams = dispatch._cuda_hparams(groups, params[0].device, workspace)
    scale = torch.tensor(4.0, device=DEVICE) if with_scaler else None
    found = torch.tensor(0.0, device=DEVICE) if with_scaler else None
    torch.library.opcheck(torch.ops.fixnorm_ext.fixnorm_step.default,
                          (params, grads, [b for b in bufs if b is not None], hparams, meta, device_targets, plan,
                           scale, found))
