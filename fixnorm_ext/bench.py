"""Microbenchmark of one optimizer step: FixNorm backends against plain SGD.

Every contestant steps the same tensors: the parameters of a torchvision model
together with one real gradient of that model, cast to the chosen dtype and
copied so that each contestant owns an identical, private set. The step is
memory bound, so besides wall time the report gives the bandwidth achieved at
the floor of 5 accesses per element (read p, g, buf; write p, buf), i.e.
``5 * element_size`` bytes per element, 20 B for float32, and the ratio of
medians to fused SGD measured in the same run.

Contestants (momentum 0.9, lr 0.1):

* ``sgd_fused``, ``sgd_foreach``: ``torch.optim.SGD`` without any norm control,
  the floor to compare with; ``sgd_fused`` is the ratio baseline.
* ``composition``: what a user writes by hand without this package: a foreach
  SGD step, then ``torch._foreach_norm`` and ``torch._foreach_mul_`` over the
  fixed and classifier weights, with the targets recorded up front.
* ``fixnorm_<backend>``: ``FusedFixNorm`` on ``fixnorm_param_groups(model)``,
  one per backend that can run on CPU tensors here. The ``reference`` backend
  is a one-tensor-at-a-time loop and is timed with far fewer repetitions.

Repetitions are interleaved round robin (rep 1: A, B, C; rep 2: A, B, C; ...)
so that noise from a shared machine lands on every contestant alike.

    python -m fixnorm_ext bench --models resnet50 --dtype bfloat16 --reps 50
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINE = "sgd_fused"
# The FusedFixNorm backends that step CPU tensors; "cuda" and "triton" need
# the parameters on a GPU, which this benchmark does not place them on.
CPU_BACKENDS = ("reference", "foreach", "cpu")
LR = 0.1
MOMENTUM = 0.9
FC_NORM = 10.0
DEFAULT_REPS = 30
DEFAULT_WARMUP = 5
REFERENCE_REPS = 3
REFERENCE_WARMUP = 1
# Accesses per element of an SGD step with momentum: read p, g, buf; write p, buf.
ACCESSES_PER_ELEMENT = 5
DEFAULT_OUT = Path("bench") / "results" / "cpu.jsonl"


# ---------------------------------------------------------------- parameters

@dataclass
class ParamSet:
    """A model's parameters and one real gradient, detached from the model.

    ``groups`` are the FixNorm groups of the model with ``"params"`` holding
    indices into ``params`` instead of tensors, so they can be laid onto any
    copy made by :meth:`copy`.
    """

    model: str
    dtype: torch.dtype
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    groups: list[dict]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def n_tensors(self) -> int:
        return len(self.params)

    @property
    def floor_bytes(self) -> int:
        """Bytes one step must move at the least (see module docstring)."""
        return sum(ACCESSES_PER_ELEMENT * p.numel() * p.element_size() for p in self.params)

    def copy(self) -> list[torch.Tensor]:
        """Fresh leaf tensors with the same values, each with its own ``.grad``."""
        copies = []
        for p, g in zip(self.params, self.grads):
            leaf = p.clone().requires_grad_(True)
            leaf.grad = g.clone()
            copies.append(leaf)
        return copies

    def groups_for(self, copies: list[torch.Tensor]) -> list[dict]:
        """The FixNorm groups with their indices replaced by tensors of ``copies``."""
        return [{**g, "params": [copies[i] for i in g["params"]]} for g in self.groups]


def build_param_set(model_name: str, dtype: torch.dtype = torch.float32, *,
                    fc_norm: float = FC_NORM, batch_size: int = 2,
                    device: str | torch.device = "cpu") -> ParamSet:
    """Build a torchvision model (random init, nothing downloaded), run one
    forward/backward on a random batch and return its parameters and gradients
    cast to ``dtype``, with its FixNorm groups. Seeded, so it is the same set
    on every call."""
    try:
        import torchvision
    except ImportError as exc:
        raise RuntimeError("the benchmark builds torchvision models; install torchvision") from exc
    from fixnorm_ext import fixnorm_param_groups

    torch.manual_seed(0)
    try:
        model = torchvision.models.get_model(model_name, weights=None)
    except ValueError as exc:
        raise ValueError(f"unknown torchvision model {model_name!r}") from exc
    model.to(device).train()
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    logits = model(images)
    labels = torch.randint(0, logits.shape[1], (batch_size,), device=device)
    F.cross_entropy(logits, labels).backward()

    model_params = [p for p in model.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(model_params)}
    groups, covered = [], []
    for group in fixnorm_param_groups(model, fc_norm=fc_norm):
        indices = [index[id(p)] for p in group["params"]]
        covered.extend(indices)
        groups.append({**group, "params": indices})
    if sorted(covered) != list(range(len(model_params))):
        raise RuntimeError(f"{model_name}: fixnorm_param_groups did not place every "
                           "trainable parameter in exactly one group")

    with torch.no_grad():
        params = [p.detach().to(dtype).clone() for p in model_params]
        # A parameter the loss never reached still gets stepped, with a zero
        # gradient, so that every contestant touches every tensor.
        grads = [p.grad.detach().to(dtype).clone() if p.grad is not None
                 else torch.zeros_like(q) for p, q in zip(model_params, params)]
    return ParamSet(model_name, dtype, params, grads, groups)


# --------------------------------------------------------------- contestants

StepFn = Callable[[], object]


@dataclass(frozen=True)
class Contestant:
    """A way to take one step. ``make_step`` sets up an optimizer on a fresh
    copy of the parameter set and returns its step function. ``backend`` is
    the FusedFixNorm backend, if any. ``reps`` and ``warmup`` override the
    run's counts (the slow reference uses fewer)."""

    name: str
    make_step: Callable[[ParamSet], StepFn]
    note: str = ""
    backend: str | None = None
    reps: int | None = None
    warmup: int | None = None
    accesses: int = ACCESSES_PER_ELEMENT  # memory accesses per element, for GB/s

    def bytes_moved(self, pset: "ParamSet") -> int:
        return pset.floor_bytes // ACCESSES_PER_ELEMENT * self.accesses


def _sgd_step(**flags) -> Callable[[ParamSet], StepFn]:
    def make(pset: ParamSet) -> StepFn:
        return torch.optim.SGD(pset.copy(), lr=LR, momentum=MOMENTUM, **flags).step
    return make


def _copy_step(pset: ParamSet) -> StepFn:
    """One parallel copy of as many elements as the parameter set holds (2
    accesses per element): its GB/s is the machine's copy bandwidth, which
    the optimizers' GB/s can be held against."""
    src = torch.cat([g.reshape(-1) for g in pset.grads])
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _composition_step(pset: ParamSet) -> StepFn:
    params = pset.copy()
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)
    weights, targets, clamp = [], [], []
    for group in pset.groups:
        mode = group.get("norm")
        if mode is None:
            continue
        if group.get("norm_dim") is not None:
            raise NotImplementedError("the composition contestant controls whole-tensor "
                                      "norms only, but a group asks for norm_dim="
                                      f"{group['norm_dim']}")
        for i in group["params"]:
            w = params[i]
            target = group.get("target_norm")
            if target is None:
                target = torch.linalg.vector_norm(w, dtype=torch.float32).item()
            weights.append(w)
            targets.append(float(target))
            clamp.append(mode == "max")
    targets = torch.tensor(targets, dtype=torch.float32)
    clamp = torch.tensor(clamp, dtype=torch.bool)

    @torch.no_grad()
    def step():
        opt.step()
        # A second pass over the updated weights: read for the norms, then
        # read and write again to rescale them.
        norms = torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32))
        scale = targets / norms
        scale = torch.where(clamp, scale.clamp(max=1.0), scale)
        scale = torch.where(norms > 0, scale, torch.ones_like(scale))
        torch._foreach_mul_(weights, scale.unbind())
    return step


def _fixnorm_step(backend: str) -> Callable[[ParamSet], StepFn]:
    def make(pset: ParamSet) -> StepFn:
        from fixnorm_ext import FusedFixNorm
        params = pset.copy()
        return FusedFixNorm(pset.groups_for(params), lr=LR, momentum=MOMENTUM,
                            backend=backend).step
    return make


def candidate_contestants(reference_reps: int = REFERENCE_REPS) -> list[tuple[Contestant, str | None]]:
    """Every contestant this benchmark knows, each paired with ``None`` when it
    can run here or with the reason it cannot."""
    from fixnorm_ext import available_backends

    candidates = [
        (Contestant("copy", _copy_step, "torch._foreach_copy_ over the same tensors: copy bandwidth",
                    accesses=2), None),
        (Contestant("sgd_fused", _sgd_step(fused=True), "torch.optim.SGD(fused=True), no norm control"), None),
        (Contestant("sgd_foreach", _sgd_step(foreach=True), "torch.optim.SGD(foreach=True), no norm control"), None),
        (Contestant("composition", _composition_step,
                    "SGD(foreach=True) + _foreach_norm + _foreach_mul_"), None),
    ]
    reasons = available_backends()
    for backend in CPU_BACKENDS:
        reason = reasons.get(backend, f"available_backends() does not list {backend!r}")
        if backend == "reference":
            contestant = Contestant(
                "fixnorm_reference", _fixnorm_step(backend),
                f"Python one-tensor loop, timed with only {reference_reps} reps",
                backend=backend, reps=reference_reps, warmup=REFERENCE_WARMUP)
        else:
            contestant = Contestant(f"fixnorm_{backend}", _fixnorm_step(backend),
                                    f"FusedFixNorm(backend={backend!r})", backend=backend)
        candidates.append((contestant, reason))
    return candidates


def select_contestants(backends: list[str] | None = None,
                       reference_reps: int = REFERENCE_REPS) -> tuple[list[Contestant], dict[str, str]]:
    """The SGD contestants plus one per FusedFixNorm backend.

    With ``backends=None`` every backend that can run here is taken and the
    others are returned as ``{name: reason}``; a backend named explicitly that
    cannot run is an error. ``reference_reps=0`` leaves the reference out.
    """
    if backends is not None:
        unknown = sorted(set(backends) - set(CPU_BACKENDS))
        if unknown:
            raise ValueError(f"unknown or non-CPU backend(s) {unknown}; choose from {list(CPU_BACKENDS)}")
    chosen, skipped = [], {}
    for contestant, reason in candidate_contestants(reference_reps):
        backend = contestant.backend
        if backend is not None and backends is not None and backend not in backends:
            continue
        if backend == "reference" and reference_reps <= 0:
            skipped[contestant.name] = "left out (--reference-reps 0)"
            continue
        if reason is not None:
            if backends is not None:
                raise RuntimeError(f"backend {backend!r} was asked for but cannot run: {reason}")
            skipped[contestant.name] = reason
            continue
        chosen.append(contestant)
    return chosen, skipped


# ------------------------------------------------------------------- timing

class Timer(Protocol):
    def __call__(self, fn: StepFn) -> float:
        """Run ``fn`` once and return how long it took, in milliseconds."""


class CpuTimer:
    """Wall clock around the call. Right for CPU tensors, where the step is
    finished when ``fn`` returns. Tensors on an accelerator need a timer with
    the same signature built on device events (record one before and one
    after ``fn``, synchronize, read the elapsed time), since there ``fn``
    returns once the work is queued."""

    def __call__(self, fn: StepFn) -> float:
        start = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start) / 1e6


@dataclass
class Result:
    contestant: Contestant
    samples_ms: list[float]
    warmup: int

    @property
    def median_ms(self) -> float:
        return _quantile(self.samples_ms, 0.5)

    @property
    def p20_ms(self) -> float:
        return _quantile(self.samples_ms, 0.2)

    @property
    def p80_ms(self) -> float:
        return _quantile(self.samples_ms, 0.8)


def _quantile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_contestants(pset: ParamSet, contestants: list[Contestant], *, reps: int = DEFAULT_REPS,
                     warmup: int = DEFAULT_WARMUP, timer: Timer | None = None) -> list[Result]:
    """Time one step of each contestant, round robin.

    Round ``r`` runs every contestant once, in order. A contestant with fewer
    warmup rounds or reps of its own joins late and leaves early, so that its
    timed steps fall inside the rounds where the others are timed too.
    """
    if timer is None:
        devices = {p.device.type for p in pset.params}
        if devices - {"cpu"}:
            raise NotImplementedError(f"parameters on {sorted(devices)}: only CPU has a timer "
                                      "so far; pass one built on device events")
        timer = CpuTimer()
    steps = [c.make_step(pset) for c in contestants]
    samples: list[list[float]] = [[] for _ in contestants]
    windows = []
    for c in contestants:
        own_warmup = warmup if c.warmup is None else min(c.warmup, warmup)
        own_reps = reps if c.reps is None else min(c.reps, reps)
        windows.append((warmup - own_warmup, warmup + own_reps, own_warmup))
    for rnd in range(warmup + reps):
        for step, (first, end, _), timed in zip(steps, windows, samples):
            if first <= rnd < end:
                elapsed = timer(step)
                if rnd >= warmup:
                    timed.append(elapsed)
    return [Result(c, s, w[2]) for c, s, w in zip(contestants, samples, windows)]


# ------------------------------------------------------------------ reporting

def environment() -> dict:
    """What produced the numbers: hardware (no hostname), versions, commit."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "hardware": {"cpu": cpu, "cores": usable, "torch_threads": torch.get_num_threads()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "commit": git_commit(),
    }


def git_commit() -> str:
    """Short commit of the checkout holding this file, ``+dirty`` when tracked
    files differ from it; ``unknown`` outside git or before the first commit."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit + "+dirty" if status else commit


def _baseline_ms(results: list[Result]) -> float | None:
    for r in results:
        if r.contestant.name == BASELINE:
            return r.median_ms
    return None


def rows(pset: ParamSet, results: list[Result], env: dict, date: str) -> list[dict]:
    """One machine-readable row per contestant."""
    base = _baseline_ms(results)
    out = []
    for r in results:
        out.append({
            "date": date,
            **env,
            "model": pset.model,
            "dtype": str(pset.dtype).removeprefix("torch."),
            "numel": pset.numel,
            "n_tensors": pset.n_tensors,
            "contestant": r.contestant.name,
            "median_ms": round(r.median_ms, 4),
            "p20_ms": round(r.p20_ms, 4),
            "p80_ms": round(r.p80_ms, 4),
            "gbps": round(r.contestant.bytes_moved(pset) / r.median_ms / 1e6, 3),
            "ratio_to_sgd_fused": round(r.median_ms / base, 4) if base else None,
            "reps": len(r.samples_ms),
            "warmup": r.warmup,
        })
    return out


def format_table(pset: ParamSet, results: list[Result], skipped: dict[str, str],
                 warmup: int) -> str:
    elem = pset.params[0].element_size() if pset.params else 0
    dtype = str(pset.dtype).removeprefix("torch.")
    lines = [
        f"{pset.model} | {dtype} | {pset.numel:,} elements in {pset.n_tensors} tensors | "
        f"floor {pset.floor_bytes / 1e6:,.0f} MB/step ({ACCESSES_PER_ELEMENT * elem} B/elem) | "
        f"{torch.get_num_threads()} threads, warmup {warmup}",
        f"  {'contestant':<18} {'reps':>4} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} "
        f"{'GB/s':>7} {'x ' + BASELINE:>12}",
    ]
    base = _baseline_ms(results)
    notes = []
    for r in results:
        mark = ""
        if r.contestant.reps is not None:
            mark = "*"
            notes.append(f"  * {r.contestant.name}: {r.contestant.note}")
        gbps = r.contestant.bytes_moved(pset) / r.median_ms / 1e6
        ratio = f"{r.median_ms / base:.2f}" if base else "-"
        lines.append(f"  {r.contestant.name + mark:<18} {len(r.samples_ms):>4} {r.median_ms:>10.2f} "
                     f"{r.p20_ms:>9.2f} {r.p80_ms:>9.2f} {gbps:>7.2f} {ratio:>12}")
    lines += notes
    lines += [f"  skipped {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated torchvision model names (default: %(default)s)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of parameters, gradients and state (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS,
                        help="timed steps per contestant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help="untimed steps per contestant first (default: %(default)s)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated FusedFixNorm backends out of "
                             f"{','.join(CPU_BACKENDS)} (default: every one that can run "
                             "here; one named here that cannot run is an error)")
    parser.add_argument("--reference-reps", type=int, default=REFERENCE_REPS,
                        help="timed steps of the slow reference backend, 0 to leave it "
                             "out (default: %(default)s)")
    parser.add_argument("--fc-norm", type=float, default=FC_NORM,
                        help="classifier norm bound given to fixnorm_param_groups (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="batch of the one forward/backward that makes the gradients "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON-lines file the rows are appended to (default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="print the tables only")


def main(args: argparse.Namespace) -> int:
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be at least 1 and --warmup at least 0")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    import torchvision
    unknown = [m for m in models if m not in torchvision.models.list_models()]
    if unknown:
        raise SystemExit(f"bench: unknown torchvision model(s) {unknown}; see "
                         "torchvision.models.list_models()")
    backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        contestants, skipped = select_contestants(backends, args.reference_reps)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"bench: {exc}") from exc
    dtype = DTYPES[args.dtype]
    env = environment()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{env['hardware']['cpu']}, {env['hardware']['cores']} cores, "
          f"{env['hardware']['torch_threads']} torch threads; torch {env['torch']}, "
          f"torchvision {env['torchvision']}, commit {env['commit']}", flush=True)

    start = time.perf_counter()
    all_rows = []
    for model in models:
        pset = build_param_set(model, dtype, fc_norm=args.fc_norm, batch_size=args.batch_size)
        results = time_contestants(pset, contestants, reps=args.reps, warmup=args.warmup)
        print("\n" + format_table(pset, results, skipped, args.warmup), flush=True)
        all_rows += rows(pset, results, env, date)
        del pset, results
    print(f"\ntotal {time.perf_counter() - start:.1f} s")

    if not args.no_save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in all_rows:
                f.write(json.dumps(row) + "\n")
        print(f"appended {len(all_rows)} rows to {args.out}")
    return 0
