"""The Triton kernels of kernels/fixnorm_triton.py against fixnorm_ext.reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, see tests/triton_setup.py); with one, compiled,
on CUDA tensors. The interpreter is slow, so the tensors are small and the
plan's chunks tiny (256 bytes) and the tiles smaller still, so that every
tensor spans several chunks and every chunk several tiles plus a tail.

Each step is compared with one float64 reference step taken from the
kernels' current params and buffers, within the one-step tolerance table of
tests/test_backends.py.
"""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from triton_setup import DEVICE, import_triton, interpreted

triton = import_triton()

from fixnorm_ext import reference  # noqa: E402
from fixnorm_ext.dispatch import GroupHyper, build_cuda_plan, build_hparams, build_tables  # noqa: E402
from test_backends import assert_close_dtype  # noqa: E402  (the one tolerance table)

from kernels import fixnorm_triton  # noqa: E402

K = interpreted(fixnorm_triton)

CHUNK_BYTES = 256
BLOCK = 32
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# ~10 tensors, a few hundred elements: odd sizes, size 1, 0-d, empty tensors
# between others, rows for norm_dim=0 (short ones, and ones longer than a chunk).
SHAPES = [(7,), (12, 10), (0,), (1,), (3, 3, 3, 3), (70,), (0, 4), (4, 45), (), (5, 1, 1, 1), (131,), (2, 0)]
GROUPS = [
    GroupHyper(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False,
               norm="fixed", norm_dim=None),
    GroupHyper(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False,
               norm="fixed", norm_dim=0),
    GroupHyper(lr=0.2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=True,
               norm="max", norm_dim=None),
    GroupHyper(lr=0.05, momentum=0.5, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False,
               norm=None, norm_dim=None),
    GroupHyper(lr=0.3, momentum=0.8, dampening=0.0, weight_decay=0.05, nesterov=True, maximize=True,
               norm="max", norm_dim=0),
]
GROUP_INDEX = [0, 1, 3, 2, 0, 3, 1, 4, 1, 4, 2, 1]


def make_params(dtype, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]


def make_grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(DEVICE) for p in params]


def make_targets(params, group_index, groups):
    """Recorded targets for "fixed" (the initial norms), explicit ones for
    "max": one that clamps and one that (mostly) does not."""
    out = []
    for p, gi in zip(params, group_index):
        h = groups[gi]
        if h.norm is None:
            out.append(None)
        elif h.norm == "fixed":
            out.append(reference.segment_norms(p.cpu(), h.norm_dim))
        else:
            out.append(1.5 if h.norm_dim is None else 0.8)
    return out


class TritonSteps:
    """The host side of a step, as a backend does it: the plan and targets
    once, the pointer and flag tables whenever buffers appear, one call of
    the launcher per dtype."""

    def __init__(self, params, group_index=GROUP_INDEX, groups=GROUPS, *, pack_segments=False):
        self.params, self.group_index, self.groups = params, list(group_index), list(groups)
        self.bufs = [None] * len(params)
        self.targets = make_targets(params, group_index, groups)
        meta, flat_targets = build_tables(params, self.bufs, group_index=self.group_index, groups=self.groups,
                                          targets=self.targets)
        plan = build_cuda_plan([tuple(p.shape) for p in params], [p.element_size() for p in params], meta,
                               lag_chunks=1, chunk_bytes=CHUNK_BYTES, pack_segments=pack_segments)
        self.plan = [t.to(DEVICE) for t in plan]
        self.flat_targets = flat_targets.to(DEVICE)
        self.scratch = torch.empty(K.scratch_size(self.plan, self.flat_targets), dtype=torch.float64, device=DEVICE)

    def step(self, grads, *, grad_scale=None, found_inf=None, **launch):
        init = [b is None and self.groups[gi].momentum != 0 for b, gi in zip(self.bufs, self.group_index)]
        bufs = [torch.empty_like(p) if first else b for p, b, first in zip(self.params, self.bufs, init)]
        ptrs, flags = K.tensor_tables(self.params, grads, bufs, init)
        hparams = build_hparams(self.groups).to(DEVICE)
        for dtype in sorted({p.dtype for p in self.params}, key=str):
            K.fixnorm_triton_step(dtype, self.plan, ptrs, flags, hparams, self.flat_targets, grad_scale=grad_scale,
                                  found_inf=found_inf, scratch=self.scratch, block=BLOCK, **launch)
        if found_inf is None or found_inf.item() == 0:  # the test's own bookkeeping, after the step
            self.bufs = bufs

    def reference_step(self, grads, grad_scale=None):
        """Float64 (params, buffers) of one reference step from the current state."""
        out = []
        for p, g, b, gi, t in zip(self.params, grads, self.bufs, self.group_index, self.targets):
            h = self.groups[gi]
            p64 = p.detach().cpu().double().clone()  # the reference writes into it
            buf = reference.fixnorm_step_one(
                p64, g.cpu().double(), None if b is None else b.cpu().double().clone(), lr=h.lr, momentum=h.momentum,
                dampening=h.dampening, weight_decay=h.weight_decay, nesterov=h.nesterov, maximize=h.maximize,
                norm=h.norm, target=None if t is None else torch.as_tensor(t, dtype=torch.float64),
                norm_dim=h.norm_dim, grad_scale=grad_scale)
            out.append((p64, buf))
        return out

    def check(self, expected, what):
        for i, ((p64, buf64), p, b) in enumerate(zip(expected, self.params, self.bufs)):
            assert_close_dtype(p.cpu(), p64.to(p.dtype), p.dtype, f"{what} param {i} {tuple(p.shape)}")
            assert (b is None) == (buf64 is None), f"{what} buffer {i}"
            if b is not None:
                assert_close_dtype(b.cpu(), buf64.to(p.dtype), p.dtype, f"{what} buffer {i} {tuple(p.shape)}")


def scalar(value):
    return torch.tensor([value], dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steps_against_reference(dtype):
    """Three steps: buffers created (plain), then with a GradScaler scale,
    then with found_inf present but zero."""
    params = make_params(dtype)
    run = TritonSteps(params)
    for step, (scale, found_inf) in enumerate([(None, None), (8.0, None), (0.5, 0.0)]):
        grads = make_grads(params, step)
        if scale is not None:
            grads = [(g.double() * scale).to(dtype) for g in grads]
        expected = run.reference_step(grads, grad_scale=scale)
        run.step(grads, grad_scale=None if scale is None else scalar(scale),
                 found_inf=None if found_inf is None else scalar(found_inf))
        run.check(expected, f"{dtype} step {step}")


def test_norm_control_is_active():
    """The groups above really rescale: fixed tensors end on their recorded
    norms, clamped rows at most at their bound, some of them on it."""
    params = make_params(torch.float32)
    run = TritonSteps(params)
    run.step(make_grads(params, 0))
    clamped_rows = 0
    for p, gi, t in zip(params, GROUP_INDEX, run.targets):
        h = GROUPS[gi]
        if h.norm is None or p.numel() == 0:
            continue
        n = reference.segment_norms(p.cpu(), h.norm_dim)
        if h.norm == "fixed":
            torch.testing.assert_close(n, torch.as_tensor(t, dtype=torch.float64).expand_as(n), rtol=1e-6, atol=0)
        else:
            assert (n <= t * (1 + 1e-6)).all()
            clamped_rows += int((n > t * (1 - 1e-6)).sum())
    assert clamped_rows > 0


@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "later_step"])
def test_found_inf_skips_everything(first_step):
    params = make_params(torch.bfloat16)
    run = TritonSteps(params)
    if not first_step:
        run.step(make_grads(params, 0))
    before = [p.clone() for p in params]
    bufs_before = [None if b is None else b.clone() for b in run.bufs]
    scratch_before = run.scratch.clone()
    run.step(make_grads(params, 1), grad_scale=scalar(2.0), found_inf=scalar(1.0))
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    for b, c in zip(run.bufs, bufs_before):
        assert (b is None and c is None) or torch.equal(b, c)
    # Not even the scratch is touched: every kernel leaves before any work.
    assert torch.equal(run.scratch.view(torch.int64), scratch_before.view(torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype):
    """Two runs from the same state give the same bits, the second with a
    grid smaller than the number of chunks (programs loop over chunks)."""
    results = []
    for launch in ({}, {"max_programs": 3}):
        params = make_params(dtype)
        run = TritonSteps(params)
        run.step(make_grads(params, 0), **launch)
        results.append(params + [b for b in run.bufs if b is not None])
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for a, b in zip(*results):
        assert torch.equal(a.view(bits), b.view(bits))


def test_mixed_dtypes_in_one_plan():
    """One plan for float32 and bfloat16 tensors: each dtype's launches touch
    only their own tensors."""
    params = make_params(torch.float32, SHAPES[:6]) + make_params(torch.bfloat16, SHAPES[6:], seed=1)
    run = TritonSteps(params)
    for step in range(2):
        grads = make_grads(params, step)
        expected = run.reference_step(grads)
        run.step(grads)
        run.check(expected, f"mixed step {step}")


def test_packed_segments():
    """A plan with several short rows packed into one chunk (one partial per
    row) gives the same step."""
    params = make_params(torch.float32)
    run = TritonSteps(params, pack_segments=True)
    assert (run.plan[1][:, 4] > 1).any()  # some chunks hold several segments
    for step in range(2):
        grads = make_grads(params, step)
        expected = run.reference_step(grads)
        run.step(grads)
        run.check(expected, f"packed step {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounds_once_to_nearest_even(dtype):
    """p <- 0 - 1.5 * g is exact in float32 and, for most bfloat16/float16 g,
    halfway between two neighbours of the storage type: the result must be
    torch's round-to-nearest-even of it, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    g = (torch.randn(300, generator=gen) * torch.exp2(torch.randint(-8, 8, (300,), generator=gen))).to(dtype)
    params = [torch.zeros(300, dtype=dtype, device=DEVICE)]
    group = GroupHyper(lr=1.5, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                       norm=None, norm_dim=None)
    run = TritonSteps(params, [0], [group])
    run.step([g.to(DEVICE)])
    expected = (-1.5 * g.float()).to(dtype)
    assert torch.equal(params[0].cpu().view(torch.int16), expected.view(torch.int16))


# Compiled Triton, without a GPU: the kernels as compiled for sm_90 (Triton
# ships ptxas). Run in a fresh process, where the kernels are not interpreted.
COMPILE_CHECK = r"""
import re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import fixnorm_triton as K

ptrs = {"tensors": "*i64", "chunks": "*i64", "ptrs": "*i64", "flags": "*i32", "hparams": "*fp64",
        "grad_scale": "*fp32", "found_inf": "*fp32"}
norm_sig = {**ptrs, "partials": "*fp64", "num_chunks": "i32"}
apply_sig = {**ptrs, "factors": "*fp64", "num_chunks": "i32"}
finalize_sig = {"tensors": "*i64", "flags": "*i32", "seg_slots": "*i64", "partials": "*fp64", "targets": "*fp64",
                "factors": "*fp64", "found_inf": "*fp32", "num_tensors": "i32"}
target = GPUTarget("cuda", 90, 32)
options = {"num_warps": 4, **K.LAUNCH_OPTIONS}

def ptx(kernel, signature, constexprs):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                          options=options).asm["ptx"]

ptx(K._fixnorm_finalize_kernel, finalize_sig, {"DTYPE_CODE": 0, "HAS_FOUND_INF": True, "SEG_BLOCK": 128})
for dtype, code in ((tl.float32, 0), (tl.bfloat16, 2)):
    consts = {"DTYPE": dtype, "ACC": tl.float32, "DTYPE_CODE": code, "HAS_GRAD_SCALE": True, "HAS_FOUND_INF": True,
              "BLOCK": 1024}
    for kernel, signature in ((K._fixnorm_norm_pass_kernel, norm_sig), (K._fixnorm_apply_pass_kernel, apply_sig)):
        text = ptx(kernel, signature, consts)
        what = f"{kernel.fn.__name__} {dtype}"
        # aligned whole tiles: 16-byte accesses through the pointers made from the table's integers
        assert "ld.global.v4.b32" in text, f"{what}: no vectorized loads"
        # every product and sum explicitly rounded: nothing left for the compiler to contract
        assert "fma.rn.f32" in text, what
        loose = re.findall(r"\b(?:mul|add|sub)\.f32\b", text)
        assert not loose, f"{what}: contractible {sorted(set(loose))}"
print("compiled", triton.__version__)
"""


def test_kernels_compile_for_sm90():
    """Compiled Triton accepts the kernels (int64 table entries as pointers,
    tuples of hyperparameters) and gives aligned whole tiles vector accesses;
    no GPU needed."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout
