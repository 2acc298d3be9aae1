"""Every backend against fixnorm_ext.reference (the float64 oracle).

Two kinds of comparison:

* step by step: before each step the backend's current params and buffers are
  upcast to float64 and the reference takes the same step; the backend's result
  must equal the reference result within the tolerance of one step below;
* free running over several steps for float64 and float32, where rounding can
  only accumulate slowly.

Tolerance of one step, by parameter dtype (|out - ref| <= rtol*|ref| + atol*scale
+ ulp0, scale = the largest |ref| of the tensor, so values produced by
cancellation are judged against the size of what cancelled, and ulp0 = the
spacing of the dtype's subnormal numbers, where one ulp is absolute):

dtype     rtol        atol        why
float64   8 eps64     8 eps64     float64 math, a different order of the same operations
float32   4 eps32     4 eps32     float32 math rounds each of a handful of operations
bfloat16  1 eps_bf16  4 eps32     float32 math, rounded once to bfloat16: the only gap to the
                                  rounded float64 result is a tie broken the other way, one ulp
float16   1 eps_fp16  4 eps32     as bfloat16
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from fixnorm_ext import FusedFixNorm, available_backends, reference

BACKENDS = [name for name, why in available_backends("cpu").items() if why is None]
# On CPU tensors Triton runs in its interpreter, thousands of times slower than
# compiled code: there it takes only the small cases below (BACKENDS), not the
# large or long ones (LARGE_CASE_BACKENDS); tests/test_triton*.py cover it on
# small sizes. With a GPU, its tests run compiled on CUDA tensors instead.
LARGE_CASE_BACKENDS = [name for name in BACKENDS if name != "triton"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps
TOLERANCE = {  # dtype: (rtol, atol relative to the tensor's scale)
    torch.float64: (8 * torch.finfo(torch.float64).eps, 8 * torch.finfo(torch.float64).eps),
    torch.float32: (4 * EPS32, 4 * EPS32),
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps, 4 * EPS32),
    torch.float16: (torch.finfo(torch.float16).eps, 4 * EPS32),
}


def test_cpu_backend_is_built():
    # CI builds the extension; a silently missing cpu backend would skip half of this file.
    assert "cpu" in BACKENDS, available_backends("cpu")["cpu"]


def assert_close_dtype(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 0.0):
    """``out`` within one step's tolerance of ``ref`` (see the table above).
    ``scale``: the size of the values combined into ``ref``, where ``ref`` is
    too small a tensor to show it (one element made by cancellation); the
    scale used is never below ``ref``'s largest |value|."""
    rtol, atol = TOLERANCE[dtype]
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        assert out.numel() == 0
        return
    scale = max(ref.abs().max().item(), scale)
    err = (out - ref).abs()
    finfo = torch.finfo(dtype)
    bound = rtol * ref.abs() + atol * scale + finfo.smallest_normal * finfo.eps
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3e} exceeds tolerance (scale {scale:.3e}, {dtype})"


# Parameter sets: lists of (shape, strided) where strided parameters are
# transposed views, so not contiguous.
SHAPES = {
    "odd": [(7,), (33, 5), (3, 3, 3, 3), (1,), (5, 1, 1, 1)],
    # empty tensors between tensors large enough to span several work items and buckets
    "empty_between_large": [(140001,), (0,), (3, 20001), (0, 4), (70003,), (0,), (9,)],
    "size_one": [(1,), (1, 1), ()],
    "strided": [(31, 17, "t"), (8, 9), (12, 10, "t")],
}


def make_params(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        if shape and shape[-1] == "t":
            base = torch.randn(shape[1], shape[0], generator=gen, dtype=torch.float64)
            p = base.to(dtype).t().detach().requires_grad_()
            assert not p.is_contiguous()
        else:
            p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        params.append(p)
    return params


def group_specs(params):
    """Mixed groups: fixed whole-tensor, fixed per row, max, none, with different SGD settings."""
    n = len(params)
    idx = list(range(n))
    chunks = [idx[i::4] for i in range(4)]
    specs = [
        dict(norm="fixed", momentum=0.9, nesterov=True),
        dict(norm="fixed", norm_dim=0, momentum=0.9, dampening=0.1, weight_decay=0.01),
        dict(norm="max", target_norm=1.5, momentum=0.0, maximize=True),
        dict(norm=None, momentum=0.5, weight_decay=0.1),
    ]
    return [{**spec, "params": [params[i] for i in chunk]} for spec, chunk in zip(specs, chunks) if chunk]


def make_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return [(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype) for p in params]


def reference_step(opt: FusedFixNorm, params, grads):
    """Float64 results of one reference step from the optimizer's current state."""
    results = {}
    for group in opt.param_groups:
        for p in group["params"]:
            i = next(k for k, q in enumerate(params) if q is p)
            buf = opt.state[p].get("momentum_buffer") if group["momentum"] != 0 else None
            target = None
            if group["norm"] is not None:
                target = (torch.tensor(float(group["target_norm"]), dtype=torch.float64)
                          if group["target_norm"] is not None else opt.state[p]["target_norm"])
            p64 = p.detach().double().clone()
            buf64 = None if buf is None else buf.double().clone()
            new_buf = reference.fixnorm_step_one(
                p64, grads[i].double(), buf64, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                maximize=group["maximize"], norm=group["norm"], target=target, norm_dim=group["norm_dim"])
            results[i] = (p64, new_buf)
    return results


def check_steps_against_reference(opt, params, steps, what):
    """Take ``steps`` steps; after each, every param and momentum buffer must
    equal one float64 reference step from the state before it."""
    for step in range(steps):
        grads = make_grads(params, step)
        expected = reference_step(opt, params, grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, (p64, buf64) in expected.items():
            p = params[i]
            assert_close_dtype(p.detach(), p64.to(p.dtype), p.dtype, f"{what} step {step} param {i}")
            buf = opt.state[p].get("momentum_buffer")
            if buf64 is None:
                assert buf is None
            else:
                assert buf.dtype == p.dtype and buf.shape == p.shape
                assert_close_dtype(buf, buf64.to(p.dtype), p.dtype, f"{what} step {step} buffer {i}")


@pytest.mark.parametrize("backend", LARGE_CASE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
def test_step_by_step_against_reference(backend, dtype, case):
    params = make_params(SHAPES[case], dtype)
    opt = FusedFixNorm(group_specs(params), lr=0.05, backend=backend)
    check_steps_against_reference(opt, params, 5, case)


@pytest.mark.parametrize("backend", LARGE_CASE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_free_running_against_reference(backend, dtype):
    """Five steps without resynchronising: float64 stays tight, float32 within
    five steps' worth of float32 rounding."""
    shapes = SHAPES["odd"] + SHAPES["empty_between_large"]
    params = make_params(shapes, dtype)
    oracle = make_params(shapes, torch.float64)
    opt = FusedFixNorm(group_specs(params), lr=0.05, backend=backend)
    ref = FusedFixNorm(group_specs(oracle), lr=0.05, backend="reference")
    for step in range(5):
        for p, q, g in zip(params, oracle, make_grads(params, step)):
            p.grad, q.grad = g.to(dtype), g.to(torch.float64)
        opt.step()
        ref.step()
    rtol, atol = TOLERANCE[dtype]
    for i, (p, q) in enumerate(zip(params, oracle)):
        scale = q.abs().max().item() if q.numel() else 0.0
        err = (p.double() - q).abs()
        assert (err <= 5 * (rtol * q.abs() + atol * scale)).all(), f"param {i}: {err.max().item():.3e}"


@pytest.mark.parametrize("backend", LARGE_CASE_BACKENDS)
def test_many_tensors_mixed_groups(backend):
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 400, (240,), generator=gen).tolist()
    params = [torch.randn(s, 3, generator=gen).requires_grad_() for s in sizes]
    opt = FusedFixNorm(group_specs(params), lr=0.1, backend=backend)
    check_steps_against_reference(opt, params, 5, "240 tensors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_optimizer(backend):
    params = make_params([(40, 3), (17,)], torch.float32) + make_params([(40, 3), (17,)], torch.bfloat16, seed=1)
    opt = FusedFixNorm(group_specs(params), lr=0.05, backend=backend)
    check_steps_against_reference(opt, params, 3, "float32 + bfloat16")


@pytest.mark.parametrize("backend", LARGE_CASE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fixed_norm_does_not_drift(backend, dtype):
    """1000 steps with large random gradients: each fixed tensor stays on its
    target within float32 rounding (the norm is re-imposed every step, so
    errors cannot accumulate), and a clamped tensor never exceeds its bound."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 3, 3, 3, generator=gen, dtype=dtype).requires_grad_()
    rows = torch.randn(20, 50, generator=gen, dtype=dtype).requires_grad_()
    fc = torch.randn(10, 64, generator=gen, dtype=dtype).requires_grad_()
    opt = FusedFixNorm([
        {"params": [w], "norm": "fixed"},
        {"params": [rows], "norm": "fixed", "norm_dim": 0, "target_norm": 2.0},
        {"params": [fc], "norm": "max", "target_norm": 3.0},
    ], lr=0.5, momentum=0.9, backend=backend)
    w_target = w.detach().double().norm().item()
    steps = 1000 if backend != "reference" else 200
    for step in range(steps):
        for p in (w, rows, fc):
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    tol = 4 * EPS32
    assert abs(w.detach().double().norm().item() / w_target - 1) <= tol
    row_norms = rows.detach().double().norm(dim=1)
    assert ((row_norms / 2.0 - 1).abs() <= tol).all()
    assert fc.detach().double().norm().item() <= 3.0 * (1 + tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_segment_stays_finite(backend):
    """A segment whose updated weights are exactly zero is left at zero (no 0/0)."""
    p = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).requires_grad_()
    q = torch.tensor([0.5, -0.25]).requires_grad_()
    opt = FusedFixNorm([{"params": [p], "norm": "fixed", "norm_dim": 0, "target_norm": 1.0},
                        {"params": [q], "norm": "fixed", "target_norm": 2.0}], lr=1.0, backend=backend)
    p.grad = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # row 0 becomes exactly zero
    q.grad = q.detach().clone()                       # q becomes exactly zero
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    assert p[0].abs().sum() == 0 and q.abs().sum() == 0
    expected_row = torch.tensor([3.0, 3.0]) / math.sqrt(18.0)
    torch.testing.assert_close(p[1].detach(), expected_row)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbound_clamp_is_plain_sgd(backend):
    """A "max" bound far above the weights' norm leaves the step exactly SGD."""
    params = make_params([(50, 7), (13,)], torch.float32)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedFixNorm(params, lr=0.1, momentum=0.9, norm="max", target_norm=1e6, backend=backend)
    plain = FusedFixNorm(twins, lr=0.1, momentum=0.9, backend=backend)
    for step in range(3):
        for p, q, g in zip(params, twins, make_grads(params, step)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        plain.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_backend_is_deterministic_across_thread_counts(dtype):
    """Same bits for 1 and 2 threads, run after run. Many buckets of
    norm-controlled tensors, so that threads hand buckets (and, in low
    precision, the shared scratch buffer) over to each other many times."""
    if "cpu" not in BACKENDS:
        pytest.skip(available_backends("cpu")["cpu"])
    shapes = [(300001,), (64, 3000), (0,), (77,)] + [(70001,)] * 24
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads), 1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            params = make_params(shapes, dtype)
            opt = FusedFixNorm(group_specs(params), lr=0.5, backend="cpu")
            for step in range(3):
                for p, g in zip(params, make_grads(params, step)):
                    p.grad = g
                opt.step()
            results.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(threads)
    for run in results[1:]:
        for a, b in zip(results[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_parameters(backend, dtype):
    """channels_last conv weights with channels_last grads (what autograd
    gives them), whole-tensor and per-filter norms: same results as the
    reference, and the params keep their layout."""
    gen = torch.Generator().manual_seed(11)

    def conv_weight(shape):
        w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        return w.to(memory_format=torch.channels_last).requires_grad_()

    params = [conv_weight((16, 8, 3, 3)), conv_weight((32, 16, 1, 1)), conv_weight((24, 5, 3, 3)),
              conv_weight((7, 3, 5, 5))]
    opt = FusedFixNorm(group_specs(params), lr=0.05, backend=backend)
    for step in range(4):
        grads = [g.to(memory_format=torch.channels_last) for g in make_grads(params, step)]
        expected = reference_step(opt, params, grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, (p64, _) in expected.items():
            assert params[i].is_contiguous(memory_format=torch.channels_last)
            assert_close_dtype(params[i].detach(), p64.to(dtype), dtype, f"step {step} param {i}")


@pytest.mark.skipif("cpu" not in BACKENDS, reason=str(available_backends("cpu")["cpu"]))
def test_generic_float32_loops_without_the_avx2_path():
    """Where the CPU has AVX2, float32 with a running buffer takes a
    hand-written loop; run the float32 and float64 cpu cases once more with it
    switched off, so the generic loops are checked on this machine too."""
    env = {**os.environ, "FIXNORM_CPU_GENERIC": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "cpu and (float32 or float64) and not generic"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, norm_dim", [("fixed", None), ("max", None), ("fixed", 0)])
def test_nan_norm_gives_nan_as_the_reference(backend, mode, norm_dim):
    # A NaN in a segment makes its norm NaN: the factor is NaN (r/n), never 1,
    # so the whole segment turns NaN as in the reference; other segments are untouched.
    p = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    opt = FusedFixNorm([p], lr=0.1, norm=mode, target_norm=0.5, norm_dim=norm_dim, backend=backend)
    grad = torch.ones(3, 4)
    grad[0, 1] = float("nan")
    p.grad = grad
    expected = p.detach().clone()
    reference.fixnorm_step_one(expected, grad, None, lr=0.1, norm=mode, target=torch.tensor(0.5, dtype=torch.float64),
                               norm_dim=norm_dim)
    opt.step()
    assert torch.equal(torch.isnan(p), torch.isnan(expected))
    assert bool(torch.isnan(p[0]).all())
    assert torch.isnan(p[1:]).any().item() == (norm_dim is None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_step_skips_buffers_of_tensors_without_momentum(backend):
    # The functional entry point may be handed a buffer for a tensor whose
    # group has no momentum: it must be left alone, and every other tensor
    # must still be paired with its own buffer.
    from fixnorm_ext.dispatch import GroupHyper, fixnorm_step

    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    grads = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    bufs = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    groups = [GroupHyper(0.1, 0.0, 0.0, 0.0, False, False, None, None),
              GroupHyper(0.1, 0.9, 0.0, 0.0, False, False, "fixed", None)]
    group_index = [0, 1, 1]
    targets = [None, 2.0, 3.0]
    expected_p = [p.double() for p in params]
    expected_b = [b.double() for b in bufs]
    for k in range(3):
        h = groups[group_index[k]]
        new = reference.fixnorm_step_one(
            expected_p[k], grads[k].double(), expected_b[k] if h.momentum else None, lr=h.lr, momentum=h.momentum,
            norm=h.norm, target=None if targets[k] is None else torch.tensor(targets[k], dtype=torch.float64))
        if h.momentum:
            expected_b[k] = new
    untouched = bufs[0].clone()
    out = fixnorm_step(params, grads, bufs, group_index=group_index, groups=groups, targets=targets,
                       backend=backend)
    assert torch.equal(bufs[0], untouched)
    for k in range(3):
        assert_close_dtype(params[k], expected_p[k], torch.float32, f"param {k}")
    for k in (1, 2):
        assert_close_dtype(out[k], expected_b[k], torch.float32, f"buffer {k}")
