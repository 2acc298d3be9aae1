"""Attacks on FusedFixNorm from every side: corrupt state refused before any
write, 10,000-step runs, determinism, non-finite gradients, a tensor of more
than 2**31 elements (opt-in), and the failure classes known from other fused
and multi-tensor optimizers. (Random inputs against the reference are in
tests/test_properties.py; bad gradients and hyperparameters in
tests/test_optimizer.py; GradScaler, checkpoints and lr changes in
tests/test_integration.py and, on a GPU, tests/test_cuda.py.)
"""
import math
import os

import pytest
import torch

from fixnorm_ext import FusedFixNorm, available_backends, reference
from test_backends import BACKENDS, assert_close_dtype, reference_step
from test_optimizer import assert_unchanged, snapshot

EPS32 = torch.finfo(torch.float32).eps
FUSED = [b for b in BACKENDS if b != "reference"]  # the reference is the oracle; "cpu", "foreach" (and "triton")
# The interpreter runs Triton thousands of times slower: not for 10,000 steps.
LONG_RUN = [b for b in FUSED if b != "triton"]


# --------------------------------------------------------------------------- failure atomicity

def _three_groups(backend, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in [(5, 4), (7,), (3, 2, 2), (6,)]]
    opt = FusedFixNorm([{"params": ps[:2], "norm": "fixed"}, {"params": ps[2:3], "norm": "max", "target_norm": 1.0},
                        {"params": ps[3:]}], lr=0.1, momentum=0.9, backend=backend)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    opt.step()
    return ps, opt


CORRUPT_BUFFERS = {
    "shape": lambda b: torch.zeros(b.numel() + 1, dtype=b.dtype),
    "dtype": lambda b: b.double(),
    "not a tensor": lambda b: b.tolist(),
}


@pytest.mark.parametrize("where", [0, 2, 3], ids=["first", "middle", "last"])
@pytest.mark.parametrize("corrupt", list(CORRUPT_BUFFERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_momentum_buffer_is_refused_before_any_write(backend, corrupt, where):
    """A state edited by hand (or from another model's checkpoint) with a
    buffer that does not fit its parameter: a clear error, and the tensors
    listed before it are not stepped either."""
    ps, opt = _three_groups(backend)
    state = opt.state[ps[where]]
    state["momentum_buffer"] = CORRUPT_BUFFERS[corrupt](state["momentum_buffer"])
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"momentum_buffer in the state of a parameter .* must be a tensor of"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_buffer_is_accepted(backend):
    # Not an error: a buffer with other strides than its parameter (a state
    # built by hand) is stepped as SGD would, through a copy where needed.
    ps, opt = _three_groups(backend)
    twin_ps, twin = _three_groups(backend)
    buf = opt.state[ps[0]]["momentum_buffer"]
    opt.state[ps[0]]["momentum_buffer"] = buf.t().contiguous().t()
    for p, q in zip(ps, twin_ps):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    twin.step()
    for p, q in zip(ps, twin_ps):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- long runs

def _long_run_model(dtype, backend):
    gen = torch.Generator().manual_seed(5)

    def draw(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    conv, rows, fc, bias = draw(32, 3, 3, 3), draw(20, 50), draw(10, 64), draw(10)
    opt = FusedFixNorm([{"params": [conv], "norm": "fixed"},
                        {"params": [rows], "norm": "fixed", "norm_dim": 0, "target_norm": 2.0},
                        {"params": [fc], "norm": "max", "target_norm": 3.0},
                        {"params": [bias]}], lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    return [conv, rows, fc, bias], opt


def test_ten_thousand_steps_keep_the_norms_and_do_not_drift():
    """10,000 steps with random gradients (independent of the weights, so no
    chaos can amplify rounding), float32 on every fused backend next to the
    same run in float64. Checked every 1,000 steps:

    - each fixed tensor (and each fixed row) within 1e-6 relative of its
      target, the clamped classifier at most 1e-6 relative above its bound:
      the norm is re-imposed every step, so errors cannot accumulate;
    - every backend within 2e-5 (of the largest |weight|) of the float64 run:
      each step adds a few float32 roundings that nothing amplifies (the
      rescale is non-expansive), so they add up as a random walk,
      ~ eps32 * sqrt(steps) = 6e-6; measured 2.6e-6 at most.
    """
    runs = {backend: _long_run_model(torch.float32, backend) for backend in LONG_RUN}
    exact, exact_opt = _long_run_model(torch.float64, "foreach")
    conv_target = exact[0].detach().norm().item()
    gen = torch.Generator().manual_seed(9)
    for step in range(1, 10_001):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in exact]
        for p, g in zip(exact, grads):
            p.grad = g
        exact_opt.step()
        for ps, opt in runs.values():
            for p, g in zip(ps, grads):
                p.grad = g.float()
            opt.step()
        if step % 1000:
            continue
        for backend, (ps, _) in runs.items():
            conv, rows, fc, _ = (p.detach().double() for p in ps)
            what = f"{backend}, step {step}"
            assert abs(conv.norm().item() / conv_target - 1) <= 1e-6, what
            assert ((rows.norm(dim=1) / 2.0 - 1).abs() <= 1e-6).all(), what
            assert fc.norm().item() <= 3.0 * (1 + 1e-6), what
            for i, (p, q) in enumerate(zip(ps, exact)):
                drift = ((p.detach().double() - q.detach()).abs().max() / q.detach().abs().max()).item()
                assert drift <= 2e-5, f"{what}: param {i} drifted {drift:.2e} from the float64 run"


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_same_inputs_give_the_same_bits(backend, dtype):
    """Two optimizers from the same inputs, several steps: bitwise equal
    params and buffers (the cpu backend across thread counts: test_backends)."""
    def run():
        ps, opt = _three_groups(backend, dtype)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return ps, opt

    (ps, opt), (qs, other) = run(), run()
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert torch.equal(p, q), f"param {i}"
        assert torch.equal(opt.state[p]["momentum_buffer"], other.state[q]["momentum_buffer"]), f"buffer {i}"


# --------------------------------------------------------------------------- non-finite gradients

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_gradient_without_a_scaler(backend, bad):
    """Without a GradScaler nothing is skipped, as in SGD: with norm control
    off the step is SGD's (the bad element turns inf/NaN, its buffer too, the
    rest is stepped). Under norm control the factor of a segment is r/n
    (fixed) or min(1, r/n) (max): an infinite norm gives 0, so the segment's
    finite elements become 0 and the infinite one NaN (inf * 0); a NaN norm
    makes the whole segment NaN, as does any NaN left in its weights on the
    next step. Other segments are stepped as usual."""
    gen = torch.Generator().manual_seed(1)
    plain, rows, whole = (torch.randn(shape, generator=gen).requires_grad_() for shape in [(4, 5), (3, 4), (6,)])
    twin = plain.detach().clone().requires_grad_()
    opt = FusedFixNorm([{"params": [plain]}, {"params": [rows], "norm": "fixed", "norm_dim": 0},
                        {"params": [whole], "norm": "max", "target_norm": 0.5}], lr=0.1, momentum=0.9,
                       backend=backend)
    sgd = torch.optim.SGD([twin], lr=0.1, momentum=0.9)
    rows_before = rows.detach().clone()
    for step in range(2):
        for p in (plain, rows, whole, twin):
            p.grad = torch.ones_like(p)
        for p in (plain, twin):
            p.grad[1, 2] = bad if step == 0 else 1.0
        rows.grad[1, 0] = bad if step == 0 else 1.0  # first element of its row, as whole's below
        whole.grad[0] = bad if step == 0 else 1.0
        opt.step()
        sgd.step()
        # NaN and inf where SGD has them, its values elsewhere (the fused
        # kernels may round p - lr * d once, with an fma, where SGD rounds twice).
        scale = twin.detach().nan_to_num(0.0, posinf=0.0, neginf=0.0).abs().max().item()
        torch.testing.assert_close(plain, twin, rtol=0, atol=4 * EPS32 * scale, equal_nan=True,
                                   msg=lambda m: f"step {step}: {m}")
        for seg in (rows[1], whole):
            if step == 0 and not math.isnan(bad):
                assert torch.isnan(seg[0]) and (seg[1:] == 0).all(), f"step {step}: {seg}"
            else:
                assert torch.isnan(seg).all(), f"step {step}: {seg}"
        assert torch.isfinite(rows[[0, 2]]).all(), f"step {step}"
    # the finite rows were stepped (and renormalized), not left alone
    assert not torch.equal(rows[0].detach(), rows_before[0])


# --------------------------------------------------------------------------- known failure classes

BUCKET = 256 * 1024  # the cpu kernel's work buckets (elements); the CUDA chunk plan splits at 16 KiB


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])
def test_empty_tensors_at_split_points_do_not_shift_the_norms(backend):
    """Empty tensors just before and after the points where the work is cut
    into buckets and chunks (and at the start and the end): each tensor's norm
    must land on that tensor. Every tensor has its own target, so one norm
    applied to a neighbour shows at once."""
    shapes = [(0,), (BUCKET - 3,), (0,), (0, 5), (7,), (BUCKET + 1,), (0,), (4095,), (0,), (4097,), (1,), (0,)]
    gen = torch.Generator().manual_seed(2)
    ps = [torch.randn(shape, generator=gen).requires_grad_() for shape in shapes]
    targets = [1.0 + k for k in range(len(ps))]
    opt = FusedFixNorm([{"params": [p], "norm": "fixed", "target_norm": t} for p, t in zip(ps, targets)],
                       lr=0.05, momentum=0.9, backend=backend)
    for step in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for i, (p, t) in enumerate(zip(ps, targets)):
            if p.numel():
                assert p.detach().double().norm().item() == pytest.approx(t, rel=4 * EPS32), f"step {step} param {i}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_every_element_of_short_low_precision_tensors_is_updated(backend, dtype):
    """Sizes around vector widths (8, 9, 64, 65 and a few more), with
    momentum: every element moves (a vectorized path that skips a full block
    or a tail leaves some as they were) and equals the reference step."""
    sizes = [1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 255, 257]
    gen = torch.Generator().manual_seed(4)
    plain = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    fixed = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    ps = plain + fixed
    opt = FusedFixNorm([{"params": plain}, {"params": fixed, "norm": "fixed"}], lr=0.5, momentum=0.9,
                       backend=backend)
    for step in range(3):
        # |lr * buffer| >= 0.05: above half an ulp of these weights (|w| < 16
        # here), so every element of a plain tensor must change. (A fixed
        # tensor is rescaled as a whole; its elements are checked against
        # the reference only: one of size 1 stays at its target, unchanged.)
        grads = [(torch.rand(p.shape, generator=gen) + 0.1).to(dtype) for p in ps]
        expected = reference_step(opt, ps, grads)
        before = [p.detach().clone() for p in plain]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for i, p in enumerate(plain):
            unchanged = (p.detach() == before[i]).nonzero().flatten().tolist()
            assert not unchanged, f"step {step}, size {sizes[i]}: elements {unchanged} not updated"
        for i, (p64, buf64) in expected.items():
            p, what = ps[i], f"step {step}, {'plain' if i < len(sizes) else 'fixed'} size {sizes[i % len(sizes)]}"
            assert_close_dtype(p.detach(), p64.to(dtype), dtype, what)
            assert_close_dtype(opt.state[p]["momentum_buffer"], buf64.to(dtype), dtype, f"{what} buffer")


def test_fifty_steps_of_a_conv_net_without_norm_control_stay_on_sgd():
    """A small conv net trained 50 steps on fixed random data, every fused
    backend with norm control off against torch.optim.SGD (weight decay,
    Nesterov). The loss depends on the weights, so a difference could grow;
    it must stay at the level of float32 rounding."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(5)]
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)

    def train(make_opt):
        model = net()
        opt = make_opt(model.parameters())
        for step in range(50):
            x, y = data[step % len(data)]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return list(model.parameters())

    sgd = train(lambda ps: torch.optim.SGD(ps, **kwargs))
    for backend in FUSED:
        ours = train(lambda ps: FusedFixNorm(ps, backend=backend, **kwargs))
        for i, (p, q) in enumerate(zip(ours, sgd)):
            if backend == "foreach":  # SGD's own foreach arithmetic, op for op
                assert torch.equal(p, q), f"{backend}: param {i}"
                continue
            # The fused kernels round p - lr * d once (an fma): up to an ulp
            # per step from SGD, which the next gradients carry on; 50 steps
            # of that, linearly, is 50 eps32 (measured: 4e-7 at most).
            err = ((p - q).abs().max() / q.abs().max()).item()
            assert err <= 50 * EPS32, f"{backend}: param {i} is {err:.2e} (relative) from SGD's"


# --------------------------------------------------------------------------- more than 2**31 elements

HUGE = os.environ.get("FIXNORM_HUGE_TESTS") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not HUGE, reason="opt-in: FIXNORM_HUGE_TESTS=1 (about 13 GB of memory, half a minute)")
@pytest.mark.skipif(available_backends("cpu")["cpu"] is not None, reason=str(available_backends("cpu")["cpu"]))
def test_more_than_2_31_elements_on_the_cpu():
    """One bfloat16 tensor of 2**31 + 1001 elements (fixed norm, momentum):
    the first 2**31 hold one value and gradient, the last 1001 (beyond the
    reach of 32-bit offsets) another. The exact result is known in closed
    form; both regions must reach it within bfloat16 rounding. A 32-bit
    index or size would step the tail wrongly, or miss it from the norm."""
    n_head, n_tail = 2 ** 31, 1001
    numel = n_head + n_tail
    p = torch.full((numel,), 0.5, dtype=torch.bfloat16)
    p[n_head:] = -0.75
    g = torch.full((numel,), 1.0, dtype=torch.bfloat16)
    g[n_head:] = -2.0
    p.requires_grad_()
    lr, target = 0.125, 1000.0
    opt = FusedFixNorm([{"params": [p], "norm": "fixed", "target_norm": target}], lr=lr, momentum=0.9, backend="cpu")
    p.grad = g
    del g
    opt.step()
    # First step: buffer = gradient; head 0.5 - 0.125, tail -0.75 + 0.25, then rescaled.
    head1, tail1 = 0.375, -0.5
    scale1 = target / math.sqrt(n_head * head1 ** 2 + n_tail * tail1 ** 2)
    head, tail = _check_huge(p, n_head, head1 * scale1, tail1 * scale1)
    # Second step, gradient 1 everywhere: buffer = 0.9 * first gradient + 1.
    p.grad.fill_(1.0)
    opt.step()
    head2 = head - lr * (0.9 * 1.0 + 1.0)
    tail2 = tail - lr * (0.9 * -2.0 + 1.0)
    scale2 = target / math.sqrt(n_head * head2 ** 2 + n_tail * tail2 ** 2)
    _check_huge(p, n_head, head2 * scale2, tail2 * scale2)


def _check_huge(p, n_head, head, tail):
    """Both regions of ``p`` equal their expected value (bfloat16 rounding,
    twice: the kernel rounds the update and the rescale); returns the values
    as stored, to continue the closed form from."""
    tol = 2 * torch.finfo(torch.bfloat16).eps
    got_head = p.detach()[:n_head]
    lo, hi = got_head.aminmax()
    assert lo.item() == hi.item(), "the head is not one value"
    assert lo.item() == pytest.approx(head, rel=tol), "head"
    got_tail = p.detach()[n_head:]
    assert torch.allclose(got_tail.float(), torch.full_like(got_tail, tail, dtype=torch.float32), rtol=tol,
                          atol=tol * abs(head)), f"tail: {got_tail[:3]} vs {tail}"
    return lo.item(), got_tail[0].item()


# --------------------------------------------------------------------------- corrupt checkpoints

def _corrupt_target(value):
    def corrupt(sd):
        sd["state"][0]["target_norm"] = value
    return corrupt


CORRUPT_CHECKPOINTS = {
    "negative target": (_corrupt_target(torch.tensor(-1.0, dtype=torch.float64)), "finite and > 0"),
    "nan target": (_corrupt_target(torch.tensor(float("nan"), dtype=torch.float64)), "finite and > 0"),
    "zero target": (_corrupt_target(torch.tensor(0.0, dtype=torch.float64)), "finite and > 0"),
    "target of another shape": (_corrupt_target(torch.ones(3, dtype=torch.float64)), "has shape"),
    "target not numbers": (_corrupt_target("x"), "not numbers"),
    "buffer of another shape": (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(3)),
                                "momentum_buffer"),
    "negative lr": (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "learning rate"),
    "unknown norm mode": (lambda sd: sd["param_groups"][0].__setitem__("norm", "l2"), "norm mode"),
    "norm_dim 3": (lambda sd: sd["param_groups"][1].__setitem__("norm_dim", 3), "norm_dim"),
}


@pytest.mark.parametrize("case", list(CORRUPT_CHECKPOINTS))
def test_corrupt_checkpoint_is_refused_before_anything_is_loaded(case):
    import copy

    ps, opt = _three_groups("foreach")
    corrupt, match = CORRUPT_CHECKPOINTS[case]
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before, groups = snapshot(opt), copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                                    for g in opt.param_groups])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


@pytest.mark.parametrize("bad, error, match", [
    (dict(dampening=-0.1), ValueError, "dampening"),
    (dict(dampening=float("nan")), ValueError, "dampening"),
    (dict(lr=float("inf")), ValueError, "learning rate"),
    (dict(momentum=float("inf")), ValueError, "momentum"),
    (dict(maximize="no"), TypeError, "maximize"),
    (dict(nesterov="yes", momentum=0.9), TypeError, "nesterov"),
])
def test_more_bad_hyperparameters_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        FusedFixNorm([torch.randn(3, requires_grad=True)], **{"lr": 0.1, **bad})


def test_non_finite_initial_weights_have_no_norm_to_keep():
    w = torch.tensor([1.0, float("inf")], requires_grad=True)
    with pytest.raises(ValueError, match="inf or NaN norm"):
        FusedFixNorm([w], lr=0.1, norm="fixed")
    FusedFixNorm([w], lr=0.1, norm="fixed", target_norm=1.0)  # an explicit target needs no measurement
