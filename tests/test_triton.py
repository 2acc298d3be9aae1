"""The ``"triton"`` backend of FusedFixNorm against fixnorm_ext.reference.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, see tests/triton_setup.py); with one, compiled,
on CUDA tensors. The interpreter is slow, so the tensors are small, and the
plan's chunks (FIXNORM_TRITON_CHUNK_BYTES) and tiles (FIXNORM_TRITON_BLOCK)
tiny, so that tensors span several chunks and chunks several tiles plus a tail.

Each step is compared with one float64 reference step from the optimizer's
state before it, within the one-step tolerance table of tests/test_backends.py.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from triton_setup import DEVICE, import_triton, interpreted

triton = import_triton()

from fixnorm_ext import FusedFixNorm, available_backends, dispatch, reference, triton_backend  # noqa: E402
from test_backends import assert_close_dtype, group_specs  # noqa: E402  (the one tolerance table)

if available_backends(DEVICE)["triton"] is not None:
    pytest.skip(f"no triton backend here: {available_backends(DEVICE)['triton']}", allow_module_level=True)

interpreted(importlib.import_module(triton_backend.KERNELS))

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Odd sizes, size 1, a 0-d tensor, empty tensors between others, rows for
# norm_dim=0 shorter and longer than a chunk, and transposed (non-contiguous) ones.
SHAPES = [(7,), (33, 5), (0,), (1,), (3, 3, 3, 3), (), (12, 10, "t"), (0, 4), (5, 1, 1, 1), (70,), (4, 45, "t"),
          (131,)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setenv("FIXNORM_TRITON_CHUNK_BYTES", "512")
    monkeypatch.setenv("FIXNORM_TRITON_BLOCK", "64")


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        if shape and shape[-1] == "t":
            p = torch.randn(shape[1], shape[0], generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).t()
            assert not p.is_contiguous()
        else:
            p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
        params.append(p.requires_grad_())
    return params


def make_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return [(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype).to(DEVICE)
            for p in params]


def reference_step(opt, params, grads, grad_scale=None):
    """Float64 (param, buffer) of one reference step per param, from the optimizer's current state."""
    out = []
    for p, g in zip(params, grads):
        group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
        buf = opt.state[p].get("momentum_buffer") if group["momentum"] != 0 else None
        target = None
        if group["norm"] is not None:
            target = (torch.tensor(float(group["target_norm"]), dtype=torch.float64)
                      if group["target_norm"] is not None else opt.state[p]["target_norm"].cpu())
        p64 = p.detach().cpu().double().clone()
        new_buf = reference.fixnorm_step_one(
            p64, g.cpu().double(), None if buf is None else buf.cpu().double().clone(), lr=float(group["lr"]),
            momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], maximize=group["maximize"], norm=group["norm"], target=target,
            norm_dim=group["norm_dim"], grad_scale=grad_scale)
        out.append((p64, new_buf))
    return out


def check(opt, params, expected, what):
    for i, (p, (p64, buf64)) in enumerate(zip(params, expected)):
        assert_close_dtype(p.detach().cpu(), p64.to(p.dtype), p.dtype, f"{what} param {i} {tuple(p.shape)}")
        buf = opt.state[p].get("momentum_buffer")
        assert (buf is None) == (buf64 is None), f"{what} buffer {i}"
        if buf is not None:
            assert buf.dtype == p.dtype and buf.shape == p.shape and buf.device == p.device
            assert_close_dtype(buf.cpu(), buf64.to(p.dtype), p.dtype, f"{what} buffer {i} {tuple(p.shape)}")


def take_step(opt, params, grads, grad_scale=None):
    expected = reference_step(opt, params, grads, grad_scale)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    return expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steps_against_reference(dtype):
    """Three steps (the first creates the buffers) of mixed groups: fixed
    whole-tensor, fixed per row (norm_dim=0), max, none, with different
    momentum / nesterov / dampening / weight_decay / maximize."""
    params = make_params(dtype=dtype)
    opt = FusedFixNorm(group_specs(params), lr=0.1, backend="triton")
    assert opt.backend == "triton"
    for step in range(3):
        expected = take_step(opt, params, make_grads(params, step))
        check(opt, params, expected, f"{dtype} step {step}")


def test_mixed_dtypes():
    params = make_params(SHAPES[:6], torch.float32) + make_params(SHAPES[6:], torch.bfloat16, seed=1)
    opt = FusedFixNorm(group_specs(params), lr=0.1, backend="triton")
    for step in range(2):
        expected = take_step(opt, params, make_grads(params, step))
        check(opt, params, expected, f"mixed step {step}")


def test_grad_scaler_tensors():
    """GradScaler's tensors set on the optimizer: the scale divides the
    gradients; a non-zero found_inf skips the whole step."""
    params = make_params(SHAPES[:8], torch.bfloat16)
    opt = FusedFixNorm(group_specs(params), lr=0.1, backend="triton")
    opt.grad_scale = torch.tensor(8.0, device=DEVICE)
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    for step in range(2):
        expected = take_step(opt, params, make_grads(params, step, scale=8.0), grad_scale=8.0)
        check(opt, params, expected, f"scaled step {step}")
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p].get("momentum_buffer") for p in params]
    bufs_before = [None if b is None else b.clone() for b in bufs]
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    for p, g in zip(params, make_grads(params, 2, scale=8.0)):
        p.grad = g
    opt.step()
    for p, q, b, c in zip(params, before, bufs, bufs_before):
        assert torch.equal(p.detach(), q)
        assert (b is None and c is None) or torch.equal(b, c)


def test_found_inf_on_the_first_step_creates_no_state():
    params = make_params(SHAPES[:5])
    opt = FusedFixNorm(params, lr=0.1, momentum=0.9, norm="fixed", backend="triton")
    before = [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(2.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))
    assert all("momentum_buffer" not in opt.state[p] for p in params)


def test_tensor_lr_changed_in_place():
    """A one-element lr tensor (on the device: read there), changed in place
    between steps, as a scheduler working on tensors does."""
    params = make_params(SHAPES[:6])
    lr = torch.tensor(0.1, dtype=torch.float32, device=DEVICE)
    opt = FusedFixNorm(group_specs(params), lr=lr, backend="triton")
    for step, value in enumerate([0.1, 0.05, 0.2]):
        lr.fill_(value)
        expected = take_step(opt, params, make_grads(params, step))
        check(opt, params, expected, f"lr {value} step {step}")


def test_pointer_table_follows_the_tensors():
    """The pointer table is uploaded again when an address changes (new
    gradients after zero_grad(set_to_none=True)), and only then."""
    triton_backend._POINTER_TABLES.clear()
    # Contiguous tensors: a gradient whose strides differ from its param's is
    # copied to a new tensor every step (dispatch._run_flat).
    params = make_params(SHAPES[:6])
    opt = FusedFixNorm(group_specs(params), lr=0.1, backend="triton")
    grads = make_grads(params, 0)
    take_step(opt, params, grads)
    assert len(triton_backend._POINTER_TABLES) == 1
    # Same gradient tensors, new values: the table of the step after the
    # buffers were created, then that one again.
    for step in (1, 2):
        new = make_grads(params, step)
        for g, n in zip(grads, new):
            g.copy_(n)
        expected = take_step(opt, params, grads)
        check(opt, params, expected, f"in-place grads step {step}")
    assert len(triton_backend._POINTER_TABLES) == 2
    opt.zero_grad(set_to_none=True)
    expected = take_step(opt, params, make_grads(params, 3))  # new tensors
    check(opt, params, expected, "new grads")
    assert len(triton_backend._POINTER_TABLES) == 3


def _op_inputs(with_scaler):
    """Arguments of one call of the custom op for a few small tensors."""
    params = [p.detach() for p in make_params([(7,), (3, 5), (0,), ()])]
    groups = [dispatch.GroupHyper(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
                                  maximize=False, norm="fixed", norm_dim=0),
              dispatch.GroupHyper(lr=0.2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                  maximize=True, norm=None, norm_dim=None)]
    group_index = [0, 0, 1, 0]
    targets = [1.5, 2.0, None, 0.5]
    device = params[0].device
    plan, _, _ = triton_backend._make_plan(params, group_index, groups, device)
    flat = dispatch.flat_targets(params, group_index=group_index, groups=groups, targets=targets, device=device)
    hparams = triton_backend._hparams(groups, device, {})
    grads = [torch.randn_like(p) for p in params]
    has_buffer = [True, True, False, True]
    bufs = [torch.randn_like(p) for p, has in zip(params, has_buffer) if has]
    scale = torch.tensor(2.0, device=device) if with_scaler else None
    found_inf = torch.tensor(0.0, device=device) if with_scaler else None
    return (params, grads, bufs, has_buffer, [False, True, False, False], hparams, flat, plan, scale, found_inf, 32)


@pytest.mark.parametrize("with_scaler", [False, True], ids=["plain", "grad_scaler"])
def test_opcheck(with_scaler):
    torch.library.opcheck(torch.ops.fixnorm_ext.fixnorm_step_triton.default, _op_inputs(with_scaler))


def test_compiled_training_step_matches_eager():
    """torch.compile traces a training step that calls opt.step() (the op
    through its fake implementation) and gives the eager result."""
    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(DEVICE)
        weights = [model[0].weight, model[2].weight]
        others = [model[0].bias, model[2].bias]
        opt = FusedFixNorm([{"params": weights, "norm": "fixed"}, {"params": others}], lr=0.1, momentum=0.9,
                           backend="triton")
        return model, opt

    def train_step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    eager_model, eager_opt = build()
    compiled_model, compiled_opt = build()
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(train_step, backend=backend)
    for _ in range(3):
        train_step(eager_model, eager_opt, x)
        compiled(compiled_model, compiled_opt, x)
    assert any("fixnorm_step_triton" in op for op in ops), sorted(set(ops))
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)
    torch._dynamo.reset()


def test_auto_picks_triton_only_on_the_gpu(monkeypatch):
    """On CUDA tensors 'auto' takes 'cuda', else 'triton'; never 'triton' for
    CPU tensors (its interpreter is for tests)."""
    assert dispatch.resolve_backend("auto", {"cpu"})[0] != "triton"
    monkeypatch.setattr(dispatch, "_cuda_unavailable", lambda device: "no cuda kernel (simulated)")
    monkeypatch.setattr(triton_backend, "unavailable", lambda device: None)
    backend, why = dispatch.resolve_backend("auto", {"cuda"})
    assert backend == "triton" and "no cuda kernel (simulated)" in why
    assert dispatch.resolve_backend("auto", {"cpu"})[0] != "triton"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # set above in this process (on the CPU) or never
    reason = available_backends("cpu")["triton"]
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable.*TRITON_INTERPRET"):
        FusedFixNorm([torch.ones(3)], backend="triton")


def test_package_imports_without_triton():
    code = "\n".join([
        "import sys",
        "sys.modules['triton'] = None  # an import of it fails",
        "import fixnorm_ext",
        "reason = fixnorm_ext.available_backends('cpu')['triton']",
        "assert 'Triton is not installed' in reason, reason",
        "try:",
        "    fixnorm_ext.FusedFixNorm([fixnorm_ext.reference.torch.ones(3)], backend='triton')",
        "except RuntimeError as exc:",
        "    assert 'Triton is not installed' in str(exc), exc",
        "else:",
        "    raise AssertionError('backend triton was accepted without Triton')",
        "print('ok')",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("mode, norm_dim", [("fixed", None), ("max", None), ("max", 0)])
def test_nan_norm_gives_nan_as_the_reference(mode, norm_dim):
    """A NaN gradient makes its segment's norm NaN: the factor is NaN, so the
    whole segment turns NaN (never clamped to 1); other segments untouched."""
    p = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE))
    opt = FusedFixNorm([p], lr=0.1, norm=mode, target_norm=0.5, norm_dim=norm_dim, backend="triton")
    grad = torch.ones(3, 4)
    grad[0, 1] = float("nan")
    p.grad = grad.to(DEVICE)
    expected = p.detach().cpu().clone()
    reference.fixnorm_step_one(expected, grad, None, lr=0.1, norm=mode, target=torch.tensor(0.5, dtype=torch.float64),
                               norm_dim=norm_dim)
    opt.step()
    got = p.detach().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert bool(torch.isnan(got[0]).all())
    assert torch.isnan(got[1:]).any().item() == (norm_dim is None)
