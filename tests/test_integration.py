"""FusedFixNorm with the rest of PyTorch, as its own fused optimizers behave:
GradScaler, torch.compile, checkpoints across backends, step hooks and
duplicate parameters. (The contract tests that predate these are in
tests/test_optimizer.py; the GPU ones, CUDA graphs and map_location onto the
GPU, in tests/test_cuda.py.)

GradScaler's scales here are powers of two, so scaling a loss and unscaling
its gradients is exact in binary floating point (no overflow or underflow at
these magnitudes): a run with a scaler is compared bitwise with one without.
"""
import io

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from fixnorm_ext import FusedFixNorm, available_backends
from test_optimizer import BACKENDS, EPS32, assert_bitwise, tiny_loss, tiny_model, tiny_optimizer

# Triton on CPU tensors runs in its interpreter: small enough here.
WITH_TRITON = BACKENDS + (["triton"] if available_backends("cpu")["triton"] is None else [])


def scaled_run(backend, batches, bad=(), init_scale=2.0 ** 10, bad_value=float("inf")):
    """Train tiny_model over ``batches`` with a GradScaler; the batches in
    ``bad`` overflow (one gradient element set to ``bad_value`` after the
    backward pass, in the last tensor, so the first ones must be held back too).
    Returns the params, the optimizer, the scaler and the steps it skipped."""
    ps = tiny_model()
    opt = tiny_optimizer(ps, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    skipped = 0
    for step in batches:
        opt.zero_grad()
        scaler.scale(tiny_loss(ps, step)).backward()
        if step in bad:
            ps[-1].grad[0] = bad_value
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
    return ps, opt, scaler, skipped


def plain_run(backend, batches):
    ps = tiny_model()
    opt = tiny_optimizer(ps, backend)
    for step in batches:
        opt.zero_grad()
        tiny_loss(ps, step).backward()
        opt.step()
    return ps, opt


def assert_same_training(ps, opt, qs, other, what):
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert_bitwise(p.detach(), q.detach(), f"{what}: param {i}")
        mine, theirs = opt.state.get(p, {}), other.state.get(q, {})
        assert mine.keys() == theirs.keys(), f"{what}: state keys of param {i}"
        for key in mine:
            assert_bitwise(mine[key], theirs[key], f"{what}: {key} of param {i}")


@pytest.mark.parametrize("bad", [(0,), (2, 5), (0, 1, 6)], ids=["first", "middle", "first-two-and-later"])
@pytest.mark.parametrize("backend", WITH_TRITON)
def test_overflowing_batches_leave_the_trajectory_of_a_run_without_them(backend, bad):
    batches = range(8)
    ps, opt, scaler, skipped = scaled_run(backend, batches, bad, bad_value=float("nan") if 5 in bad else float("inf"))
    assert skipped == len(bad), "the scaler did not see every overflow"
    kept = [b for b in batches if b not in bad]
    qs, other, _, none_skipped = scaled_run(backend, kept)
    assert none_skipped == 0
    assert_same_training(ps, opt, qs, other, "scaled, with overflows vs without those batches")
    # And exactly what training without a scaler at all gives (power-of-two scales).
    rs, plain = plain_run(backend, kept)
    assert_same_training(ps, opt, rs, plain, "scaled vs unscaled")


@pytest.mark.parametrize("backend", WITH_TRITON)
def test_what_the_gradients_hold_after_a_step(backend):
    """As torch.optim.SGD(fused=True) leaves them: a finite step divides the
    gradients by the scale (they hold the true gradients afterwards, as after
    GradScaler.unscale_); a skipped step leaves them as backward made them,
    scaled and non-finite. Fused SGD is held to the same rule in the same loop
    (its params, hence its gradients, differ: it does no norm control)."""
    ps, sgd_ps = tiny_model(), tiny_model()
    opt = tiny_optimizer(ps, backend)
    sgd = torch.optim.SGD(sgd_ps, lr=0.1, momentum=0.9, fused=True)
    ours, theirs = torch.amp.GradScaler("cpu", init_scale=8.0), torch.amp.GradScaler("cpu", init_scale=8.0)
    for step, overflow in enumerate([False, True, False]):
        for params, optimizer, scaler in ((ps, opt, ours), (sgd_ps, sgd, theirs)):
            optimizer.zero_grad()
            scaler.scale(tiny_loss(params, 0)).backward()
            if overflow:
                params[1].grad[0, 0] = float("inf")
            backward_made, scale = [p.grad.clone() for p in params], scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            for i, (p, made) in enumerate(zip(params, backward_made)):
                expected = made if overflow else made / scale
                assert torch.equal(p.grad, expected), f"step {step} ({type(optimizer).__name__}): grad {i}"


@pytest.mark.parametrize("backend", WITH_TRITON)
def test_unscale_first_then_step_divides_once(backend):
    # GradScaler.unscale_ (for clipping) divides in place and hands no scale to
    # the step: the gradients must not be divided a second time.
    ps = tiny_model()
    opt = tiny_optimizer(ps, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    scaler.scale(tiny_loss(ps, 0)).backward()
    scaler.unscale_(opt)
    unscaled = [p.grad.clone() for p in ps]
    scaler.step(opt)
    for i, (p, g) in enumerate(zip(ps, unscaled)):
        assert torch.equal(p.grad, g), f"grad {i}"
    rs, plain = plain_run(backend, [0])
    assert_same_training(ps, opt, rs, plain, "unscale_ + step vs unscaled")


# --------------------------------------------------------------------------- torch.compile

COMPILED = [b for b in BACKENDS if b != "reference"] + (["triton"] if "triton" in WITH_TRITON else [])


def compiled_pair(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    twin.load_state_dict(model.state_dict())

    def optimizer(m):
        return FusedFixNorm([{"params": [m[0].weight], "norm": "fixed"},
                             {"params": [m[2].weight], "norm": "max", "target_norm": 0.5},
                             {"params": [m[0].bias, m[2].bias]}], lr=0.2, momentum=0.9, nesterov=True,
                            backend=backend)

    return model, optimizer(model), twin, optimizer(twin)


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)


@pytest.mark.parametrize("backend", COMPILED)
def test_step_compiles_with_fullgraph(backend):
    """opt.step() inside torch.compile(fullgraph=True), a tensor lr changed every step:
    no graph break (one would raise), and every compiled step equals the eager
    one: bitwise where the step is one custom op."""
    model, opt, twin, eager = compiled_pair(backend)
    torch._dynamo.reset()
    graphs = []

    def inductor_recording(gm, example_inputs):
        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    @torch.compile(fullgraph=True, backend=inductor_recording)
    def compiled_step():
        opt.step()

    lrs = [torch.tensor(0.2) for _ in opt.param_groups]  # tensors: a new value is no recompile
    for o in (opt, eager):
        for group, lr in zip(o.param_groups, lrs):
            group["lr"] = lr
    for step in range(8):  # the first step creates the momentum buffers
        for k, lr in enumerate(lrs):  # as a scheduler would
            lr.fill_(0.2 / (step + 1 + k))
        for m in (model, twin):
            m.zero_grad()
            x, y = batch(step)
            torch.nn.functional.mse_loss(m(x), y).backward()
        compiled_step()
        eager.step()
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            if backend == "foreach":
                # Inductor compiles the foreach ops into its own loops (fused,
                # other summation order for the norms): float32 closeness.
                torch.testing.assert_close(p.detach(), q.detach(), rtol=4 * EPS32, atol=4 * EPS32,
                                           msg=lambda m: f"step {step}: param {i}: {m}")
            else:  # one custom op, the same kernel as eager
                assert_bitwise(p.detach(), q.detach(), f"step {step}: param {i}")
    # Traced, not run eagerly: a graph for the first step (it creates the
    # buffers), then one for all the others (with the triton backend there is
    # sometimes one more compile of that same graph early on; never more).
    assert 2 <= len(graphs) <= 3, f"{len(graphs)} graphs for 8 steps"
    if backend != "foreach":
        assert all(f"fixnorm_ext.fixnorm_step{'_triton' if backend == 'triton' else ''}" in code for code in graphs)


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_training_step_matches_eager(backend):
    model, opt, twin, eager = compiled_pair(backend)
    torch._dynamo.reset()

    def train_step(m, optimizer, x, y):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    compiled = torch.compile(train_step)
    for step in range(4):
        x, y = batch(step)
        got, want = compiled(model, opt, x, y), train_step(twin, eager, x, y)
        # The forward and backward are compiled (inductor may round them
        # differently from eager), the step is the same kernel: float32 closeness.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")
    assert model[0].weight.norm().item() == pytest.approx(eager.state[twin[0].weight]["target_norm"].item(),
                                                          rel=1e-6)


# --------------------------------------------------------------------------- checkpoints across backends

AVAILABLE = [name for name, why in available_backends("cpu").items() if why is None]
CROSS = [(a, b) for a in AVAILABLE for b in AVAILABLE if a != b]


def _ids(pair):
    return f"{pair[0]}-to-{pair[1]}"


@pytest.mark.parametrize("saved_with, loaded_into", CROSS, ids=[_ids(p) for p in CROSS])
def test_checkpoint_moves_between_backends(saved_with, loaded_into):
    """Saved after 3 steps with one backend, loaded into an optimizer of
    another, 3 more steps: the same training as staying with the first one
    (float32 rounding apart: the backends round differently), with the
    recorded target norms exactly those of the checkpoint."""
    ps = tiny_model()
    opt = tiny_optimizer(ps, saved_with)
    for step in range(3):
        opt.zero_grad()
        tiny_loss(ps, step).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    moved = tiny_optimizer(qs, loaded_into)
    buffer.seek(0)
    moved.load_state_dict(torch.load(buffer))
    assert moved.backend == loaded_into
    assert torch.equal(moved.state[qs[0]]["target_norm"], opt.state[ps[0]]["target_norm"])
    for step in range(3, 6):
        for params, optimizer in ((ps, opt), (qs, moved)):
            optimizer.zero_grad()
            tiny_loss(params, step).backward()
            optimizer.step()
    for i, (p, q) in enumerate(zip(ps, qs)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")
        torch.testing.assert_close(moved.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"buffer {i}: {m}")


# --------------------------------------------------------------------------- the Optimizer contract

@pytest.mark.parametrize("backend", BACKENDS)
def test_step_hooks_fire_around_the_step(backend):
    ps = tiny_model()
    opt = tiny_optimizer(ps, backend)
    seen = []

    def pre(optimizer, args, kwargs):
        seen.append(("pre", optimizer is opt, ps[0].detach().clone()))

    def post(optimizer, args, kwargs):
        seen.append(("post", optimizer is opt, ps[0].detach().clone()))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    tiny_loss(ps, 0).backward()
    before = ps[0].detach().clone()
    opt.step()
    assert [(kind, same) for kind, same, _ in seen] == [("pre", True), ("post", True)]
    assert torch.equal(seen[0][2], before)           # the pre hook ran before the update
    assert torch.equal(seen[1][2], ps[0].detach())   # the post hook after it
    assert not torch.equal(seen[1][2], before)
    for handle in handles:
        handle.remove()
    opt.step()
    assert len(seen) == 2


@pytest.mark.parametrize("params", ["same group", "same group, named", "two groups"])
def test_duplicate_parameters_are_refused(params):
    p, q = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    spec = {"same group": [p, q, p], "same group, named": [("a", p), ("b", p)],
            "two groups": [{"params": [p, q]}, {"params": [p], "norm": "fixed"}]}[params]
    match = "more than one parameter group" if params == "two groups" else "same parameter more than once"
    with pytest.raises(ValueError, match=match):
        FusedFixNorm(spec, lr=0.1)


def test_duplicate_in_add_param_group_changes_nothing():
    p, q = torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    opt = FusedFixNorm([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    groups, state = [dict(g) for g in opt.param_groups], {k: dict(v) for k, v in opt.state.items()}
    for bad in ([q, q], [q, p]):
        with pytest.raises(ValueError):
            opt.add_param_group({"params": bad, "norm": "fixed"})
        assert [dict(g) for g in opt.param_groups] == groups
        assert opt.state.keys() == state.keys() and q not in opt.state


def test_parameters_sharing_memory_are_refused():
    # Two Parameters made on one tensor (a mis-tied weight): each would be
    # renormalized on its own over the same numbers, differently per backend.
    t = torch.randn(4, 3)
    with pytest.raises(ValueError, match="share memory"):
        FusedFixNorm([torch.nn.Parameter(t), torch.nn.Parameter(t)], lr=0.1, norm="fixed")
    overlapping = torch.randn(20)
    with pytest.raises(ValueError, match="share memory"):
        FusedFixNorm([torch.nn.Parameter(overlapping[:12]), torch.nn.Parameter(overlapping[8:])], lr=0.1)
    opt = FusedFixNorm([torch.nn.Parameter(overlapping[:10])], lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [torch.nn.Parameter(overlapping[5:15])]})
    assert len(opt.param_groups) == 1
    # Disjoint views of one buffer are separate parameters, and fine.
    FusedFixNorm([torch.nn.Parameter(overlapping[:10]), torch.nn.Parameter(overlapping[10:])], lr=0.1)
