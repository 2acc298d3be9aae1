"""The step's sums (the cpu kernel's ``sums`` output) and
the angles that track_stats reads from them, against float64 computations
made here from the tensors themselves."""
import math

import pytest
import torch

from fixnorm_ext import FusedFixNorm, dispatch
from fixnorm_ext.dispatch import GroupHyper

pytestmark = pytest.mark.skipif(dispatch.EXTENSION_ERROR is not None, reason="compiled extension missing")

# Sizes: odd (the AVX2 loop's tail), more than one 2^15-element work item per
# segment, rows of one element, and empty tensors.
SHAPES = [(37,), (300, 201), (64, 3, 3, 3), (5, 1), (0,), (4, 0)]


def _exact_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two tensors, in float64 from the unit-vector chord."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    chord = (b / nb - a / na).norm().item()
    return 2 * math.asin(min(chord / 2, 1.0))


def _groups(params, momentum):
    """Every tensor in each of: fixed, fixed per row, max, and none."""
    return [{"params": [params[0], params[4]], "norm": "fixed"},
            {"params": [params[1], params[5]], "norm": "fixed", "norm_dim": 0},
            {"params": [params[2]], "norm": "max", "target_norm": 3.0},
            {"params": [params[3]]}], momentum


def _make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _grads(params, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_track_stats_angles_match_the_float64_step(dtype, momentum):
    """Three steps (the second and third with a running momentum buffer: the
    AVX2 path for float32). Each step's angles from the kernel's sums equal
    the angle, computed here in float64, between the weights before and after
    the same step taken by the reference backend in float64 on the same
    values."""
    params = _make(dtype)
    shadow = [p.detach().double().clone().requires_grad_() for p in params]
    groups, mom = _groups(params, momentum)
    opt = FusedFixNorm(groups, lr=0.3, momentum=mom, backend="cpu", track_stats=True)
    ref = FusedFixNorm(_groups(shadow, momentum)[0], lr=0.3, momentum=mom, backend="reference")
    for step in range(3):
        for p, q, g in zip(params, shadow, _grads(params, 100 + step)):
            p.grad, q.grad = g, g.double()
            q.data.copy_(p.detach().double())  # the same starting values, every step
            if step and mom:  # the same buffers too: bf16 / fp16 ones are rounded to storage
                ref.state[q]["momentum_buffer"].copy_(opt.state[p]["momentum_buffer"])
        before = [q.detach().clone() for q in shadow]
        opt.step()
        ref.step()
        turned = opt.last_angles
        assert set(turned) == set(params)
        for p, q, b in zip(params, shadow, before):
            expected = _exact_angle(b, q.detach())
            got = turned[p]
            assert got.dtype == torch.float64 and got.dim() == 0
            # float32 arithmetic of an update ~1e-2 of the weights: ~1e-5 relative.
            assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-9), (tuple(p.shape), step)
            if p.numel():
                assert expected > 1e-3, (tuple(p.shape), expected)  # every nonempty tensor turns


def test_angles_of_steps_along_and_across_the_weights():
    """A gradient parallel to w (a radial step) turns it by 0, however large
    the step; a tangential one by atan of its relative size. The sums are
    float32 within blocks of 256 (as the norms): the angle of a radial step
    is what is left of ||delta||^2 - <w, delta>^2 / ||w||^2 after a
    cancellation, good to ~sqrt(eps32) of the relative step |delta| / |w|;
    the bound is 1e-3 of it. A tangential step's angle has no cancellation."""
    w = torch.full((1000,), 0.5, requires_grad=True)
    v = torch.zeros(1000)
    v[::2], v[1::2] = 1.0, -1.0  # orthogonal to w
    u = torch.tensor([1.0, 0.0] * 500, requires_grad=True)
    opt = FusedFixNorm([{"params": [w], "norm": "fixed"}, {"params": [u]}], lr=1.0, backend="cpu",
                       track_stats=True)
    w.grad = w.detach() * 0.3  # a radial step of relative size 0.3
    u.grad = torch.tensor([0.0, 1e-4] * 500)
    opt.step()
    assert abs(opt.last_angles[w].item()) < 1e-3 * 0.3
    assert opt.last_angles[u].item() == pytest.approx(math.atan(1e-4), rel=1e-5)
    w.grad = v * 1e-3  # tangential, relative size 2e-3 / 1 ... of |w| = sqrt(250)
    start = w.detach().clone()
    opt.step()
    # The stored weights are rounded after the rescale, which turns them by
    # up to a few eps32 (6e-8) radians more: the angle of the stored tensors
    # is known to that.
    assert opt.last_angles[w].item() == pytest.approx(_exact_angle(start, w.detach()), rel=1e-6, abs=2e-7)


def _tables(params, groups, targets):
    n = len(params)
    return dict(group_index=list(range(n)), groups=groups, targets=targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sums_table_matches_float64_sums(dtype):
    """Per segment, the four sums against float64 sums of the same update
    (computed here from the reference step without rescaling)."""
    params = [p.detach() for p in _make(dtype, seed=3)]
    grads = _grads(params, 7)
    bufs = [torch.randn(p.shape).to(dtype) for p in params]
    norms = [("fixed", None), ("fixed", 0), ("max", None), (None, None), ("fixed", None), ("max", 0)]
    groups = [GroupHyper(lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True, maximize=False,
                         norm=n, norm_dim=d) for n, d in norms]
    targets = [None if n is None else 1.5 for n, _ in norms]
    old = [p.double().clone() for p in params]
    rows = dispatch.sums_layout(params, **_tables(params, groups, targets)).rows
    sums = torch.full((rows, 4), float("nan"), dtype=torch.float64)
    dispatch.fixnorm_step(params, grads, [b.clone() for b in bufs], backend="cpu", sums=sums,
                          **_tables(params, groups, targets))
    expected = []
    for p, g, b, (n, d) in zip(old, grads, bufs, norms):
        b2 = 0.9 * b.double() + 0.9 * (g.double() + 0.01 * p)
        new = p - 0.2 * (g.double() + 0.01 * p + 0.9 * b2)
        segs = p.shape[0] if d == 0 and p.dim() > 0 else 1
        for a, w in zip(p.reshape(segs, -1), new.reshape(segs, -1)):
            delta = w - a
            expected.append([w.square().sum(), a.square().sum(), (a * delta).sum(), delta.square().sum()])
    expected = torch.tensor(expected, dtype=torch.float64).reshape(rows, 4)
    # Magnitudes: each column is judged against the sum of the terms' magnitudes.
    scale = torch.stack([expected[:, 0], expected[:, 1], (expected[:, 1] * expected[:, 3]).sqrt(),
                         expected[:, 3]], dim=1)
    rel = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.all((sums - expected).abs() <= rel * scale + 1e-300), (sums - expected).abs().max()


def test_a_skipped_step_reports_zero_sums_and_angles():
    w = torch.randn(50, requires_grad=True)
    opt = FusedFixNorm([{"params": [w], "norm": "fixed"}], lr=0.1, backend="cpu", track_stats=True)
    w.grad = torch.randn(50)
    start = w.detach().clone()
    opt.found_inf, opt.grad_scale = torch.ones(()), torch.ones(())
    opt.step()
    assert torch.equal(w.detach(), start) and opt.last_angles[w].item() == 0.0


def test_bad_sums_are_refused_and_change_nothing():
    params = [torch.randn(10), torch.randn(3, 4)]
    grads = [torch.randn(10), torch.randn(3, 4)]
    groups = [GroupHyper(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                         norm="fixed", norm_dim=0)] * 2
    kw = _tables(params, groups, [1.0, 1.0])
    start = [p.clone() for p in params]
    assert dispatch.sums_layout(params, **kw).rows == 13  # 10 rows of one element, and 3
    for bad in [torch.zeros(12, 4, dtype=torch.float64), torch.zeros(13, 4), torch.zeros(13, 3, dtype=torch.float64),
                torch.zeros(13, 8, dtype=torch.float64)[:, ::2]]:
        with pytest.raises(RuntimeError, match="sums must be"):
            dispatch.fixnorm_step(params, grads, [None, None], backend="cpu", sums=bad, **kw)
    with pytest.raises(ValueError, match="does not report sums"):
        dispatch.fixnorm_step(params, grads, [None, None], backend="foreach",
                              sums=torch.zeros(13, 4, dtype=torch.float64), **kw)
    assert all(torch.equal(p, s) for p, s in zip(params, start))
