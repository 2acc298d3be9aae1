"""The FusedFixNorm optimizer contract (DESIGN.md sections 2 and 3).

What a user of ``torch.optim`` relies on: with ``norm=None`` it is
``torch.optim.SGD`` step for step; checkpoints move between the two and round
trip exactly; LR schedulers, ``zero_grad``, ``add_param_group``, closures and
``torch.amp.GradScaler`` work; norm control keeps (or bounds) norms; bad input
is refused with a clear error before anything is written; the backend is chosen
(and explained) by the optimizer, never by a checkpoint.

The numerical comparison of every backend against ``fixnorm_ext.reference``
(dtypes, shapes, strides) lives in tests/test_backends.py.

Tolerances against ``torch.optim.SGD`` (free running, compared after every step):

dtype     tolerance                                why
float64   rtol 1e-12, atol 1e-14                   both sides compute in float64; they differ only by the order
                                                   and contraction (FMA or not) of a handful of roundings per
                                                   step (~1e-16 each) on values of magnitude ~1
float32   4 eps32 x the tensor's largest |value|   SGD rounds each ATen op in float32, the backends round a
                                                   fused expression (cpu) or a float64 result (reference) once:
                                                   about one rounding apart per operation, carried along by the
                                                   momentum; measured <= 2 such ulps over 6 steps
"""
import copy
import io
import pickle
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixnorm_ext import FusedFixNorm, available_backends, dispatch, reference

CPU_MISSING = available_backends("cpu")["cpu"]
BACKENDS = [
    "reference",
    "foreach",
    pytest.param("cpu", marks=pytest.mark.skipif(CPU_MISSING is not None, reason=f"no cpu backend: {CPU_MISSING}")),
]
EPS32 = torch.finfo(torch.float32).eps
SHAPES = [(7,), (5, 3), (3, 1, 11), (33,)]
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def make_grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
            for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def step_both(opt, ours, sgd, theirs, grads):
    """One step of FusedFixNorm and of its SGD twin on the same gradients."""
    set_grads(ours, grads)
    set_grads(theirs, grads)
    opt.step()
    sgd.step()


def checkpoint(obj):
    """Save and load through bytes, as a real checkpoint does (no shared tensors)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def segment_norms(p, norm_dim=None):
    return reference.segment_norms(p, norm_dim)


def assert_sgd_close(actual, expected, what):
    """``actual`` (FusedFixNorm) against ``expected`` (torch.optim.SGD), see the table above."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what}: {m}")
    else:
        scale = expected.detach().abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=0, atol=4 * EPS32 * scale, msg=lambda m: f"{what}: {m}")


def assert_bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual, expected), f"{what}: not bitwise equal (max diff {(actual - expected).abs().max()})"


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt):
    """Clones of everything a step could write: parameter values and per-parameter
    state. An empty state entry holds nothing (torch.optim.SGD creates those
    lazily too), so only non-empty entries count."""
    params = all_params(opt)
    index = {p: i for i, p in enumerate(params)}
    state = {
        index.get(p, f"a tensor of shape {tuple(p.shape)} in no group"):
            {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
        for p, s in opt.state.items() if s
    }
    return [p.detach().clone() for p in params], state


def assert_unchanged(opt, before):
    values, state = before
    now_values, now_state = snapshot(opt)
    for i, (a, b) in enumerate(zip(now_values, values)):
        assert_bitwise(a, b, f"param {i} changed")
    assert now_state.keys() == state.keys(), f"state created for {now_state.keys() - state.keys()}"
    for i in state:
        assert now_state[i].keys() == state[i].keys(), \
            f"param {i}: state keys {now_state[i].keys()} != {state[i].keys()}"
        for k, v in state[i].items():
            if isinstance(v, torch.Tensor):
                assert_bitwise(now_state[i][k], v, f"state[{i}][{k!r}] changed")
            else:
                assert now_state[i][k] == v, f"state[{i}][{k!r}] changed"


# --------------------------------------------------------------------------- 1. plain SGD


SGD_CASES = {
    "plain": dict(lr=0.1),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "momentum_decay": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    "maximize": dict(lr=0.1, maximize=True),
    "maximize_momentum_decay_dampening": dict(lr=0.1, momentum=0.5, dampening=0.1, weight_decay=0.1, maximize=True),
    "nesterov_maximize_decay": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05, maximize=True),
    "tensor_lr": dict(lr="tensor", momentum=0.9),
}


def hyper(case):
    kw = dict(SGD_CASES[case])
    if kw["lr"] == "tensor":
        kw["lr"] = torch.tensor(0.1)  # each optimizer gets its own 0-d tensor
    return kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_sgd_step_for_step(backend, case, dtype):
    init = make_params(dtype)
    ours, theirs = clone_params(init), clone_params(init)
    opt = FusedFixNorm(ours, backend=backend, **hyper(case))
    sgd = torch.optim.SGD(theirs, foreach=False, **hyper(case))
    assert opt.backend == backend
    for step, grads in enumerate(make_grads(init, 6)):
        step_both(opt, ours, sgd, theirs, grads)
        for i, (p, q) in enumerate(zip(ours, theirs)):
            assert_sgd_close(p.detach(), q.detach(), f"step {step} param {i}")
            mine, ref = opt.state.get(p, {}), sgd.state.get(q, {})
            assert mine.keys() == ref.keys(), f"step {step} param {i}: state keys {mine.keys()} != {ref.keys()}"
            if "momentum_buffer" in ref:
                assert_sgd_close(mine["momentum_buffer"], ref["momentum_buffer"], f"step {step} buffer {i}")
    # the parameters really moved: the comparison above is not between two no-ops
    assert not torch.equal(ours[0].detach(), init[0].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_sgd_with_several_groups(backend):
    init = make_params(torch.float64)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 0.2, "momentum": 0.9, "nesterov": True},
            {"params": ps[2:3], "momentum": 0.5, "dampening": 0.2, "weight_decay": 0.01},
            {"params": ps[3:], "maximize": True},
        ]

    ours, theirs = clone_params(init), clone_params(init)
    opt = FusedFixNorm(groups(ours), lr=0.05, backend=backend)
    sgd = torch.optim.SGD(groups(theirs), lr=0.05, foreach=False)
    for grads in make_grads(init, 5):
        step_both(opt, ours, sgd, theirs, grads)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_sgd_close(p.detach(), q.detach(), f"param {i}")
        if q in sgd.state:
            assert_sgd_close(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"], f"buffer {i}")


PARAM_FORMS = {
    "generator": lambda m: m.parameters(),
    "list": lambda m: list(m.parameters()),
    "group_with_generator": lambda m: [{"params": m.parameters()}],
    "group_with_one_tensor": lambda m: [{"params": m.weight}, {"params": m.bias}],
    "named_parameters": lambda m: m.named_parameters(),
}


@pytest.mark.parametrize("form", list(PARAM_FORMS))
def test_accepts_every_params_form_sgd_accepts(form):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(PARAM_FORMS[form](twin), lr=0.1, momentum=0.9)
    opt = FusedFixNorm(PARAM_FORMS[form](model), lr=0.1, momentum=0.9, backend="foreach")
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in sgd.param_groups]
    x = torch.randn(4, 5, dtype=torch.float64)
    for _ in range(2):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_sgd_close(p.detach(), q.detach(), name)


# --------------------------------------------------------------------------- 2. checkpoints


def two_group_sgd_layout(ps, **first):
    return [{"params": ps[:2], "nesterov": True, **first}, {"params": ps[2:], "dampening": 0.2, "weight_decay": 0.01}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_keeps_sgd_momentum_buffer(backend):
    init = make_params(torch.float32)
    ours, theirs = clone_params(init), clone_params(init)
    opt = FusedFixNorm(ours, lr=0.1, momentum=0.9, backend=backend)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for grads in make_grads(init, 3):
        step_both(opt, ours, sgd, theirs, grads)
    sd, ref = opt.state_dict(), sgd.state_dict()
    assert sd["state"].keys() == ref["state"].keys() == set(range(len(init)))
    for i, p in enumerate(ours):
        assert set(sd["state"][i]) == {"momentum_buffer"}, sd["state"][i].keys()
        buf = sd["state"][i]["momentum_buffer"]
        assert buf.dtype == p.dtype and buf.shape == p.shape
        assert_sgd_close(buf, ref["state"][i]["momentum_buffer"], f"buffer {i}")
    for g in sd["param_groups"]:
        assert (g["norm"], g["target_norm"], g["norm_dim"]) == (None, None, None)


def uninterrupted_sgd_run():
    """Six SGD steps without a checkpoint: the trajectory a resumed run must follow."""
    init = make_params(torch.float64)
    grads = make_grads(init, 6)
    straight = clone_params(init)
    sgd_straight = torch.optim.SGD(two_group_sgd_layout(straight), lr=0.1, momentum=0.9)
    for g in grads:
        set_grads(straight, g)
        sgd_straight.step()
    return init, grads, straight, sgd_straight


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_checkpoint_continues_in_fused(backend):
    init, grads, straight, sgd_straight = uninterrupted_sgd_run()

    first = clone_params(init)
    sgd = torch.optim.SGD(two_group_sgd_layout(first), lr=0.1, momentum=0.9)
    for g in grads[:3]:
        set_grads(first, g)
        sgd.step()
    saved = checkpoint({"params": [p.detach() for p in first], "optim": sgd.state_dict()})

    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    # built with other hyperparameters: the checkpoint's must win
    opt = FusedFixNorm([{"params": resumed[:2]}, {"params": resumed[2:]}], lr=0.5, backend=backend)
    opt.load_state_dict(saved["optim"])
    assert opt.backend == backend
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    for g in grads[3:]:
        set_grads(resumed, g)
        opt.step()
    for i, (p, q) in enumerate(zip(resumed, straight)):
        assert_sgd_close(p.detach(), q.detach(), f"param {i}")
        assert_sgd_close(opt.state[p]["momentum_buffer"], sgd_straight.state[q]["momentum_buffer"], f"buffer {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_checkpoint_continues_in_sgd(backend):
    init, grads, straight, sgd_straight = uninterrupted_sgd_run()

    first = clone_params(init)
    opt = FusedFixNorm(two_group_sgd_layout(first), lr=0.1, momentum=0.9, backend=backend)
    for g in grads[:3]:
        set_grads(first, g)
        opt.step()
    saved = checkpoint({"params": [p.detach() for p in first], "optim": opt.state_dict()})

    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    sgd = torch.optim.SGD([{"params": resumed[:2]}, {"params": resumed[2:]}], lr=0.5)
    sgd.load_state_dict(saved["optim"])
    for g in grads[3:]:
        set_grads(resumed, g)
        sgd.step()
    for i, (p, q) in enumerate(zip(resumed, straight)):
        assert_sgd_close(p.detach(), q.detach(), f"param {i}")
        assert_sgd_close(sgd.state[p]["momentum_buffer"], sgd_straight.state[q]["momentum_buffer"], f"buffer {i}")


def norm_groups(ps, backend):
    """One of each kind: recorded fixed norm, recorded per-row max norm, explicit
    per-row fixed norm, plain SGD."""
    return FusedFixNorm(
        [
            {"params": ps[0:1], "norm": "fixed"},
            {"params": ps[1:2], "norm": "max", "norm_dim": 0},
            {"params": ps[2:3], "norm": "fixed", "norm_dim": 0, "target_norm": 2.5},
            {"params": ps[3:], "weight_decay": 0.01},
        ],
        lr=0.3, momentum=0.9, nesterov=True, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_checkpoint_round_trip_is_bitwise(backend, dtype):
    shapes = [(5, 3), (3, 1, 11), (4, 6), (7,)]
    init = make_params(dtype, shapes)
    grads = make_grads(init, 6)
    straight = clone_params(init)
    opt_straight = norm_groups(straight, backend)
    for g in grads:
        set_grads(straight, g)
        opt_straight.step()

    first = clone_params(init)
    opt = norm_groups(first, backend)
    for g in grads[:3]:
        set_grads(first, g)
        opt.step()
    saved = checkpoint({"params": [p.detach() for p in first], "optim": opt.state_dict()})
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    # Built on the mid-training weights, it records other norms than the
    # original run did; the checkpoint's recorded targets must replace them.
    opt2 = norm_groups(resumed, backend)
    opt2.load_state_dict(saved["optim"])
    for g in grads[3:]:
        set_grads(resumed, g)
        opt2.step()
    for i, (p, q) in enumerate(zip(resumed, straight)):
        assert_bitwise(p.detach(), q.detach(), f"param {i}")
        assert opt2.state[p].keys() == opt_straight.state[q].keys()
        for k in opt_straight.state[q]:
            assert_bitwise(opt2.state[p][k], opt_straight.state[q][k], f"state[{i}][{k!r}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_recorded_target_survives_checkpoint_exactly(backend):
    ps = make_params(torch.bfloat16, [(6, 5), (4, 7)])
    expected = [segment_norms(ps[0]), segment_norms(ps[1], 0)]
    opt = FusedFixNorm([{"params": ps[:1], "norm": "fixed"}, {"params": ps[1:], "norm": "max", "norm_dim": 0}],
                       lr=0.5, momentum=0.9, backend=backend)
    for p, t in zip(ps, expected):
        assert_bitwise(opt.state[p]["target_norm"], t, "recorded target")  # float64, not rounded to bfloat16
    for g in make_grads(ps, 2):
        set_grads(ps, g)
        opt.step()
    saved = checkpoint(opt.state_dict())
    assert all(saved["state"][i]["target_norm"].dtype == torch.float64 for i in (0, 1))

    with torch.no_grad():  # a re-measured target would now be 4x the recorded one
        for p in ps:
            p.mul_(4)
    opt2 = FusedFixNorm([{"params": ps[:1], "norm": "fixed"}, {"params": ps[1:], "norm": "max", "norm_dim": 0}],
                        lr=0.5, momentum=0.9, backend=backend)
    opt2.load_state_dict(saved)
    for p, t in zip(ps, expected):
        assert_bitwise(opt2.state[p]["target_norm"], t, "target after load")
    set_grads(ps, make_grads(ps, 1, seed=5)[0])
    opt2.step()
    for p, t in zip(ps, expected):
        assert_bitwise(opt2.state[p]["target_norm"], t, "target after a step")
    # rounding the rescaled values to bfloat16 moves each by <= half an ulp (2**-8 relative)
    rel = (segment_norms(ps[0]) / expected[0] - 1).abs().item()
    assert rel <= 2.0 ** -8, rel
    assert bool((segment_norms(ps[1], 0) <= expected[1] * (1 + 2.0 ** -8)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_checkpoint_keeps_fixnorm_settings(backend):
    init = make_params(torch.float64, [(5, 3), (3, 1, 11), (7,), (33,)])
    trained = clone_params(init)
    sgd = torch.optim.SGD([{"params": [t]} for t in trained[:3]] + [{"params": trained[3:], "lr": 0.05}],
                          lr=0.1, momentum=0.9)
    for g in make_grads(init, 2):
        set_grads(trained, g)
        sgd.step()
    saved = checkpoint(sgd.state_dict())

    ps = clone_params(trained)
    recorded = segment_norms(ps[3])
    settings = [("fixed", 2.0, 0), ("max", 0.5, None), (None, None, None), ("fixed", None, None)]
    opt = FusedFixNorm([{"params": [p], "norm": n, "target_norm": t, "norm_dim": d}
                        for p, (n, t, d) in zip(ps, settings)], lr=1.0, backend=backend)
    opt.load_state_dict(saved)
    assert opt.backend == backend
    assert [(g["norm"], g["target_norm"], g["norm_dim"]) for g in opt.param_groups] == settings
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1, 0.1, 0.05]  # SGD's hyperparameters came along
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)

    nxt = make_grads(init, 1, seed=7)[0]
    set_grads(ps, nxt)
    set_grads(trained, nxt)
    opt.step()
    sgd.step()
    torch.testing.assert_close(segment_norms(ps[0], 0), torch.full((5,), 2.0, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(segment_norms(ps[1]), torch.tensor(0.5, dtype=torch.float64), rtol=1e-12, atol=0)
    assert_sgd_close(ps[2].detach(), trained[2].detach(), "plain group")
    torch.testing.assert_close(segment_norms(ps[3]), recorded, rtol=1e-12, atol=0)


@pytest.mark.parametrize("saved_with", BACKENDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_never_changes_backend(backend, saved_with, monkeypatch):
    init = make_params(torch.float32)
    a, b = clone_params(init), clone_params(init)
    src = FusedFixNorm([{"params": a[:2], "norm": "fixed"}, {"params": a[2:]}], lr=0.1, momentum=0.9,
                       backend=saved_with)
    set_grads(a, make_grads(init, 1)[0])
    src.step()
    dst = FusedFixNorm([{"params": b[:2], "norm": "fixed"}, {"params": b[2:]}], lr=0.1, momentum=0.9,
                       backend=backend)
    reason = dst.backend_reason
    dst.load_state_dict(checkpoint(src.state_dict()))
    assert (dst.backend, dst.requested_backend, dst.backend_reason) == (backend, backend, reason)
    calls = spy_on_backends(monkeypatch)
    set_grads(b, make_grads(init, 1)[0])
    dst.step()
    assert calls == [backend]


def spy_on_backends(monkeypatch):
    """Record the name of every backend implementation that runs."""
    calls = []
    for name, impl in list(dispatch._IMPLS.items()):
        monkeypatch.setitem(dispatch._IMPLS, name,
                            lambda *a, _n=name, _impl=impl, **kw: calls.append(_n) or _impl(*a, **kw))
    return calls


# --------------------------------------------------------------------------- 3. the torch.optim protocol


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=0.01),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_drives_lr_like_sgd(backend, scheduler):
    init = make_params(torch.float64)
    ours, theirs = clone_params(init), clone_params(init)
    opt = FusedFixNorm([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.3}], lr=0.2, momentum=0.9,
                       backend=backend)
    sgd = torch.optim.SGD([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.3}], lr=0.2, momentum=0.9)
    s1, s2 = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](sgd)
    lrs = []
    for grads in make_grads(init, 6):
        step_both(opt, ours, sgd, theirs, grads)
        s1.step()
        s2.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in sgd.param_groups]
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 2, lrs  # the schedule did change the lr
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_sgd_close(p.detach(), q.detach(), f"param {i}")


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad(backend, set_to_none):
    init = make_params(torch.float64)
    ours, theirs = clone_params(init), clone_params(init)
    opt = FusedFixNorm(ours, lr=0.1, momentum=0.9, backend=backend)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for grads in make_grads(init, 2):
        step_both(opt, ours, sgd, theirs, grads)
    opt.zero_grad(set_to_none=set_to_none)
    sgd.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert all(p.grad is None for p in ours)
        before = snapshot(opt)
        opt.step()
        assert_unchanged(opt, before)
    else:
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ours)
        moved = [p.detach().clone() for p in ours]
        opt.step()  # zero gradients still step: the momentum carries on
        sgd.step()
        assert not torch.equal(ours[0].detach(), moved[0])
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_sgd_close(p.detach(), q.detach(), f"param {i}")
        assert_sgd_close(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"], f"buffer {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_after_some_steps(backend):
    ps = make_params(torch.float32)
    opt = FusedFixNorm(ps[:2], lr=0.3, momentum=0.9, backend=backend)
    late = make_params(torch.float32, [(6, 5), (4, 3)], seed=3)
    for grads in make_grads(ps[:2], 2):
        set_grads(ps[:2], grads)
        opt.step()
    with torch.no_grad():  # the target is the norm when the group joins, not when the tensor was made
        late[0].mul_(3)
        late[1].mul_(0.25)
    at_join = [segment_norms(late[0]), segment_norms(late[1], 0)]
    opt.add_param_group({"params": late[:1], "norm": "fixed"})
    opt.add_param_group({"params": late[1:], "norm": "max", "norm_dim": 0, "lr": 0.05})
    assert opt.backend == backend
    assert (opt.param_groups[1]["lr"], opt.param_groups[1]["momentum"]) == (0.3, 0.9)  # defaults filled in
    assert opt.param_groups[2]["lr"] == 0.05
    for p, t in zip(late, at_join):
        assert_bitwise(opt.state[p]["target_norm"], t, "target recorded at add_param_group")
    everything = ps[:2] + late
    start = [p.detach().clone() for p in everything]
    for grads in make_grads(everything, 3, seed=4):
        set_grads(everything, grads)
        opt.step()
    for p, s in zip(everything, start):
        assert not torch.equal(p.detach(), s)
    assert abs(segment_norms(late[0]).item() / at_join[0].item() - 1) <= 1e-5
    assert bool((segment_norms(late[1], 0) <= at_join[1] * (1 + 1e-6)).all())
    assert all("momentum_buffer" in opt.state[p] for p in everything)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    ps = make_params(torch.float32)
    opt = FusedFixNorm([{"params": ps[:2]}, {"params": ps[2:], "norm": "fixed"}], lr=0.1, momentum=0.9,
                       backend=backend)
    start = [p.detach().clone() for p in ps]
    targets = [opt.state[p]["target_norm"].clone() for p in ps[2:]]
    for grads in make_grads(ps, 3):
        set_grads(ps, [grads[0], None, grads[2], None])
        opt.step()
    assert not torch.equal(ps[0].detach(), start[0]) and not torch.equal(ps[2].detach(), start[2])
    assert_bitwise(ps[1].detach(), start[1], "param without grad (plain group)")
    assert_bitwise(ps[3].detach(), start[3], "param without grad (norm group)")
    assert ps[1] not in opt.state
    assert set(opt.state[ps[3]]) == {"target_norm"}  # recorded at construction, nothing added
    assert_bitwise(opt.state[ps[3]]["target_norm"], targets[1], "target of the skipped param")
    assert set(opt.state[ps[0]]) == {"momentum_buffer"} and set(opt.state[ps[2]]) == {"momentum_buffer", "target_norm"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_returns_loss(backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    w, v = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = FusedFixNorm([w], lr=0.05, momentum=0.9, backend=backend)
    sgd = torch.optim.SGD([v], lr=0.05, momentum=0.9)

    def closure_for(o, p):
        def closure():
            o.zero_grad()
            loss = (x @ p.T - y).square().mean()
            loss.backward()  # step() runs under no_grad: the closure must get grad mode back
            return loss
        return closure

    for _ in range(3):
        expected = (x @ w.detach().T - y).square().mean()
        loss = opt.step(closure_for(opt, w))
        sgd.step(closure_for(sgd, v))
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
        assert_bitwise(loss.detach(), expected, "returned loss")
        assert_sgd_close(w.detach(), v.detach(), "param")


# --------------------------------------------------------------------------- 4. norm control


@pytest.mark.parametrize("norm_dim", [None, 0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_norm_kept_over_many_steps(backend, norm_dim):
    # Each step rescales to the recorded float64 target, so errors do not build
    # up over steps. One step's error: the float32 sum of squares of n <= 143
    # values is off by <= n*eps32 even summed naively (the backends sum in
    # blocks, far less), halved by the square root, plus half an ulp from
    # rounding the rescaled values: <= 72.5 eps32 = 8.6e-6 <= 1e-5.
    ps = make_params(torch.float32, [(13, 11), (64,), (5, 3, 3)])
    opt = FusedFixNorm(ps, lr=0.5, momentum=0.9, norm="fixed", norm_dim=norm_dim, backend=backend)
    targets = [segment_norms(p, norm_dim) for p in ps]
    start = [p.detach().clone() for p in ps]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(200):
        set_grads(ps, [torch.randn(p.shape, generator=gen) for p in ps])
        opt.step()
        for p, t in zip(ps, targets):
            worst = max(worst, (segment_norms(p, norm_dim) / t - 1).abs().max().item())
    assert worst <= 1e-5, worst
    # 200 steps of lr 0.5 really changed the directions
    for p, s in zip(ps, start):
        cos = torch.nn.functional.cosine_similarity(p.detach().reshape(1, -1), s.reshape(1, -1)).item()
        assert cos < 0.9


@pytest.mark.parametrize("norm_dim", [None, 0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_norm_never_exceeded(backend, norm_dim):
    # Segments of <= 64 values: a float32 sum of squares summed in >= 8 lanes
    # (cpu kernel, ATen's vectorised norm) is off by <= (64/8 + 3) eps32, halved
    # by the square root, plus half an ulp from rounding: <= 6 eps32 = 7.2e-7.
    ps = make_params(torch.float32, [(8, 8), (6, 10), (45,)])
    target = 0.5 * min(segment_norms(p, norm_dim).min().item() for p in ps)  # binds from the first step on
    opt = FusedFixNorm(ps, lr=0.5, momentum=0.9, norm="max", target_norm=target, norm_dim=norm_dim,
                       backend=backend)
    gen = torch.Generator().manual_seed(1)
    highest = 0.0
    for step in range(100):
        set_grads(ps, [torch.randn(p.shape, generator=gen) * (0.01 if step % 2 else 1.0) for p in ps])
        opt.step()
        norms = torch.cat([segment_norms(p, norm_dim).reshape(-1) for p in ps])
        assert bool((norms <= target * (1 + 1e-6)).all()), (step, norms.max().item() / target)
        highest = max(highest, norms.max().item())
    assert highest >= target * (1 - 1e-5)  # the clamp did bind


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_dim0_keeps_each_row(backend):
    ps = make_params(torch.float32, [(6, 10), (4, 3, 5), (9,)])
    rows = [segment_norms(p, 0) for p in ps]
    assert all(r.unique().numel() == r.numel() for r in rows)  # rows differ, so one scale for all would fail
    opt = FusedFixNorm(ps, lr=0.5, momentum=0.9, norm="fixed", norm_dim=0, backend=backend)
    for grads in make_grads(ps, 20):
        set_grads(ps, grads)
        opt.step()
    for p, r in zip(ps, rows):
        torch.testing.assert_close(segment_norms(p, 0), r, rtol=1e-5, atol=0)  # see the fixed-norm test
        assert_bitwise(opt.state[p]["target_norm"], r, "recorded row targets")


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_target_vs_recorded(backend):
    ps = make_params(torch.float32, [(5, 3), (4, 6), (7,), (3, 4)])
    recorded = segment_norms(ps[2])
    loose_rows = segment_norms(ps[3], 0)
    opt = FusedFixNorm([
        {"params": [ps[0]], "norm": "fixed", "target_norm": 3.0},
        {"params": [ps[1]], "norm": "fixed", "target_norm": 3.0, "norm_dim": 0},
        {"params": [ps[2]], "norm": "fixed"},
        {"params": [ps[3]], "norm": "max", "target_norm": 1e3, "norm_dim": 0},
    ], lr=0.1, backend=backend)
    for grads in make_grads(ps, 3):
        set_grads(ps, grads)
        opt.step()
    assert abs(segment_norms(ps[0]).item() - 3.0) <= 3.0 * 1e-5
    torch.testing.assert_close(segment_norms(ps[1], 0), torch.full((4,), 3.0, dtype=torch.float64), rtol=1e-5, atol=0)
    assert abs(segment_norms(ps[2]).item() / recorded.item() - 1) <= 1e-5
    assert not torch.allclose(segment_norms(ps[3], 0), loose_rows)  # far below its bound: free to move


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_that_becomes_zero_stays_finite(backend, momentum):
    # lr 0.5 and grad = 2 p make p - lr*grad exactly 0 in any precision
    ps = make_params(torch.float32, [(4, 3), (3, 5), (7,)])
    targets = [segment_norms(ps[0]), segment_norms(ps[1], 0)]
    opt = FusedFixNorm([{"params": ps[:1], "norm": "fixed"}, {"params": ps[1:2], "norm": "fixed", "norm_dim": 0},
                        {"params": ps[2:]}], lr=0.5, momentum=momentum, backend=backend)
    grads = make_grads(ps, 2)
    first = [2 * ps[0].detach(), grads[0][1].clone(), grads[0][2]]
    first[1][1] = 2 * ps[1].detach()[1]  # only row 1 of the row-normalized tensor vanishes
    plain = ps[2].detach() - 0.5 * grads[0][2]
    set_grads(ps, first)
    opt.step()
    assert_bitwise(ps[0].detach(), torch.zeros(4, 3), "zeroed tensor")
    assert_bitwise(ps[1].detach()[1], torch.zeros(5), "zeroed row")
    rows = segment_norms(ps[1], 0)
    torch.testing.assert_close(rows[[0, 2]], targets[1][[0, 2]], rtol=1e-5, atol=0)
    assert_sgd_close(ps[2].detach(), plain, "the step went on for the other tensors")
    set_grads(ps, grads[1])
    opt.step()  # and the next step brings the zeroed weights back to their targets
    assert all(bool(torch.isfinite(p).all()) for p in ps)
    assert abs(segment_norms(ps[0]).item() / targets[0].item() - 1) <= 1e-5
    torch.testing.assert_close(segment_norms(ps[1], 0), targets[1], rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- 5. bad input


def trained(backend, warmup):
    """Two groups (plain momentum; per-row fixed norm), ``warmup`` steps taken,
    and fresh valid gradients set for the next step."""
    ps = make_params(torch.float32, [(5, 3), (7,), (3, 1, 11), (33,)])
    opt = FusedFixNorm([{"params": ps[:2]}, {"params": ps[2:], "norm": "fixed", "norm_dim": 0}],
                       lr=0.1, momentum=0.9, backend=backend)
    grads = make_grads(ps, warmup + 1)
    for g in grads[:warmup]:
        set_grads(ps, g)
        opt.step()
    set_grads(ps, grads[warmup])
    return ps, opt


def sparse_grad(p):
    p.grad = p.grad.to_sparse()


def grad_of_other_shape(p):
    p.grad.data = torch.ones(p.shape[0] + 1)  # autograd refuses this on assignment; .data does not


def grad_of_other_dtype(p):
    p.grad.data = p.grad.double()


BAD_GRADS = {
    "sparse": (sparse_grad, r"sparse"),
    "shape": (grad_of_other_shape, r"gradient.*does not match its parameter"),
    "dtype": (grad_of_other_dtype, r"gradient.*float64.*does not match its parameter"),
}


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("bad", list(BAD_GRADS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_gradient_in_a_later_tensor_changes_nothing(backend, bad, warmup):
    ps, opt = trained(backend, warmup)
    corrupt, match = BAD_GRADS[bad]
    corrupt(ps[-1])
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_unchanged(opt, before)


BAD_EDITS = {
    "negative_lr": ({"lr": -0.1}, r"learning rate"),
    "negative_tensor_lr": ({"lr": torch.tensor(-0.1)}, r"learning rate"),
    "nan_lr": ({"lr": float("nan")}, r"learning rate"),
    "negative_momentum": ({"momentum": -0.5}, r"momentum"),
    "negative_weight_decay": ({"weight_decay": -1e-4}, r"weight_decay"),
    "nesterov_with_dampening": ({"nesterov": True, "dampening": 0.1}, r"Nesterov"),
    "nesterov_without_momentum": ({"nesterov": True, "momentum": 0.0}, r"Nesterov"),
    "unknown_norm": ({"norm": "l2"}, r"norm mode 'l2'"),
    "zero_target": ({"target_norm": 0.0}, r"target_norm"),
    "negative_target": ({"target_norm": -1.0}, r"target_norm"),
    "nan_target": ({"target_norm": float("nan")}, r"target_norm"),
    "inf_target": ({"target_norm": float("inf")}, r"target_norm"),
    "norm_dim_1": ({"norm_dim": 1}, r"norm_dim"),
}


@pytest.mark.parametrize("edit", list(BAD_EDITS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_hyperparameter_made_invalid_after_construction(backend, edit):
    ps, opt = trained(backend, 2)
    changes, match = BAD_EDITS[edit]
    opt.param_groups[-1].update(changes)  # the last group: the first one would be stepped by a careless loop
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(opt, before)


def switch_norm_on_then_break_lr(opt, ps):
    opt.param_groups[0]["norm"] = "fixed"  # valid: its target is recorded on the next step
    opt.param_groups[-1]["lr"] = -1.0
    return ValueError, r"learning rate"


def sgd_checkpoint_then_bad_grad(opt, ps):
    sgd = torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1, momentum=0.9)
    opt.load_state_dict(checkpoint(sgd.state_dict()))  # no recorded targets: measured on the next step
    grad_of_other_dtype(ps[-1])
    return RuntimeError, r"does not match its parameter"


@pytest.mark.parametrize("setup", [switch_norm_on_then_break_lr, sgd_checkpoint_then_bad_grad],
                         ids=lambda f: f.__name__)
def test_refused_step_records_no_target_norm(setup):
    # Targets still to be measured (norm switched on after construction, or an
    # SGD checkpoint loaded) must not be recorded by a step that is refused.
    # This happens before any backend runs, so one backend is enough.
    ps, opt = trained("foreach", 0)
    error, match = setup(opt, ps)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(opt, before)


def _p(*shape):
    return torch.randn(*shape, requires_grad=True)


BAD_CONSTRUCTION = {
    "negative_lr": (lambda: dict(params=[_p(3)], lr=-0.1), r"learning rate"),
    "negative_tensor_lr": (lambda: dict(params=[_p(3)], lr=torch.tensor(-1.0)), r"learning rate"),
    "negative_momentum": (lambda: dict(params=[_p(3)], momentum=-0.1), r"momentum"),
    "negative_weight_decay": (lambda: dict(params=[_p(3)], weight_decay=-0.1), r"weight_decay"),
    "nesterov_zero_momentum": (lambda: dict(params=[_p(3)], nesterov=True), r"Nesterov"),
    "nesterov_dampening": (lambda: dict(params=[_p(3)], nesterov=True, momentum=0.9, dampening=0.1), r"Nesterov"),
    "zero_target": (lambda: dict(params=[_p(3)], norm="fixed", target_norm=0.0), r"target_norm"),
    "negative_target": (lambda: dict(params=[_p(3)], norm="max", target_norm=-2.0), r"target_norm"),
    "nan_target": (lambda: dict(params=[_p(3)], norm="fixed", target_norm=float("nan")), r"target_norm"),
    "inf_target": (lambda: dict(params=[_p(3)], norm="max", target_norm=float("inf")), r"target_norm"),
    "unknown_norm": (lambda: dict(params=[_p(3)], norm="unit"), r"norm mode 'unit'"),
    "norm_dim_1": (lambda: dict(params=[_p(3, 2)], norm="fixed", norm_dim=1), r"norm_dim"),
    "unknown_backend": (lambda: dict(params=[_p(3)], backend="tpu"), r"unknown backend 'tpu'"),
    "group_lr": (lambda: dict(params=[{"params": [_p(3)], "lr": -1.0}]), r"learning rate"),
    "group_norm": (lambda: dict(params=[{"params": [_p(3)], "norm": "maximum"}]), r"norm mode"),
    "param_in_two_groups": (lambda: (lambda a: dict(params=[{"params": [a]}, {"params": [a], "norm": "fixed"}]))(_p(3)),
                            r"more than one parameter group"),
    "complex_param": (lambda: dict(params=[_p(3), torch.randn(3, dtype=torch.complex64, requires_grad=True)]),
                      r"complex"),
    "zero_param_recorded_target": (lambda: dict(params=[torch.zeros(3, requires_grad=True)], norm="fixed"),
                                   r"zero norm.*target_norm"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTION))
def test_bad_construction_raises(case):
    make, match = BAD_CONSTRUCTION[case]
    with pytest.raises(ValueError, match=match):
        FusedFixNorm(**make())


BAD_GROUPS = {
    # a new tensor next to one already present: neither may get a recorded target
    "param_already_present": (lambda ps: {"params": [_p(4), ps[0]], "norm": "fixed"},
                              r"more than one parameter group"),
    "complex_param": (lambda ps: {"params": [torch.randn(4, dtype=torch.complex64, requires_grad=True)]}, r"complex"),
    "negative_lr": (lambda ps: {"params": [_p(4)], "lr": -1.0}, r"learning rate"),
    "nan_target": (lambda ps: {"params": [_p(4)], "norm": "fixed", "target_norm": float("nan")}, r"target_norm"),
    "zero_param_recorded_target": (lambda ps: {"params": [torch.zeros(4, requires_grad=True)], "norm": "fixed"},
                                   r"zero norm"),
}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_add_param_group_changes_nothing(backend, case):
    ps, opt = trained(backend, 2)
    make, match = BAD_GROUPS[case]
    group = make(ps)
    before, groups = snapshot(opt), len(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(group)
    assert len(opt.param_groups) == groups
    assert_unchanged(opt, before)
    opt.step()  # and the optimizer still works


# --------------------------------------------------------------------------- 6. backends


@pytest.mark.skipif(CPU_MISSING is not None, reason=f"no cpu backend: {CPU_MISSING}")
def test_auto_picks_cpu_when_built():
    opt = FusedFixNorm([_p(3)], backend="auto")
    assert opt.requested_backend == "auto"
    assert opt.backend == "cpu"
    assert "cpu" in opt.backend_reason and "auto" in opt.backend_reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_runs_the_chosen_backend(backend, monkeypatch):
    calls = spy_on_backends(monkeypatch)
    ps = make_params(torch.float32)
    opt = FusedFixNorm(ps, lr=0.1, backend=backend)
    set_grads(ps, make_grads(ps, 1)[0])
    opt.step()
    assert calls == [backend]


MISSING = "fixnorm_ext._C was not built (simulated for this test)"


def test_missing_extension_explicit_cpu_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "EXTENSION_ERROR", MISSING)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the Triton tests set it for this process
    backends = available_backends("cpu")
    triton_missing = backends.pop("triton")
    assert isinstance(triton_missing, str) and triton_missing, triton_missing  # a reason: never CPU tensors compiled
    assert backends == {"reference": None, "foreach": None, "cpu": MISSING, "cuda": MISSING}
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is unavailable.*simulated for this test"):
        FusedFixNorm([_p(3)], backend="cpu")


def test_missing_extension_auto_falls_back_to_foreach(monkeypatch):
    monkeypatch.setattr(dispatch, "EXTENSION_ERROR", MISSING)
    ps = make_params(torch.float32)
    opt = FusedFixNorm(ps, lr=0.1, momentum=0.9, backend="auto")
    assert opt.backend == "foreach"
    assert "foreach" in opt.backend_reason and MISSING in opt.backend_reason
    set_grads(ps, make_grads(ps, 1)[0])
    opt.step()  # and it runs


def test_import_without_compiled_extension():
    code = "\n".join([
        "import sys",
        "sys.modules['fixnorm_ext._C'] = None  # makes `from fixnorm_ext import _C` raise ImportError",
        "import torch, fixnorm_ext",
        "reason = fixnorm_ext.available_backends()['cpu']",
        "assert isinstance(reason, str) and 'fixnorm_ext._C' in reason, reason",
        "assert fixnorm_ext.available_backends()['foreach'] is None",
        "assert not hasattr(torch.ops.fixnorm_ext, 'fixnorm_step'), 'the compiled op got loaded anyway'",
        "p = torch.ones(3, requires_grad=True)",
        "opt = fixnorm_ext.FusedFixNorm([p], lr=0.1, norm='fixed')",
        "assert opt.backend == 'foreach' and 'fixnorm_ext._C' in opt.backend_reason, opt.backend_reason",
        "try:",
        "    fixnorm_ext.FusedFixNorm([p], backend='cpu')",
        "except RuntimeError as exc:",
        "    assert 'fixnorm_ext._C' in str(exc), exc",
        "else:",
        "    raise AssertionError('backend=cpu accepted without the extension')",
        "p.grad = torch.tensor([1.0, 0.0, 0.0])",
        "opt.step()",
        "print('OK')",
    ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stdout + run.stderr


# --------------------------------------------------------------------------- 7. GradScaler


def tiny_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(6, 5, generator=gen).requires_grad_()
    w2 = torch.randn(3, 6, generator=gen).requires_grad_()
    b = torch.randn(3, generator=gen).requires_grad_()
    return [w1, w2, b]


def tiny_loss(ps, step):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
    w1, w2, b = ps
    return ((x @ w1.T).tanh() @ w2.T + b - y).square().mean()


def tiny_optimizer(ps, backend):
    return FusedFixNorm([{"params": ps[:1], "norm": "fixed"}, {"params": ps[1:2], "norm": "max", "target_norm": 1.0},
                         {"params": ps[2:]}], lr=0.1, momentum=0.9, dampening=0.5, backend=backend)


def test_optimizer_declares_amp_scaling():
    assert FusedFixNorm._step_supports_amp_scaling is True


# The scale 1000 is not a power of two, so the scaled gradients are rounded
# differently from the plain ones (a few float32 roundings, ~1e-7 relative,
# per gradient); over 3 steps the weights stay within 1e-5 relative / 1e-6
# absolute. A missing or doubled division by the scale is off by a factor 1000.
SCALED = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused_unscale", "unscale_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_step_matches_unscaled(backend, unscale_first):
    plain, scaled = tiny_model(), tiny_model()
    opt_plain, opt = tiny_optimizer(plain, backend), tiny_optimizer(scaled, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
    for step in range(3):
        opt_plain.zero_grad()
        tiny_loss(plain, step).backward()
        opt_plain.step()
        opt.zero_grad()
        scaler.scale(tiny_loss(scaled, step)).backward()
        if step == 0:
            torch.testing.assert_close(scaled[0].grad, 1000 * plain[0].grad, **SCALED)  # still scaled here
        if unscale_first:
            scaler.unscale_(opt)  # e.g. for gradient clipping: the step must not divide again
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 1000.0  # no overflow, no skipped step
    for i, (p, q) in enumerate(zip(scaled, plain)):
        torch.testing.assert_close(p, q, **SCALED, msg=lambda m: f"param {i}: {m}")
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], opt_plain.state[q]["momentum_buffer"],
                                   **SCALED, msg=lambda m: f"buffer {i}: {m}")
    assert not torch.equal(scaled[2].detach(), tiny_model()[2].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_overflow_on_first_step_is_a_no_op(backend):
    ps = tiny_model()
    opt = tiny_optimizer(ps, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
    scaler.scale(tiny_loss(ps, 0)).backward()
    ps[1].grad[0, 0] = float("inf")  # in a later tensor: the first one must not be stepped either
    before = snapshot(opt)
    scaler.step(opt)
    assert_unchanged(opt, before)
    assert not any("momentum_buffer" in opt.state.get(p, {}) for p in ps)
    scaler.update()
    assert scaler.get_scale() == 500.0  # the scaler saw the overflow

    opt.zero_grad()
    scaler.scale(tiny_loss(ps, 1)).backward()
    scaler.step(opt)
    scaler.update()
    # equals a first step from scratch: the buffer is the gradient itself (a
    # buffer left behind by the skipped step would give (1 - 0.5) g instead)
    fresh = tiny_model()
    fresh_opt = tiny_optimizer(fresh, backend)
    tiny_loss(fresh, 1).backward()
    fresh_opt.step()
    for i, (p, q) in enumerate(zip(ps, fresh)):
        torch.testing.assert_close(p, q, **SCALED, msg=lambda m: f"param {i}: {m}")
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"],
                                   **SCALED, msg=lambda m: f"buffer {i}: {m}")
        torch.testing.assert_close(fresh_opt.state[q]["momentum_buffer"], q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_keeps_its_backend_and_steps(backend, how):
    p = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    opt = FusedFixNorm([p], lr=0.1, momentum=0.9, norm="fixed", backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin.backend == backend and twin.requested_backend == backend
    (q,) = twin.param_groups[0]["params"]
    q.grad = p.grad.clone()
    twin.step()
    opt.step()
    assert torch.equal(p.detach(), q.detach())
    assert torch.equal(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_edit_of_recorded_target_takes_effect(backend):
    p = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    opt = FusedFixNorm([p], lr=0.1, momentum=0.9, norm="fixed", backend=backend)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    opt.state[p]["target_norm"].mul_(2.0)
    p.grad = torch.randn_like(p)
    opt.step()
    torch.testing.assert_close(p.detach().norm(), opt.state[p]["target_norm"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr="0.1"), TypeError, "lr must be a number"),
    (dict(lr=True), TypeError, "lr must be a number"),
    (dict(momentum="0.9"), TypeError, "momentum must be a number"),
    (dict(norm="fixed", target_norm=True), ValueError, "Invalid target_norm"),
    (dict(norm_dim=False), ValueError, "Invalid norm_dim"),
    (dict(norm_dim=0.0), ValueError, "Invalid norm_dim"),
])
def test_hyperparameters_of_the_wrong_type_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedFixNorm([torch.randn(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int64])
def test_unsupported_parameter_dtypes_are_refused_at_construction(dtype):
    with pytest.raises(ValueError, match="supports float32, float64, bfloat16 and float16"):
        FusedFixNorm([torch.zeros(3).to(dtype)], lr=0.1)


def test_checkpoint_of_empty_parameters_loads():
    """An empty tensor under norm control records the norm it has, 0; its
    checkpoint loads (the check that a target is > 0 refused it once)."""
    p, q = torch.nn.Parameter(torch.empty(0, 3)), torch.nn.Parameter(torch.empty(5, 0))
    groups = [{"params": [p], "norm": "fixed"}, {"params": [q], "norm": "fixed", "norm_dim": 0}]
    saved = FusedFixNorm(groups, lr=0.1).state_dict()
    opt = FusedFixNorm([{**g} for g in groups], lr=0.1)
    opt.load_state_dict(saved)
    assert opt.state[q]["target_norm"].shape == (5,) and float(opt.state[p]["target_norm"]) == 0.0
