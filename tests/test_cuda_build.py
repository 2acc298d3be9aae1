"""What of the CUDA backend runs without a GPU: the build (toolkit detection,
the kernel compiled in and registered) and the plan the kernel follows.

The plan (csrc/fixnorm_meta.h) is checked two ways: its invariants (every
element in exactly one chunk, every segment's partials where its chunks put
them, every norm pass of a tensor queued before its apply passes), and a
float64 walk through it that does what each kernel pass does, chunk by chunk,
compared with the reference step. The kernels themselves run in
tests/test_cuda.py, on a GPU.
"""
import importlib.util
import math
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
import torch

from fixnorm_ext import available_backends, reference
from fixnorm_ext.dispatch import EXTENSION_ERROR, GroupHyper, build_cuda_plan, build_tables

REPO = Path(__file__).resolve().parent.parent


def load_setup():
    spec = importlib.util.spec_from_file_location("fixnorm_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() only runs as __main__
    return module


# --------------------------------------------------------------------------- build


def fake_toolkit(tmp_path: Path) -> tuple[Path, Path]:
    """A toolkit folder with an nvcc that answers --dryrun like the real one,
    and a wrapper script elsewhere that runs it (as /usr/local/bin/nvcc does here)."""
    home = tmp_path / "toolkits" / "cuda-99.0"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={home}/bin"\necho "#$ TOP={home}/bin/.."\n')
    wrapper_dir = tmp_path / "wrappers"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for f in (nvcc, wrapper):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return home, wrapper_dir


def test_wrapper_nvcc_leads_to_its_toolkit(tmp_path, monkeypatch):
    setup = load_setup()
    home, wrapper_dir = fake_toolkit(tmp_path)
    assert setup._toolkit_of_nvcc(str(wrapper_dir / "nvcc")) == str(home.resolve())


def test_cuda_home_order(tmp_path, monkeypatch):
    setup = load_setup()
    home, wrapper_dir = fake_toolkit(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert setup.find_cuda_home() == (str(home.resolve()), "$CUDA_HOME")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    found, why = setup.find_cuda_home()
    assert found is None and "has no bin/nvcc" in why
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    if not os.path.isfile("/usr/local/cuda/bin/nvcc"):
        monkeypatch.setenv("PATH", str(wrapper_dir))
        assert setup.find_cuda_home()[0] == str(home.resolve())


def test_arch_list_below_7_is_refused():
    setup = load_setup()
    setup._check_arch_list("9.0+PTX")
    setup._check_arch_list("8.0;9.0 10.0+PTX")
    with pytest.raises(SystemExit, match="6.1"):
        setup._check_arch_list("6.1;9.0")


def test_build_cuda_switch(monkeypatch):
    setup = load_setup()
    monkeypatch.setenv("FIXNORM_BUILD_CUDA", "0")
    assert setup.want_cuda()[0] is False
    monkeypatch.setenv("FIXNORM_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be 0 or 1"):
        setup.want_cuda()


def cuda_build_expected() -> bool:
    """What setup.py would decide here, for a default build."""
    if os.environ.get("FIXNORM_BUILD_CUDA") == "0" or torch.version.cuda is None:
        return False
    return load_setup().find_cuda_home()[0] is not None


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))
def test_cuda_kernel_compiled_and_registered():
    # CI has a CUDA build of torch and nvcc but no GPU: the kernel must still be
    # compiled, linked and registered, so this fails if the build left it out.
    import fixnorm_ext._C as ext

    if not cuda_build_expected():
        pytest.skip("torch without CUDA, or no CUDA toolkit here: the build leaves the CUDA kernel out")
    assert ext.WITH_CUDA
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fixnorm_ext::fixnorm_step", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fixnorm_ext::fixnorm_step", "CPU")
    reason = available_backends("cuda")["cuda"]
    assert reason is None or reason == "no CUDA device is available" or "runs on CUDA tensors" in reason


def test_cuda_backend_reasons_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert available_backends("cpu")["cuda"] is not None
    reason = available_backends("cuda")["cuda"]
    assert reason is not None
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        from fixnorm_ext import FusedFixNorm
        FusedFixNorm([torch.ones(3, requires_grad=True)], backend="cuda")


# --------------------------------------------------------------------------- the plan

SGD = dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


def layout(seed: int):
    """Random shapes, modes and norm_dims, odd and empty sizes included."""
    rng = random.Random(seed)
    groups = [
        GroupHyper(0.1, 0.9, 0.0, 0.0, True, False, "fixed", None),
        GroupHyper(0.05, 0.0, 0.0, 0.01, False, True, "max", 0),
        GroupHyper(0.2, 0.5, 0.1, 0.0, False, False, None, None),
        GroupHyper(0.1, 0.9, 0.0, 0.0, False, False, "fixed", 0),
    ]
    shapes, group_index = [], []
    for _ in range(rng.randint(5, 25)):
        kind = rng.random()
        if kind < 0.15:
            shape = rng.choice([(0,), (5, 0), (0, 3), ()])
        elif kind < 0.5:
            shape = (rng.randint(1, 70), rng.randint(1, 9), rng.randint(1, 3))
        elif kind < 0.8:
            shape = (rng.randint(1, 4000),)
        else:
            shape = (rng.randint(1, 6), rng.randint(600, 9000))
        shapes.append(shape)
        group_index.append(rng.randrange(len(groups)))
    return shapes, group_index, groups


def make_case(shapes, group_index, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    bufs = [torch.randn(s, generator=gen, dtype=torch.float64) if groups[gi].momentum != 0 and k % 2 else None
            for k, (s, gi) in enumerate(zip(shapes, group_index))]
    targets = []
    for p, gi in zip(params, group_index):
        h = groups[gi]
        if h.norm is None:
            targets.append(None)
        else:
            segs = p.shape[0] if h.norm_dim == 0 and p.dim() > 0 else 1
            targets.append(torch.rand(segs if h.norm_dim == 0 and p.dim() > 0 else (), generator=gen,
                                      dtype=torch.float64) + 0.5)
    return params, grads, bufs, targets


def plan_for(params, bufs, group_index, groups, targets, *, chunk_bytes=256, lag_chunks=3, pack=True):
    meta, flat_targets = build_tables(params, bufs, group_index=group_index, groups=groups, targets=targets)
    plan = build_cuda_plan([tuple(p.shape) for p in params], [p.element_size() for p in params], meta,
                           lag_chunks=lag_chunks, chunk_bytes=chunk_bytes, pack_segments=pack)
    return meta, flat_targets, plan


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("chunk_bytes, pack", [(32, True), (512, True), (4096, True), (512, False)])
def test_plan_invariants(seed, chunk_bytes, pack):
    shapes, group_index, groups = layout(seed)
    params, grads, bufs, targets = make_case(shapes, group_index, groups, seed)
    meta, flat_targets, (tensors, chunks, queue, seg_slots) = plan_for(params, bufs, group_index, groups, targets,
                                                                      chunk_bytes=chunk_bytes, lag_chunks=seed,
                                                                      pack=pack)
    per_chunk = chunk_bytes // 8
    assert tensors.shape == (len(params), 8) and chunks.shape[1] == 6
    assert seg_slots.numel() == flat_targets.numel() + 1 and seg_slots[0] == 0
    covered = [torch.zeros(p.numel(), dtype=torch.int64) for p in params]
    slot_owner = {}
    for c, (t, start, length, seg0, segs, slot0) in enumerate(chunks.tolist()):
        numel, group, mode, seg_len, seg_begin, nsegs, first, end = tensors[t].tolist()
        assert first <= c < end and length > 0 and 0 <= start and start + length <= numel
        assert mode == meta[t, 1]
        covered[t][start:start + length] += 1
        if mode == 0:
            assert (seg0, segs, slot0) == (-1, 0, -1) and length <= per_chunk
            continue
        local = start // seg_len
        assert seg0 == seg_begin + local
        if segs == 1:  # within one segment
            assert (start + length - 1) // seg_len == local and length <= per_chunk
        else:  # whole segments
            assert pack
            assert start % seg_len == 0 and length == segs * seg_len and length <= per_chunk
        for j in range(segs):
            slot = slot0 + j
            assert slot not in slot_owner
            slot_owner[slot] = seg0 + j
    assert all(bool((cov == 1).all()) for cov in covered), "every element in exactly one chunk"
    # Each segment's partials are a range of slots that its own chunks write.
    for s in range(flat_targets.numel()):
        for slot in range(seg_slots[s], seg_slots[s + 1]):
            assert slot_owner[slot] == s
    assert len(slot_owner) == seg_slots[-1]
    assert seg_slots[-1] <= chunks.shape[0] + flat_targets.numel()  # the kernel's partials buffer
    # Queue: every chunk applied once, every controlled chunk normed once, and
    # all of a tensor's norm passes before any of its apply passes.
    items = queue.tolist()
    assert len(items) == len(set(items))
    controlled = [c for c in range(chunks.shape[0]) if chunks[c, 4] > 0]
    assert sorted(items) == sorted([2 * c + 1 for c in range(chunks.shape[0])] + [2 * c for c in controlled])
    position = {item: k for k, item in enumerate(items)}
    for t in range(len(params)):
        first, end = tensors[t, 6].item(), tensors[t, 7].item()
        if tensors[t, 2] != 0 and end > first:
            last_norm = max(position[2 * c] for c in range(first, end))
            first_apply = min(position[2 * c + 1] for c in range(first, end))
            assert first_apply > last_norm
            # The lag is kept, unless the queue ran out of other work first.
            in_final_flush = not any(item % 2 == 0 for item in items[first_apply:])
            assert first_apply - last_norm - 1 >= seed or in_final_flush


def walk_plan(params, grads, bufs, group_index, groups, meta, flat_targets, plan, grad_scale=None):
    """What the kernel passes do, in float64, following the plan: norm passes
    write partials, finalize sums them per segment, apply passes write."""
    tensors, chunks, queue, seg_slots = plan
    partials = torch.full((chunks.shape[0] + flat_targets.numel(),), float("nan"), dtype=torch.float64)
    factors = torch.full((flat_targets.numel(),), float("nan"), dtype=torch.float64)
    new_bufs = [b.clone() if b is not None else (torch.empty_like(p) if groups[gi].momentum else None)
                for p, b, gi in zip(params, bufs, group_index)]
    flat_p = [p.reshape(-1) for p in params]

    def update(t, lo, hi):
        h = groups[group_index[t]]
        p, g = flat_p[t][lo:hi], grads[t].reshape(-1)[lo:hi]
        g = g / grad_scale if grad_scale is not None else g
        g = -g if h.maximize else g
        if h.weight_decay:
            g = g + h.weight_decay * p
        d, b = g, None
        if h.momentum:
            b = g if bufs[t] is None else h.momentum * bufs[t].reshape(-1)[lo:hi] + (1 - h.dampening) * g
            d = g + h.momentum * b if h.nesterov else b
        return p - h.lr * d, b

    def segments(c):
        t, start, length, seg0, segs, slot0 = chunks[c].tolist()
        step = length // segs if segs > 1 else length
        return t, [(start + j * step, start + (j + 1) * step, seg0 + j, slot0 + j) for j in range(max(segs, 1))]

    finalized = set()
    outputs = {}
    for item in queue.tolist():
        c, apply = divmod(item, 2)
        t, pieces = segments(c)
        mode = tensors[t, 2].item()
        if not apply:
            for lo, hi, seg, slot in pieces:
                x, _ = update(t, lo, hi)
                partials[slot] = (x * x).sum()
            continue
        if mode != 0 and t not in finalized:
            for j in range(tensors[t, 5].item()):
                s = tensors[t, 4].item() + j
                n = partials[seg_slots[s]:seg_slots[s + 1]].sum().sqrt()
                f = flat_targets[s] / n
                f = torch.clamp(f, max=1.0) if mode == 2 else f
                factors[s] = 1.0 if n == 0 else f
            finalized.add(t)
        for lo, hi, seg, slot in pieces:
            x, b = update(t, lo, hi)
            outputs[(t, lo)] = (hi, x * (factors[seg] if mode != 0 else 1.0), b)
    out_p = [p.clone() for p in params]
    for (t, lo), (hi, x, b) in outputs.items():
        out_p[t].reshape(-1)[lo:hi] = x
        if b is not None:
            new_bufs[t].reshape(-1)[lo:hi] = b
    return out_p, new_bufs


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("chunk_bytes", [64, 1024])
def test_walking_the_plan_is_the_reference_step(seed, chunk_bytes):
    shapes, group_index, groups = layout(100 + seed)
    params, grads, bufs, targets = make_case(shapes, group_index, groups, seed)
    meta, flat_targets, plan = plan_for(params, bufs, group_index, groups, targets, chunk_bytes=chunk_bytes)
    out_p, out_b = walk_plan(params, grads, bufs, group_index, groups, meta, flat_targets, plan, grad_scale=2.0)
    for k, (p, g, b, gi, t) in enumerate(zip(params, grads, bufs, group_index, targets)):
        h = groups[gi]
        p_ref = p.clone()
        ref_b = reference.fixnorm_step_one(
            p_ref, g, None if b is None else b.clone(), lr=h.lr, momentum=h.momentum,
            dampening=h.dampening, weight_decay=h.weight_decay, nesterov=h.nesterov, maximize=h.maximize,
            norm=h.norm, target=t, norm_dim=h.norm_dim, grad_scale=2.0)
        torch.testing.assert_close(out_p[k], p_ref, rtol=1e-12, atol=1e-12, msg=f"tensor {k} {tuple(p.shape)}")
        if h.momentum:
            torch.testing.assert_close(out_b[k], ref_b, rtol=1e-12, atol=1e-12)


def test_plan_of_a_billion_parameters_is_quick_to_build():
    # The plan is built once per layout from shapes alone; the synthetic
    # benchmark set (about 1e9 float32 parameters) must not take long.
    import time

    shapes = [(4096, 3840)] * 64
    groups = [GroupHyper(0.1, 0.9, 0.0, 0.0, False, False, "fixed", None)]
    meta = torch.tensor([(0, 1, -1, 0, i, i) for i in range(64)], dtype=torch.int64)
    start = time.perf_counter()
    tensors, chunks, queue, seg_slots = build_cuda_plan(shapes, [4] * 64, meta, lag_chunks=264)
    elapsed = time.perf_counter() - start
    assert chunks.shape[0] == 64 * math.ceil(4096 * 3840 / 4096)
    assert queue.numel() == 2 * chunks.shape[0]
    assert elapsed < 20, elapsed
