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

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch has no torch.distributed with the gloo backend", allow_module_level=True)

# A task that has not answered after this long has hung (a collective that
# one rank never joined): the test fails instead of waiting for CI's limit.
TASK_TIMEOUT_S = 90
# gloo's own timeout inside the workers, shorter than the task's, so that a
# rank stuck in a collective raises and its traceback shows where it waited.
COLLECTIVE_TIMEOUT_S = 60
# Once one rank has failed, how long the others get to report theirs.
FAILURE_GRACE_S = 3
START_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = 10


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
        if len(answers) < self.world or not self._healthy():
            self.close()
        report = []
        for r in range(self.world):
            status, payload = answers.get(r, ("no answer", f"nothing within {timeout:.0f} s (stuck in a collective?)"))
            if status != "ok":
                report.append(f"--- rank {r} of {self.world}: {status}\n{payload}")
        pytest.fail(f"task {name!r} failed on {self.world} ranks:\n" + "\n".join(report), pytrace=False)

    def _healthy(self) -> bool:
        """After every rank raised: whether the group can take the next task,
        i.e. a barrier completes and every rank has made as many collectives
        (a rank that raised halfway through a collective the others finished
        would desynchronize them)."""
        for q in self.tasks:
            q.put(("_health_task", {}))
        answers = {}
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while len(answers) < self.world and time.monotonic() < deadline:
            try:
                rank, status, payload = self.results.get(timeout=0.5)
            except queue.Empty:
                continue
            answers[rank] = pickle.loads(payload) if status == "ok" else None
        return len(answers) == self.world and None not in answers.values() and len(set(answers.values())) == 1

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


def _health_task() -> int:
    dist.barrier()
    return dist.group.WORLD._get_sequence_number_for_group()


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

    # Each rank its own initialization: DDP's constructor gives every rank
    # rank 0's weights, and the optimizer built after it records their norms.
    model = _convnet(_rank())
    ddp = DDP(model)
    opt = FusedFixNorm(_convnet_groups(model), lr=LR, momentum=MOMENTUM, nesterov=True)
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
    """Five steps of DDP on two ranks (each initialized with its own seed,
    the optimizer built after DDP): the parameters, momentum buffers and
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


# ------------------------------------------------------------ DTensor parameters
#
# The expected values are the float64 reference stepping full (unsharded)
# copies with the full gradients the sharded run used. The sharded optimizer's
# momentum buffers are expected to be DTensors placed as their parameters
# (what torch.optim.SGD keeps for DTensor parameters).

DTENSOR_STEPS = 4
WORLDS = [2, 3]
_MESH = []


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if not _MESH:
        _MESH.append(init_device_mesh("cpu", (_world(),)))
    return _MESH[0]


def _rows_of_rank(n: int, rank: int, world: int) -> slice:
    """The rows of ``Shard(0)`` on ``rank``: torch.chunk's split, ceil(n/world)
    rows each, the last ranks short or empty (4 rows on 3 ranks: 2, 2, 0)."""
    size = -(-n // world)
    start = min(rank * size, n)
    return slice(start, min(start + size, n))


def _local_piece(full: torch.Tensor, placement) -> torch.Tensor:
    from torch.distributed.tensor import Shard

    if isinstance(placement, Shard):
        index = [slice(None)] * full.dim()
        index[placement.dim] = _rows_of_rank(full.shape[placement.dim], _rank(), _world())
        return full[tuple(index)]
    return full


def _dtensor(full: torch.Tensor, placement, how: str = "from_local"):
    """``full`` as a DTensor on the 1-D mesh: ``distribute_tensor`` (rank 0's
    values, scattered: a collective), or ``DTensor.from_local`` on this
    rank's piece (no communication), contiguous or column-major."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if how == "distribute":
        return distribute_tensor(full, _mesh(), [placement])
    local = _local_piece(full, placement).clone()
    if how == "strided":
        local = local.t().contiguous().t()
        assert local.numel() < 2 or not local.is_contiguous()
    return DTensor.from_local(local, _mesh(), [placement], run_check=False, shape=full.shape, stride=full.stride())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# Hand-made DTensor parameters: name -> (shape, placement, construction, group).
GROUPS = {  # group name -> hyperparameters (lr and momentum are the optimizer's)
    "fixed": dict(norm="fixed", nesterov=True),
    "fixed_rows": dict(norm="fixed", norm_dim=0, dampening=0.1),
    "max": dict(norm="max", target_norm=1.5),
    "max_rows": dict(norm="max", norm_dim=0, target_norm=0.5),
    "plain": dict(weight_decay=0.01),
}


def _hand_made_specs() -> dict:
    from torch.distributed.tensor import Replicate, Shard

    return {
        "A": ((9, 4), Shard(0), "distribute", "fixed"),        # 5+4 rows on 2 ranks, 3+3+3 on 3
        "B": ((5, 3, 2), Shard(0), "distribute", "fixed_rows"),  # uneven: 3+2, 2+2+1
        "C": ((2, 6), Shard(0), "from_local", "max"),          # 1+1, 1+1+0: an empty shard on 3 ranks
        "D": ((1, 5), Shard(0), "from_local", "max_rows"),     # one row: empty shards on every other rank
        "E": ((7,), Shard(0), "from_local", "plain"),
        "F": ((4, 4), Replicate(), "distribute", "fixed"),     # the whole tensor on every rank
        "G": ((6, 2), Shard(0), "strided", "fixed"),           # column-major local shards
        "H": ((0, 3), Shard(0), "from_local", "fixed"),        # empty everywhere
        "I": ((3, 3), Shard(0), "from_local", "max"),          # 2+1 on 2 ranks, 1+1+1 on 3
        "J": ((1, 4), Shard(0), "from_local", "fixed_rows"),   # recorded row targets, no rows on other ranks
    }


def _values(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """The same numbers on every rank."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _build(specs: dict, dtype: torch.dtype, groups: dict = GROUPS):
    """Parameters as DTensors and as full float64 copies (the same values),
    and the group lists of both optimizers."""
    sharded, full = {}, {}
    for k, (name, (shape, placement, how, _)) in enumerate(specs.items()):
        values = _values(shape, 10 + k).to(dtype)
        sharded[name] = nn.Parameter(_dtensor(values, placement, how))
        full[name] = values.double().clone().requires_grad_(True)

    def group_list(params):
        return [{"params": [params[n] for n, spec in specs.items() if spec[3] == g], **hyper}
                for g, hyper in groups.items() if any(spec[3] == g for spec in specs.values())]

    return sharded, full, group_list(sharded), group_list(full)


def _set_grads(specs: dict, sharded: dict, full: dict, step: int, dtype: torch.dtype) -> None:
    for k, (name, (shape, placement, how, _)) in enumerate(specs.items()):
        g = _values(shape, 1000 * step + k, scale=0.5).to(dtype)
        sharded[name].grad = _dtensor(g, placement, "from_local")
        full[name].grad = g.double()


def _compare(specs: dict, opt, sharded: dict, ref, full: dict, dtype, steps: int, what: str) -> None:
    from torch.distributed.tensor import DTensor

    for name in specs:
        p, q = sharded[name], full[name]
        assert isinstance(p, DTensor), f"{what} {name}: the parameter is no longer a DTensor ({type(p).__name__})"
        _assert_close(_full(p.detach()), q.detach(), dtype, steps, f"{what} {name} (rank {_rank()}) param")
        buf = opt.state[p].get("momentum_buffer")
        ref_buf = ref.state[q].get("momentum_buffer")
        assert (buf is None) == (ref_buf is None), f"{what} {name}: momentum buffer {buf is not None}"
        if buf is not None:
            assert isinstance(buf, DTensor) and buf.placements == p.placements, \
                f"{what} {name}: the momentum buffer should be a DTensor placed as its parameter, got {type(buf)}"
            _assert_close(_full(buf), ref_buf, dtype, steps, f"{what} {name} (rank {_rank()}) buffer")


def _hand_made_task(dtypes: list, backend: str = "auto") -> None:
    specs = _hand_made_specs()
    for dtype in dtypes:
        sharded, full, groups, ref_groups = _build(specs, dtype)
        # The layout the specs describe (the from_local pieces are torch.chunk's, as distribute_tensor's).
        for name, (shape, placement, how, _) in specs.items():
            local = sharded[name].to_local()
            assert local.shape == _local_piece(torch.empty(shape), placement).shape, (name, local.shape)
        opt = FusedFixNorm(groups, lr=LR, momentum=MOMENTUM, backend=backend)
        ref = FusedFixNorm(ref_groups, lr=LR, momentum=MOMENTUM, backend="reference")
        for step in range(DTENSOR_STEPS):
            _set_grads(specs, sharded, full, step, dtype)
            opt.step()
            ref.step()
            _compare(specs, opt, sharded, ref, full, dtype, step + 1, f"{dtype} step {step}")


def _tracked_task(backend: str) -> list:
    """The hand-made parameters in float32 with ``track_stats`` on: steps
    equal to the reference's, angles equal to the angle between the full
    tensors before and after each step, and still one all-reduce a step."""
    from torch.distributed.tensor import DTensor

    specs = _hand_made_specs()
    sharded, full, groups, ref_groups = _build(specs, torch.float32)
    opt = FusedFixNorm(groups, lr=LR, momentum=MOMENTUM, backend=backend, track_stats=True)
    ref = FusedFixNorm(ref_groups, lr=LR, momentum=MOMENTUM, backend="reference")
    counts = []
    for step in range(3):
        _set_grads(specs, sharded, full, step, torch.float32)
        before = {n: p.detach().full_tensor().double() for n, p in sharded.items()}
        with _counting_collectives() as record:
            opt.step()
        counts.append(len(record["all_reduce"]))
        ref.step()
        _compare(specs, opt, sharded, ref, full, torch.float32, step + 1, f"{backend} tracked step {step}")
        turned = opt.last_angles
        for name, p in sharded.items():
            after = p.detach().full_tensor().double()
            a, b = before[name].reshape(-1), after.reshape(-1)
            if a.norm() == 0 or b.norm() == 0:
                expected = 0.0
            else:
                expected = 2 * math.asin(min(((b / b.norm() - a / a.norm()).norm() / 2).item(), 1.0))
            got = turned[p]
            assert not isinstance(got, DTensor) and got.dtype == torch.float64, (name, type(got), got.dtype)
            # The angle of the stored float32 weights: the rounding after the
            # rescale turns them by a few eps32 more.
            assert math.isclose(got.item(), expected, rel_tol=1e-5, abs_tol=3e-7), \
                (backend, name, step, got.item(), expected)
    return counts


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", ["cpu", "foreach"])
def test_dtensor_track_stats_and_backends(pools, world, backend):
    """track_stats on DTensor parameters, with the cpu kernel's sums and with
    the foreach backend (whose sums Python takes from copies): the same steps
    as the reference, each tensor's angle that of its full tensor, and the
    angle's sums in the step's one all-reduce."""
    for rank, counts in enumerate(pools(world).run("_tracked_task", backend=backend)):
        assert counts == [1, 1, 1], f"rank {rank}: all-reduces per step {counts}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", ["auto", "foreach"])
def test_dtensor_parameters_match_unsharded_reference(pools, world, backend):
    """Hand-made DTensors (distribute_tensor and DTensor.from_local; Shard(0)
    with even, uneven, empty and column-major shards, and Replicate) in
    fixed / max / plain groups with whole-tensor and per-row norms, momentum,
    Nesterov, dampening and weight decay: four steps equal to the float64
    reference on the full tensors, float64 and float32 parameters; with the
    cpu kernel (auto) and with foreach, whose squares Python measures."""
    pools(world).run("_hand_made_task", dtypes=[torch.float64, torch.float32], backend=backend)


def _fsdp_model() -> nn.Module:
    """Dim-0 sizes 5, 7 and 1: uneven on 2 and 3 ranks, and the head's weight
    and bias have one row, so every rank but the first holds an empty shard."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.LayerNorm(5), nn.ReLU(),
                         nn.Linear(5, 7, bias=False), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 1))


FSDP_GROUPS = {  # parameter name -> group of GROUPS
    "0.weight": "fixed", "3.weight": "fixed_rows", "6.weight": "max", "6.bias": "plain",
    "1.weight": "plain", "1.bias": "plain", "4.weight": "plain", "4.bias": "plain",
}


def _fsdp_task(steps: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    model = _fsdp_model()
    full = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    fully_shard(model[3], mesh=_mesh())
    fully_shard(model, mesh=_mesh())
    sharded = dict(model.named_parameters())
    assert sorted(sharded) == sorted(FSDP_GROUPS)
    layout = {n: (type(p).__name__, str(p.placements) if isinstance(p, DTensor) else None, tuple(p.to_local().shape))
              for n, p in sharded.items()}
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in sharded.values()), layout
    specs = {n: (tuple(p.shape), Shard(0), "fully_shard", FSDP_GROUPS[n]) for n, p in sharded.items()}
    groups = {"fixed": dict(norm="fixed", nesterov=True), "fixed_rows": GROUPS["fixed_rows"],
              "max": dict(norm="max", target_norm=0.3), "plain": GROUPS["plain"]}

    def group_list(params):
        return [{"params": [params[n] for n, g in FSDP_GROUPS.items() if g == name], **hyper}
                for name, hyper in groups.items()]

    opt = FusedFixNorm(group_list(sharded), lr=LR, momentum=MOMENTUM)
    ref = FusedFixNorm(group_list(full), lr=LR, momentum=MOMENTUM, backend="reference")
    gen = torch.Generator().manual_seed(50 + _rank())  # each rank its own data
    for step in range(steps):
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 1, generator=gen)
        F.mse_loss(model(x), y).backward()
        for n, p in sharded.items():
            assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, (n, type(p.grad))
            full[n].grad = p.grad.full_tensor().double()
        opt.step()
        ref.step()
        opt.zero_grad()
        _compare(specs, opt, sharded, ref, full, torch.float32, step + 1, f"fully_shard step {step}")
    return layout


@pytest.mark.parametrize("world", WORLDS)
def test_fully_shard_matches_unsharded_reference(pools, world):
    """A model under fully_shard (two FSDP groups, dim-0 sizes 5, 7 and 1):
    four training steps of FusedFixNorm on its DTensor parameters equal to the
    float64 reference stepping the full tensors with the full gradients."""
    layouts = pools(world).run("_fsdp_task", steps=DTENSOR_STEPS)
    # The layout the test means: the one-row head is empty on every rank but the first.
    assert [layout["6.weight"][2] for layout in layouts] == [(1, 7)] + [(0, 7)] * (world - 1)
    assert [layout["0.weight"][2][0] for layout in layouts] == ([3, 2] if world == 2 else [2, 2, 1])


def _groups_on_fully_shard_task() -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _convnet(0)
    before = fixnorm_param_groups(model, fc_norm=FC_NORM)
    fully_shard(model, mesh=_mesh())
    after = fixnorm_param_groups(model, fc_norm=FC_NORM)
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for g in after for p in g["params"]), "groups hold parameters the model no longer has"
    return {"before": dict(before.roles), "after": dict(after.roles), "method": after.method}


class _Blocks(nn.Module):
    """Blocks sharded one by one, then the root, as the README shows."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8, bias=False), nn.LayerNorm(8), nn.ReLU())
                                      for _ in range(2)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.blocks(x))


def _groups_on_nested_fully_shard_task() -> str:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Blocks()
    for block in model.blocks:
        fully_shard(block, mesh=_mesh())
    fully_shard(model, mesh=_mesh())
    groups = fixnorm_param_groups(model, fc_norm=FC_NORM)
    opt = FusedFixNorm(groups, lr=LR, momentum=MOMENTUM)
    # Tracing must leave fully_shard's hooks alone: the first real forward
    # used to fail ("FSDP state has already been lazily initialized").
    F.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    # The classifier's norm is the whole weight's on every rank, not this shard's.
    whole = model.fc.weight.detach().full_tensor().double().norm().item()
    assert math.isclose(fixnorm_ext.diagnostics.classifier_norm(opt), whole, rel_tol=1e-12), whole
    return groups.method


def test_param_groups_on_nested_fully_shard_model(pools):
    assert pools(2).run("_groups_on_nested_fully_shard_task") == ["fx", "fx"]


def test_param_groups_on_fully_shard_model(pools):
    """fixnorm_param_groups on a model already under fully_shard (whose
    parameters are the DTensors the optimizer must get) finds the roles it
    finds on the plain model."""
    out = pools(2).run("_groups_on_fully_shard_task")
    assert out[0]["after"] == out[0]["before"]
    assert out[0]["method"] == "fx"


# --- collectives per step

@contextmanager
def _counting_collectives():
    """Count the collectives on the default group while the block runs (its
    sequence number: every collective, whatever API issued it) and record
    each ``torch.distributed.all_reduce`` call's tensor (patched in
    ``torch.distributed`` and ``torch.distributed.distributed_c10d``; code that
    calls ``torch.distributed.all_reduce`` at call time goes through it)."""
    import torch.distributed.distributed_c10d as c10d

    group = dist.group.WORLD
    original = c10d.all_reduce
    record = {"all_reduce": []}

    def counting_all_reduce(tensor, *args, **kwargs):
        record["all_reduce"].append((tuple(tensor.shape), str(tensor.dtype)))
        return original(tensor, *args, **kwargs)

    before = group._get_sequence_number_for_group()
    dist.all_reduce = c10d.all_reduce = counting_all_reduce
    try:
        yield record
    finally:
        dist.all_reduce = c10d.all_reduce = original
        record["collectives"] = group._get_sequence_number_for_group() - before


def _count_specs(case: str) -> tuple[dict, int]:
    """Parameters of one case, and how many norm segments span ranks."""
    from torch.distributed.tensor import Replicate, Shard

    rows = {"R1": ((7, 4), Shard(0), "from_local", "fixed_rows"),
            "R2": ((5, 3, 2), Shard(0), "from_local", "max_rows"),
            "P": ((7,), Shard(0), "from_local", "plain")}
    if case == "whole_norms":  # dim 0 >= 3: every one spans the ranks, on 2 and on 3
        return {"A": ((9, 4), Shard(0), "from_local", "fixed"), "B": ((5, 3), Shard(0), "from_local", "fixed"),
                "C": ((6, 2), Shard(0), "from_local", "max"), **rows}, 3
    if case == "rows_only":
        return rows, 0
    if case == "no_norm":
        return {"P": rows["P"], "Q": ((4, 3), Shard(0), "from_local", "plain")}, 0
    if case == "replicated":
        return {"F": ((4, 4), Replicate(), "from_local", "fixed"), "G": ((3,), Replicate(), "from_local", "max"),
                **rows}, 0
    raise ValueError(case)


def _count_task(case: str) -> list:
    specs, spanning = _count_specs(case)
    sharded, full, groups, ref_groups = _build(specs, torch.float32)
    opt = FusedFixNorm(groups, lr=LR, momentum=MOMENTUM)
    ref = FusedFixNorm(ref_groups, lr=LR, momentum=MOMENTUM, backend="reference")
    counts = []
    for step in range(3):
        _set_grads(specs, sharded, full, step, torch.float32)
        with _counting_collectives() as record:
            opt.step()
        counts.append(record)
        ref.step()
    _compare(specs, opt, sharded, ref, full, torch.float32, 3, case)
    return counts


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["whole_norms", "rows_only", "no_norm", "replicated"])
def test_collectives_per_step(pools, world, case):
    """One collective per step, an all-reduce of one float64 vector with one
    partial sum of squares per norm segment that spans ranks (whole-tensor
    norms of Shard(0) tensors, from every group together), when there are any;
    none when every norm is per row with whole rows on each rank, without norm
    control, or when the tensors are replicated. Three steps each, and the
    result equal to the reference's (so no norm was left out)."""
    _, spanning = _count_specs(case)
    for rank, counts in enumerate(pools(world).run("_count_task", case=case)):
        for step, record in enumerate(counts):
            where = f"rank {rank} step {step}"
            if spanning:
                assert record["collectives"] == 1, f"{where}: {record}"
                assert record["all_reduce"] == [((spanning,), "torch.float64")], f"{where}: {record}"
            else:
                assert record["collectives"] == 0, f"{where}: {record}"
                assert record["all_reduce"] == [], f"{where}: {record}"


def _checkpoint_task() -> bool:
    """A sharded optimizer's state_dict, through torch.save / torch.load on
    each rank, into a new optimizer over the same DTensors' copies: the next
    steps equal the uninterrupted run's, targets and buffers included."""
    import io

    specs = _hand_made_specs()
    sharded, full, groups, _ = _build(specs, torch.float32)
    twin, _, twin_groups, _ = _build(specs, torch.float32)
    opt = FusedFixNorm(groups, lr=LR, momentum=MOMENTUM)
    for step in range(2):
        _set_grads(specs, sharded, full, step, torch.float32)
        opt.step()
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    blob.seek(0)
    with torch.no_grad():
        for name in specs:
            twin[name].to_local().copy_(sharded[name].to_local())
    resumed = FusedFixNorm(twin_groups, lr=LR, momentum=MOMENTUM)
    resumed.load_state_dict(torch.load(blob, weights_only=False))
    for step in range(2, 4):
        _set_grads(specs, sharded, full, step, torch.float32)
        for name in specs:
            twin[name].grad = sharded[name].grad
        opt.step()
        resumed.step()
    return all(torch.equal(sharded[n].to_local(), twin[n].to_local()) for n in specs)


def test_sharded_checkpoint_resumes_bitwise(pools):
    assert pools(2).run("_checkpoint_task") == [True, True]


def _shard0():
    from torch.distributed.tensor import Shard
    return Shard(0)


def _missing_grads_task() -> list:
    """Ranks that lack some gradients, or all of them, still take their part
    in the step's all-reduce (no hang), and a tensor no rank has a gradient
    for is left exactly as it was."""
    specs = {"A": ((9, 4), _shard0(), "from_local", "fixed"), "B": ((5, 3), _shard0(), "from_local", "max"),
             "C": ((6, 2), _shard0(), "from_local", "fixed")}
    sharded, full, groups, _ = _build(specs, torch.float32)
    opt = FusedFixNorm(groups, lr=LR, momentum=MOMENTUM, track_stats=True)
    seen = []
    for step in range(3):
        _set_grads(specs, sharded, full, step, torch.float32)
        sharded["C"].grad = None  # on every rank
        if step == 1 and _rank() == 1:
            for p in sharded.values():
                p.grad = None  # this rank has nothing to step
        start = sharded["C"].detach().to_local().clone()
        with _counting_collectives() as record:
            opt.step()
        assert torch.equal(sharded["C"].detach().to_local(), start)
        seen.append(len(record["all_reduce"]))
    return seen


def test_missing_gradients_do_not_hang_the_step(pools):
    assert pools(2).run("_missing_grads_task") == [[1, 1, 1], [1, 1, 1]]


def _other_placement_task() -> list:
    from torch.distributed.tensor import DTensor, Partial, Shard

    # A whole-tensor norm does not care which dim a shard cuts: Shard(1) steps
    # like Shard(0), and equals the reference.
    specs = {"whole": ((5, 4), Shard(1), "from_local", "fixed"), "plain": ((3, 6), Shard(1), "from_local", "plain")}
    sharded, full, groups, ref_groups = _build(specs, torch.float64)
    opt = FusedFixNorm(groups, lr=LR, momentum=MOMENTUM)
    ref = FusedFixNorm(ref_groups, lr=LR, momentum=MOMENTUM, backend="reference")
    for step in range(2):
        _set_grads(specs, sharded, full, step, torch.float64)
        opt.step()
        ref.step()
    _compare(specs, opt, sharded, ref, full, torch.float64, 2, "Shard(1)")
    errors = []
    # Per-row norms whose rows a Shard(1) cuts, and a Partial parameter, are
    # refused when the optimizer is built (or the group added).
    rows = nn.Parameter(DTensor.from_local(torch.randn(4, 3, dtype=torch.float64), _mesh(), [Shard(1)],
                                           run_check=False, shape=(4, 3 * dist.get_world_size()),
                                           stride=(3 * dist.get_world_size(), 1)))
    partial = nn.Parameter(DTensor.from_local(torch.randn(4, dtype=torch.float64), _mesh(), [Partial()],
                                              run_check=False))
    for params, group in (([rows], dict(norm="fixed", norm_dim=0)), ([partial], dict(norm="fixed"))):
        try:
            FusedFixNorm([{"params": params, **group}], lr=LR)
        except ValueError as exc:
            errors.append(str(exc))
    # Without norm control a Partial parameter is refused by the step, before any write.
    opt = FusedFixNorm([partial], lr=LR)
    partial.grad = DTensor.from_local(torch.ones(4, dtype=torch.float64), _mesh(), [Partial()], run_check=False)
    start = partial.detach().to_local().clone()
    try:
        opt.step()
    except ValueError as exc:
        errors.append(str(exc))
    assert torch.equal(partial.detach().to_local(), start)
    return errors


def test_other_placements_step_or_are_refused(pools):
    """Shard(1) with whole-tensor norms steps as the reference does; per-row
    norms cut by Shard(1), and Partial parameters, are refused with an error
    that names the placement, and a refused step writes nothing."""
    for errors in pools(2).run("_other_placement_task"):
        assert len(errors) == 3, errors
        assert "sharded on dim 1, which cuts its rows" in errors[0], errors[0]
        assert all("Partial" in e for e in errors[1:]), errors



# ------------------------------------------------------------ bench/distributed.py

def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "distributed.py"
    spec = importlib.util.spec_from_file_location("bench_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_counts_the_segments_that_span_ranks():
    """The benchmark's rows are torch.chunk's (Shard(0)'s) and its all-reduce
    has one element per whole-tensor norm whose rows lie on two ranks or more."""
    bench_distributed = _bench_module()
    for n in range(9):
        for world in (2, 3, 4):
            sizes = [len(range(n)[bench_distributed.rows_of_rank(n, r, world)]) for r in range(world)]
            chunks = [c.shape[0] for c in torch.empty(n).chunk(world)] if n else []
            assert sizes == chunks + [0] * (world - len(chunks)), (n, world, sizes)
    shapes = [(8, 3), (1, 5), (4,), (0, 2), (6, 2), (3, 3), (5,)]
    groups = [{"params": [0, 1, 2, 3], "norm": "fixed", "norm_dim": None},
              {"params": [4], "norm": "fixed", "norm_dim": 0},
              {"params": [5], "norm": "max", "norm_dim": None},
              {"params": [6], "norm": None, "norm_dim": None}]
    # (8, 3), (4,) and (3, 3): the one-row and the empty tensor live on one
    # rank, the per-row and the plain tensor need no norm across ranks.
    assert bench_distributed.spanning_segments(shapes, groups, 2) == 3
    assert bench_distributed.spanning_segments(shapes, groups, 3) == 3
