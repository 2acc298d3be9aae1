"""FusedFixNorm under torch.distributed, on the CPU with gloo (issue 8).

The tests run in worker processes: one pool of N gloo ranks per world size,
spawned once for this file (``WorkerPool``) and given one task per test. A
task is a function of this module that every rank runs; what it returns
comes back pickled by value, an exception comes back as its traceback. A rank
that raises, dies or does not answer within ``TASK_TIMEOUT_S`` fails the test
with every rank's traceback, and the pool is replaced for the next test (the
other ranks may be stuck in a collective the failed one never joined).

* DDP: two ranks, each half of the global batch, against one process that
  forwards the same two halves (BatchNorm's batch statistics are per rank
  under DDP, and SyncBatchNorm refuses CPU tensors, so the two halves are the
  global batch as DDP defines it) and averages their losses.
* ZeroRedundancyOptimizer with ``optimizer_class=FusedFixNorm``: the same
  run, and a checkpoint consolidated on rank 0 that a fresh ZeRO loads.
* DTensor parameters (``fully_shard``; ``distribute_tensor`` and
  ``DTensor.from_local`` with ``Shard(0)`` and ``Replicate``) against the
  float64 reference stepping the full tensors with the same full gradients,
  and the number of collectives a step makes.
"""
from __future__ import annotations

import datetime
import math
import os
import pickle
import queue
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fixnorm_ext
from fixnorm_ext import FusedFixNorm, fixnorm_param_groups
from test_backends import TOLERANCE

# A task that has not answered after this long has hung (a collective that
# one rank never joined): the test fails instead of waiting for CI's limit.
TASK_TIMEOUT_S = 90
# gloo's own timeout inside the workers, shorter than the task's, so that a
# rank stuck in a collective raises and its traceback shows where it waited.
COLLECTIVE_TIMEOUT_S = 60
# Once one rank has failed, how long the others get to report theirs.
FAILURE_GRACE_S = 3
START_TIMEOUT_S = 120


# ------------------------------------------------------------ worker pool

def _worker_main(rank: int, world: int, port: int, tasks, results) -> None:
    """One rank: join the gloo group through the parent's store, then run
    tasks until told to stop (``None``)."""
    try:
        torch.set_num_threads(1)  # N ranks share the machine's cores
        store = dist.TCPStore("127.0.0.1", port, is_master=False,
                              timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        results.put((rank, "ready", fixnorm_ext.__file__))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        name, kwargs = task
        try:
            results.put((rank, "ok", pickle.dumps(globals()[name](**kwargs))))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """``world`` spawned processes in one gloo process group, kept between
    tests. The rendezvous store is served by this (the pytest) process on a
    port the OS picks, so no port is guessed."""

    def __init__(self, world: int):
        self.world = world
        self.broken = False
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=_worker_main, args=(r, world, self.store.port, q, self.results),
                                  daemon=True, name=f"fixnorm-rank{r}")
                      for r, q in enumerate(self.tasks)]
        for p in self.procs:
            p.start()
        self.imported = self._collect("start", START_TIMEOUT_S, decode=False)

    def run(self, name: str, timeout: float = TASK_TIMEOUT_S, **kwargs) -> list:
        """Run task ``name(**kwargs)`` on every rank; its return values by rank."""
        for q in self.tasks:
            q.put((name, kwargs))
        return self._collect(name, timeout)

    def _collect(self, name: str, timeout: float, decode: bool = True) -> list:
        answers: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + timeout
        failed_at = None
        while len(answers) < self.world:
            now = time.monotonic()
            if failed_at is not None and now > failed_at + FAILURE_GRACE_S:
                break
            if now > deadline:
                break
            try:
                rank, status, payload = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in answers]
                for r in dead:
                    answers[r] = ("error", f"the process died (exit code {self.procs[r].exitcode})")
                if dead and failed_at is None:
                    failed_at = time.monotonic()
                continue
            answers[rank] = (status, payload)
            if status == "error" and failed_at is None:
                failed_at = time.monotonic()
        if len(answers) == self.world and all(s != "error" for s, _ in answers.values()):
            return [pickle.loads(answers[r][1]) if decode else answers[r][1] for r in range(self.world)]
        self.close()
        report = []
        for r in range(self.world):
            status, payload = answers.get(r, ("no answer", f"nothing within {timeout:.0f} s (stuck in a collective?)"))
            if status != "ok":
                report.append(f"--- rank {r} of {self.world}: {status}\n{payload}")
        pytest.fail(f"task {name!r} failed on {self.world} ranks:\n" + "\n".join(report), pytrace=False)

    def close(self) -> None:
        """Stop the workers: politely when idle, by force when broken."""
        if self.broken:
            return
        self.broken = True
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@pytest.fixture(scope="module")
def pools():
    """``pools(world)``: the module's pool of ``world`` ranks, started on
    first use and started again after a failure broke it."""
    live: dict[int, WorkerPool] = {}

    def get(world: int) -> WorkerPool:
        if world not in live or live[world].broken:
            live[world] = WorkerPool(world)
        return live[world]

    yield get
    for pool in live.values():
        pool.close()


def test_workers_import_this_checkout(pools):
    # cwd is first on sys.path: the ranks must step the package under test,
    # not an installed copy.
    assert pools(2).imported == [fixnorm_ext.__file__] * 2


# ------------------------------------------------------------ shared helpers

def _rank() -> int:
    return dist.get_rank()


def _world() -> int:
    return dist.get_world_size()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, steps: int, what: str) -> None:
    """``out`` within ``steps`` free-running steps of ``ref`` (float64): the
    one-step tolerance of tests/test_backends.py's table, times ``steps + 1``
    (test_backends allows 5x for its 5 free-running steps)."""
    rtol, atol = TOLERANCE[dtype]
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().item()
    err = (out - ref).abs()
    bound = (steps + 1) * (rtol * ref.abs() + atol * scale)
    assert bool((err <= bound).all()), (f"{what}: max error {err.max().item():.3e}, tolerance at most "
                                        f"{bound.max().item():.3e} ({dtype}, {steps} steps)")


def _convnet(seed: int) -> nn.Module:
    """Two bias-free convs into BatchNorm ("fixed"), a classifier ("max") and
    BatchNorm affine parameters and the classifier bias (no norm control)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


# The classifier starts at norm 1.31 (seed 0): a bound of 1.0 clamps it.
FC_NORM = 1.0
GLOBAL_BATCH = 8
LR = 0.1
MOMENTUM = 0.9


def _batch(step: int, world: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of ``step`` cut in ``world`` equal parts, the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)
    return list(zip(x.chunk(world), y.chunk(world)))


def _convnet_groups(model: nn.Module, norm_dim=None):
    groups = fixnorm_param_groups(model, fc_norm=FC_NORM, norm_dim=norm_dim)
    assert {g["norm"] for g in groups} == {"fixed", "max", None}, groups
    return groups


def _snapshot(model: nn.Module, opt) -> dict:
    """Parameters, momentum buffers and recorded targets, in parameter order."""
    state = opt.state
    params = list(model.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "buffers": [state[p]["momentum_buffer"].clone() for p in params],
        "targets": [state[p]["target_norm"].clone() if "target_norm" in state[p] else None for p in params],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _single_process_run(steps: int, norm_dim=None) -> dict:
    """The reference for DDP: one process, the same initialization, the
    global batch forwarded as the ranks' parts and their losses averaged
    (what DDP's averaged gradient is the gradient of)."""
    model = _convnet(0)
    opt = FusedFixNorm(_convnet_groups(model, norm_dim), lr=LR, momentum=MOMENTUM, nesterov=True)
    for step in range(steps):
        parts = _batch(step)
        loss = sum(F.cross_entropy(model(x), y) for x, y in parts) / len(parts)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return _snapshot(model, opt)


def _assert_bitwise(a: list, b: list, what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"{what} {i}: {x} vs {y}"
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what} {i}: {x.dtype} {x.shape} vs {y.dtype} {y.shape}"
        assert torch.equal(x, y), f"{what} {i}: max difference {(x.double() - y.double()).abs().max().item():.3e}"


# ------------------------------------------------------------ DDP

DDP_STEPS = 5


def _ddp_task(steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _convnet(0)
    opt = FusedFixNorm(_convnet_groups(model), lr=LR, momentum=MOMENTUM, nesterov=True)
    ddp = DDP(model)
    classifier = model[-1].weight
    norms = [classifier.detach().double().norm().item()]
    for step in range(steps):
        x, y = _batch(step, _world())[_rank()]
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        norms.append(classifier.detach().double().norm().item())
    # Each rank also runs the single-process reference with the same thread
    # count as its DDP run, so that both use the same kernels.
    return {"ddp": _snapshot(model, opt), "single": _single_process_run(steps), "backend": opt.backend,
            "classifier_norms": norms}


def test_ddp_matches_single_process(pools):
    """Five steps of DDP on two ranks: the parameters, momentum buffers and
    recorded targets are bitwise the same on both ranks and bitwise those of
    one process on the two halves of the global batch.

    Bitwise, not within a tolerance: with two ranks the gradient all-reduce
    adds two float32 numbers per element (g0/2 + g1/2), which is the one
    rounding autograd makes when it adds the two halves' gradients in the
    single process (each scaled by the exact 1/2 of the loss average, and
    scaling by a power of two changes no rounding). Everything else is the
    same float32 arithmetic on the same numbers."""
    out = pools(2).run("_ddp_task", steps=DDP_STEPS)
    assert out[0]["backend"] == "cpu"
    for key in ("params", "buffers", "targets"):
        _assert_bitwise(out[0]["ddp"][key], out[1]["ddp"][key], f"rank 0 vs rank 1 {key}")
        _assert_bitwise(out[0]["ddp"][key], out[0]["single"][key], f"DDP vs single process {key}")
    # The "max" group acted: the classifier started above its bound and was
    # clamped onto it by the first step, and stays within it.
    first, *after = out[0]["classifier_norms"]
    eps = torch.finfo(torch.float32).eps
    assert first > 1.2 * FC_NORM
    assert abs(after[0] - FC_NORM) <= 4 * eps
    assert max(after) <= FC_NORM * (1 + 4 * eps)


# ------------------------------------------------------------ ZeroRedundancyOptimizer

ZERO_STEPS = 6
ZERO_CHECKPOINT_AT = 3


def _zero(model: nn.Module):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(_convnet_groups(model, norm_dim=0), optimizer_class=FusedFixNorm,
                                   lr=LR, momentum=MOMENTUM, nesterov=True)


def _zero_train(ddp, zero, steps: range) -> None:
    for step in steps:
        x, y = _batch(step, _world())[_rank()]
        F.cross_entropy(ddp(x), y).backward()
        zero.step()
        zero.zero_grad()


def _local_snapshot(model: nn.Module, zero) -> dict:
    """The parameters (every rank holds all of them after a ZeRO step) and
    the local optimizer's state of the parameters this rank steps."""
    local = zero.optim.state
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "local": {i: {k: v.clone() for k, v in local[p].items()}
                  for i, p in enumerate(model.parameters()) if p in local},
    }


def _zero_task(checkpoint: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _convnet(0)
    zero = _zero(model)
    ddp = DDP(model)
    _zero_train(ddp, zero, range(ZERO_CHECKPOINT_AT))
    zero.consolidate_state_dict(to=0)
    if _rank() == 0:
        saved = zero.state_dict()
        torch.save({"model": model.state_dict(), "optim": saved}, checkpoint)
        # A state dict numbers the parameters in group order: back to model order.
        position = {id(p): i for i, p in enumerate(model.parameters())}
        in_groups = [position[id(p)] for g in zero.param_groups for p in g["params"]]
        kept = {"keys": {in_groups[k]: sorted(s) for k, s in saved["state"].items()},
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]}
    else:
        kept = None
    dist.barrier()
    _zero_train(ddp, zero, range(ZERO_CHECKPOINT_AT, ZERO_STEPS))
    uninterrupted = _local_snapshot(model, zero)

    # Resume as a new job would: a model and optimizer built from another
    # initialization (so the norms a fresh optimizer records are not the
    # checkpoint's), then both loaded from the checkpoint.
    resumed_model = _convnet(1)
    resumed = _zero(resumed_model)
    blob = torch.load(checkpoint, weights_only=True)
    resumed_model.load_state_dict(blob["model"])
    resumed.load_state_dict(blob["optim"])
    after_load = _local_snapshot(resumed_model, resumed)
    _zero_train(DDP(resumed_model), resumed, range(ZERO_CHECKPOINT_AT, ZERO_STEPS))
    # The single-process runs, here for the same kernels as the ranks (see _ddp_task).
    return {"uninterrupted": uninterrupted, "resumed": _local_snapshot(resumed_model, resumed),
            "after_load": after_load, "saved": kept, "partition": sorted(uninterrupted["local"]),
            "single": _single_process_run(ZERO_STEPS, norm_dim=0),
            "single_at_checkpoint": _single_process_run(ZERO_CHECKPOINT_AT, norm_dim=0)}


def test_zero_redundancy_optimizer_matches_and_resumes(pools, tmp_path):
    """ZeroRedundancyOptimizer(optimizer_class=FusedFixNorm) on two ranks
    (fixed weights with per-row norms, the classifier clamped, the rest
    plain): six steps bitwise equal to one FusedFixNorm (each parameter is
    stepped by exactly one rank, with the same numbers as in one process);
    a checkpoint after three steps, consolidated on rank 0 and loaded by a
    fresh ZeRO, continues bitwise as the uninterrupted run, recorded target
    norms included."""
    out = pools(2).run("_zero_task", checkpoint=str(tmp_path / "zero.pt"))
    single, at_checkpoint = out[0]["single"], out[0]["single_at_checkpoint"]
    n = len(single["params"])
    # ZeRO splits the parameters between the ranks: each is stepped by one.
    assert sorted(out[0]["partition"] + out[1]["partition"]) == list(range(n))
    assert out[0]["partition"] and out[1]["partition"]
    for r in range(2):
        _assert_bitwise(out[r]["uninterrupted"]["params"], single["params"], f"rank {r} ZeRO vs single process")
        _assert_bitwise(out[r]["resumed"]["params"], out[r]["uninterrupted"]["params"],
                        f"rank {r} resumed vs uninterrupted")
        for i, state in out[r]["uninterrupted"]["local"].items():
            resumed = out[r]["resumed"]["local"][i]
            assert sorted(state) == sorted(resumed), f"rank {r} param {i}: state keys"
            _assert_bitwise([state[k] for k in sorted(state)], [resumed[k] for k in sorted(resumed)],
                            f"rank {r} param {i} state {sorted(state)}")
            _assert_bitwise([state["momentum_buffer"]], [single["buffers"][i]], f"rank {r} param {i} buffer")
            _assert_bitwise([state.get("target_norm")], [single["targets"][i]], f"rank {r} param {i} target")
            # Right after loading, the state is the checkpoint's (targets in
            # float64, not measured again on the other initialization).
            loaded = out[r]["after_load"]["local"][i]
            _assert_bitwise([loaded["momentum_buffer"]], [at_checkpoint["buffers"][i]],
                            f"rank {r} param {i} loaded buffer")
            _assert_bitwise([loaded.get("target_norm")], [at_checkpoint["targets"][i]],
                            f"rank {r} param {i} loaded target")
    saved = out[0]["saved"]
    assert sorted(saved["keys"]) == list(range(n))
    for i, keys in saved["keys"].items():
        expected = ["momentum_buffer"] + (["target_norm"] if single["targets"][i] is not None else [])
        assert keys == sorted(expected), f"consolidated state of param {i}: {keys}"
    keys = ("norm", "target_norm", "norm_dim", "lr", "momentum", "nesterov")
    assert [{k: g[k] for k in keys} for g in saved["groups"]] == [{k: g[k] for k in keys} for g in single["groups"]]
