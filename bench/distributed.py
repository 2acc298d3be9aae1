"""What FixNorm's norm all-reduce costs when the parameters are sharded (issue 8).

    python bench/distributed.py                                 # 2 gloo ranks on the CPU, resnet50
    python bench/distributed.py --model resnet18 --reps 60
    python bench/distributed.py --device cuda --world 4         # NCCL, one GPU per rank

Every rank builds the same parameter set (``fixnorm_ext.bench``: a torchvision
model's parameters with one real gradient, in ``fixnorm_param_groups``'s
groups) and times, round robin and after a barrier each time, four ways of
taking one step (momentum 0.9, float32):

* ``full``: ``FusedFixNorm`` on the whole set, what every rank steps under DDP;
* ``local``: ``FusedFixNorm`` on this rank's ``Shard(0)`` rows as plain
  tensors: the sharded step's memory traffic without any communication (its
  whole-tensor norms are the wrong, local ones);
* ``sharded``: ``FusedFixNorm`` on the same rows as ``DTensor`` parameters,
  as ``fully_shard`` makes them: the local step plus the all-reduce of the
  partial sums of squares;
* ``allreduce``: that all-reduce alone, ``dist.all_reduce`` of one float64
  vector with one element per norm segment that spans ranks (the
  whole-tensor norms; per-row norms have their rows on one rank).

A step takes as long as its slowest rank, so each repetition counts the
largest time over the ranks; the table gives the median and p20/p80 of those.
Rows (one per contestant, with hardware, versions and commit) are appended to
``bench/results/distributed.jsonl`` unless ``--no-save``. A FusedFixNorm that
does not take DTensor parameters leaves ``sharded`` out with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Run as a script (``python bench/distributed.py``, also in a checkout built
# in place without an install): the package is the one next to this folder.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixnorm_ext import bench  # noqa: E402

LR = bench.LR
MOMENTUM = bench.MOMENTUM
DEFAULT_MODEL = "resnet50"
DEFAULT_REPS = 40
DEFAULT_WARMUP = 5
DEFAULT_OUT = REPO / "bench" / "results" / "distributed.jsonl"
CONTESTANTS = ("full", "local", "sharded", "allreduce")
SEGMENT_BYTES = 8  # one float64 partial sum of squares per spanning segment
TIMEOUT_S = 300


def rows_of_rank(n: int, rank: int, world: int) -> slice:
    """The rows ``Shard(0)`` gives ``rank``: torch.chunk's split (ceil(n/world)
    each, the last ranks short or empty), as ``fully_shard`` and
    ``distribute_tensor`` cut dim 0."""
    size = -(-n // world)
    start = min(rank * size, n)
    return slice(start, min(start + size, n))


def spanning_segments(shapes: list[tuple[int, ...]], groups: list[dict], world: int) -> int:
    """Norm segments whose elements lie on more than one rank when every
    tensor is sharded on dim 0: the whole-tensor norms (``norm_dim=None``) of
    tensors with rows on at least two ranks. A per-row norm (``norm_dim=0``)
    has its row on one rank."""
    count = 0
    for group in groups:
        if group.get("norm") is None or group.get("norm_dim") == 0:
            continue
        for i in group["params"]:
            shape = shapes[i]
            if len(shape) == 0 or math.prod(shape) == 0:
                continue
            holders = sum(rows_of_rank(shape[0], r, world).stop > rows_of_rank(shape[0], r, world).start
                          for r in range(world))
            count += holders > 1
    return count


# ------------------------------------------------------------------- ranks

def _contestants(pset: bench.ParamSet, rank: int, world: int, device: torch.device, segments: int) -> tuple:
    """Step functions by name, and ``{name: reason}`` for those that cannot run."""
    from fixnorm_ext import FusedFixNorm

    steps, skipped = {}, {}
    steps["full"] = FusedFixNorm(pset.groups_for(pset.copy()), lr=LR, momentum=MOMENTUM).step

    def local_rows(t: torch.Tensor) -> torch.Tensor:
        return t[rows_of_rank(t.shape[0], rank, world)].clone() if t.dim() else t.clone()

    local = []
    for p, g in zip(pset.params, pset.grads):
        leaf = local_rows(p).requires_grad_(True)
        leaf.grad = local_rows(g)
        local.append(leaf)
    steps["local"] = FusedFixNorm(pset.groups_for(local), lr=LR, momentum=MOMENTUM).step

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh(device.type, (world,))
        sharded = []
        for p, g, lp, lg in zip(pset.params, pset.grads, local, [t.grad for t in local]):
            param = torch.nn.Parameter(DTensor.from_local(lp.detach().clone(), mesh, [Shard(0)], run_check=False,
                                                          shape=p.shape, stride=p.stride()))
            param.grad = DTensor.from_local(lg.clone(), mesh, [Shard(0)], run_check=False,
                                            shape=g.shape, stride=g.stride())
            sharded.append(param)
        opt = FusedFixNorm(pset.groups_for(sharded), lr=LR, momentum=MOMENTUM)
        opt.step()  # a first step here: one that cannot run is found before the timing
        error = None
    except Exception as exc:  # noqa: BLE001 (any failure of the sharded path is reported, not fatal)
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    errors = [None] * world
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        skipped["sharded"] = f"FusedFixNorm does not step DTensor parameters here ({failed[0]})"
    else:
        steps["sharded"] = opt.step

    vector = torch.zeros(segments, dtype=torch.float64, device=device)
    if segments:
        steps["allreduce"] = lambda: dist.all_reduce(vector)
    else:
        skipped["allreduce"] = "no norm segment spans ranks"
    return steps, skipped


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out) -> None:
    try:
        if args.device == "cuda":
            torch.cuda.set_device(rank)
            device, backend = torch.device("cuda", rank), "nccl"
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
            device, backend = torch.device("cpu"), "gloo"
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        pset = bench.build_param_set(args.model, torch.float32, device=device)
        shapes = [tuple(p.shape) for p in pset.params]
        segments = spanning_segments(shapes, pset.groups, world)
        steps, skipped = _contestants(pset, rank, world, device, segments)
        timer = bench.timer_for(device)
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for rnd in range(args.warmup + args.reps):
            for name, step in steps.items():
                dist.barrier()
                elapsed = timer(step)
                if rnd >= args.warmup:
                    samples[name].append(elapsed)
        everyone = [None] * world
        dist.all_gather_object(everyone, samples)
        local_numel = sum(p[rows_of_rank(p.shape[0], rank, world)].numel() if p.dim() else p.numel()
                          for p in pset.params)
        numels = [None] * world
        dist.all_gather_object(numels, local_numel)
        if rank == 0:
            slowest = {name: [max(s[name][i] for s in everyone) for i in range(args.reps)] for name in steps}
            out.put(("ok", {"samples": slowest, "skipped": skipped, "segments": segments, "numel": pset.numel,
                            "n_tensors": pset.n_tensors, "local_numel": max(numels), "backend": backend,
                            "env": bench.environment(str(device)), "threads": torch.get_num_threads()}))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        out.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def report(result: dict, args: argparse.Namespace, date: str) -> tuple[str, list[dict]]:
    """The table a person reads and one row per contestant."""
    samples = result["samples"]
    full = _quantiles(samples["full"])[0] if "full" in samples else None
    local = _quantiles(samples["local"])[0] if "local" in samples else None
    nbytes = SEGMENT_BYTES * result["segments"]
    lines = [
        f"{args.model} | float32 | {result['numel']:,} elements in {result['n_tensors']} tensors, at most "
        f"{result['local_numel']:,} per rank | {args.world} {result['backend']} ranks on {args.device}, "
        f"{result['threads']} threads each | warmup {args.warmup}",
        f"all-reduce per sharded step: {result['segments']} float64 partial sums = {nbytes} bytes, one call",
        f"  {'contestant':<10} {'reps':>4} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'x full':>7} {'x local':>8}",
    ]
    rows = []
    for name in CONTESTANTS:
        if name not in samples:
            continue
        median, p20, p80 = _quantiles(samples[name])
        lines.append(f"  {name:<10} {len(samples[name]):>4} {median:>10.3f} {p20:>9.3f} {p80:>9.3f} "
                     f"{median / full:>7.3f} {median / local:>8.3f}")
        rows.append({"date": date, **result["env"], "model": args.model, "dtype": "float32", "world": args.world,
                     "comm_backend": result["backend"], "numel": result["numel"], "n_tensors": result["n_tensors"],
                     "local_numel": result["local_numel"], "contestant": name, "median_ms": round(median, 4),
                     "p20_ms": round(p20, 4), "p80_ms": round(p80, 4), "allreduce_elements": result["segments"],
                     "allreduce_bytes": nbytes, "ratio_to_full": round(median / full, 4),
                     "ratio_to_local": round(median / local, 4), "reps": len(samples[name]), "warmup": args.warmup})
    if "sharded" in samples and "local" in samples:
        extra = _quantiles(samples["sharded"])[0] - local
        lines.append(f"  sharded - local: {extra:.3f} ms per step for the norms across ranks")
    lines += [f"  skipped {name}: {why}" for name, why in result["skipped"].items()]
    return "\n".join(lines), rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="torchvision model (default: %(default)s)")
    parser.add_argument("--world", type=int, default=2, help="ranks (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo ranks sharing the cores; cuda: NCCL, one GPU per rank (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines file the rows are appended to")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.world < 2 or args.reps < 1 or args.warmup < 0:
        print("distributed bench: --world must be at least 2, --reps at least 1, --warmup at least 0",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"distributed bench: --device cuda --world {args.world} needs {args.world} GPUs, "
              f"{torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args.world, store.port, args, out)) for r in range(args.world)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    try:
        status, payload = out.get(timeout=TIMEOUT_S)
    except Exception:  # noqa: BLE001 (queue.Empty: a rank hung or died without a word)
        status, payload = "error", f"no result within {TIMEOUT_S} s; exit codes {[p.exitcode for p in procs]}"
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if status != "ok":
        print(f"distributed bench failed:\n{payload}", file=sys.stderr)
        return 1
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    table, rows = report(payload, args, date)
    print(table)
    print(f"total {time.perf_counter() - start:.1f} s")
    if not args.no_save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
