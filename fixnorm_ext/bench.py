"""Microbenchmark of one optimizer step: FixNorm backends against plain SGD.

Every contestant steps the same tensors: the parameters of a torchvision model
together with one real gradient of that model, cast to the chosen dtype and
copied so that each contestant owns an identical, private set. The step is
memory bound, so besides wall time the report gives the bandwidth achieved at
the floor of 5 accesses per element (read p, g, buf; write p, buf), i.e.
``5 * element_size`` bytes per element, 20 B for float32 and 10 B for
bfloat16, the fraction of the copy bandwidth measured once per run (one large
``dst.copy_(src)``, read plus write) that this is, and the ratio of medians
to fused SGD measured in the same run.

Besides torchvision models, ``synthetic1b`` is a list of 64 matrices of
4096 x 3840 (1.0e9 elements, random values and gradients): 63 held at a fixed
norm and one classifier-like matrix whose norm is clamped. It is too big for
a CPU run unless ``--synthetic-params`` shrinks it.

``--device cuda`` builds the parameter sets on the GPU and times every step
between two CUDA events; ``--device cpu`` (the default) uses the wall clock.

Contestants (momentum 0.9, lr 0.1):

* ``sgd_fused``, ``sgd_foreach``: ``torch.optim.SGD`` without any norm control,
  the floor to compare with; ``sgd_fused`` is the ratio baseline.
* ``composition``: what a user writes by hand without this package: a foreach
  SGD step, then ``torch._foreach_norm`` and ``torch._foreach_mul_`` over the
  fixed and classifier weights, with the targets recorded up front.
* ``fixnorm_<backend>``: ``FusedFixNorm`` on ``fixnorm_param_groups(model)``,
  one per backend that can run on the chosen device here. The ``reference``
  backend is a one-tensor-at-a-time float64 loop: timed with far fewer
  repetitions on CPU and left out on CUDA unless asked for.

Repetitions are interleaved round robin (rep 1: A, B, C; rep 2: A, B, C; ...)
so that noise from a shared machine lands on every contestant alike.

    python -m fixnorm_ext bench --models resnet50 --dtype bfloat16 --reps 50
    python -m fixnorm_ext bench --device cuda --models resnet50,synthetic1b
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")
BASELINE = "sgd_fused"
# The FusedFixNorm backends expected on each device. Any other backend that
# available_backends(device) lists is timed too.
CPU_BACKENDS = ("reference", "foreach", "cpu")
CUDA_BACKENDS = ("reference", "foreach", "cuda", "triton")
DEVICE_BACKENDS = {"cpu": CPU_BACKENDS, "cuda": CUDA_BACKENDS}
LR = 0.1
MOMENTUM = 0.9
FC_NORM = 10.0
DEFAULT_REPS = 30
DEFAULT_WARMUP = 5
# The reference steps in float64, one tensor at a time: a few reps on CPU, and
# left out on CUDA (where its float64 copies of the 1e9-element set would not
# fit next to the others) unless --reference-reps asks for it.
REFERENCE_REPS = 3
DEFAULT_REFERENCE_REPS = {"cpu": REFERENCE_REPS, "cuda": 0}
REFERENCE_WARMUP = 1
# Accesses per element of an SGD step with momentum: read p, g, buf; write p, buf.
ACCESSES_PER_ELEMENT = 5
DEFAULT_OUT = {"cpu": Path("bench") / "results" / "cpu.jsonl",
               "cuda": Path("bench") / "results" / "cuda.jsonl"}
# Bytes of the source of the once-per-run copy-bandwidth measurement: far
# beyond any cache (an H200 has 60 MB of L2), small next to device memory.
DEFAULT_COPY_MB = {"cpu": 256, "cuda": 2000}

SYNTHETIC = "synthetic1b"
# 64 matrices of 4096 x 3840: 1,006,632,960 elements.
SYNTHETIC_MATRICES = 64
SYNTHETIC_ROWS = 4096
SYNTHETIC_COLS = 3840
SYNTHETIC_NUMEL = SYNTHETIC_MATRICES * SYNTHETIC_ROWS * SYNTHETIC_COLS
# On CPU each contestant holds its own params, grads and buffers (12 bytes
# per float32 element); beyond this the run no longer fits a small machine.
CPU_SYNTHETIC_MAX = 50_000_000


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


def synthetic_shapes(numel: int = SYNTHETIC_NUMEL) -> list[tuple[int, int]]:
    """Shapes of the synthetic set shrunk to at most ``numel`` elements: always
    64 matrices, 4096 x 3840 at full size; a smaller set keeps the rows of
    3840 columns (shorter ones below 64 * 3840 elements) and has fewer rows."""
    if numel < SYNTHETIC_MATRICES:
        raise ValueError(f"{SYNTHETIC} needs at least {SYNTHETIC_MATRICES} elements "
                         f"(one per matrix), got {numel}")
    per_matrix = min(numel, SYNTHETIC_NUMEL) // SYNTHETIC_MATRICES
    cols = min(SYNTHETIC_COLS, per_matrix)
    return [(per_matrix // cols, cols)] * SYNTHETIC_MATRICES


def build_synthetic_set(dtype: torch.dtype = torch.float32, *, numel: int = SYNTHETIC_NUMEL,
                        fc_norm: float = FC_NORM,
                        device: str | torch.device = "cpu") -> ParamSet:
    """The ``synthetic1b`` set (see :func:`synthetic_shapes`): random weights
    of norm about ``sqrt(rows)``, random gradients a thousand times smaller.
    All matrices but the last keep their initial norm (``"fixed"``); the last
    plays the classifier, its norm clamped to ``fc_norm`` (``"max"``), which
    rescales it on every step. Seeded, so it is the same set on every call."""
    gen = torch.Generator(device=device).manual_seed(0)
    params, grads = [], []
    for rows, cols in synthetic_shapes(numel):
        # Drawn in float32 one matrix at a time, so a low-precision set never
        # holds more than one float32 matrix extra.
        w = torch.randn(rows, cols, generator=gen, device=device).mul_(cols ** -0.5)
        g = torch.randn(rows, cols, generator=gen, device=device).mul_(1e-3 * cols ** -0.5)
        params.append(w.to(dtype))
        grads.append(g.to(dtype))
        del w, g
    last = len(params) - 1
    groups = [
        {"params": list(range(last)), "norm": "fixed", "target_norm": None, "norm_dim": None,
         "role": "fixed"},
        {"params": [last], "norm": "max", "target_norm": fc_norm, "norm_dim": None,
         "role": "classifier"},
    ]
    return ParamSet(SYNTHETIC, dtype, params, grads, groups)


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
    accesses per element): the copy bandwidth at this set's size, next to the
    run's one large copy (:func:`measure_copy_bandwidth`)."""
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
    device = params[0].device if params else torch.device("cpu")
    targets = torch.tensor(targets, dtype=torch.float32, device=device)
    clamp = torch.tensor(clamp, dtype=torch.bool, device=device)

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


def _fixnorm_step(backend: str, track_stats: bool = False) -> Callable[[ParamSet], StepFn]:
    def make(pset: ParamSet) -> StepFn:
        from fixnorm_ext import FusedFixNorm
        params = pset.copy()
        return FusedFixNorm(pset.groups_for(params), lr=LR, momentum=MOMENTUM,
                            backend=backend, track_stats=track_stats).step
    return make


# Backends whose kernel measures track_stats' angles in its own pass: the
# benchmark times them with it too, as "fixnorm_<backend>_stats".
STATS_BACKENDS = ("cpu",)
STATS_SUFFIX = "_stats"


def device_backends(device: str = "cpu") -> tuple[str, ...]:
    """The FusedFixNorm backends timed on ``device``: those expected there
    (:data:`DEVICE_BACKENDS`), then any other that ``available_backends``
    lists as able to run there."""
    from fixnorm_ext import available_backends

    expected = DEVICE_BACKENDS[device]
    extra = [b for b, reason in available_backends(device).items()
             if reason is None and b not in expected]
    return (*expected, *extra)


def candidate_contestants(reference_reps: int = REFERENCE_REPS,
                          device: str = "cpu") -> list[tuple[Contestant, str | None]]:
    """Every contestant this benchmark knows for tensors on ``device``, each
    paired with ``None`` when it can run here or with the reason it cannot."""
    from fixnorm_ext import available_backends

    candidates = [
        (Contestant("copy", _copy_step, "one flat copy as large as the set: copy bandwidth",
                    accesses=2), None),
        (Contestant("sgd_fused", _sgd_step(fused=True), "torch.optim.SGD(fused=True), no norm control"), None),
        (Contestant("sgd_foreach", _sgd_step(foreach=True), "torch.optim.SGD(foreach=True), no norm control"), None),
        (Contestant("composition", _composition_step,
                    "SGD(foreach=True) + _foreach_norm + _foreach_mul_"), None),
    ]
    reasons = available_backends(device)
    for backend in device_backends(device):
        reason = reasons.get(backend, f"available_backends({device!r}) does not list {backend!r}")
        if backend == "reference":
            contestant = Contestant(
                "fixnorm_reference", _fixnorm_step(backend),
                f"Python one-tensor loop, timed with only {reference_reps} reps",
                backend=backend, reps=reference_reps, warmup=REFERENCE_WARMUP)
        else:
            contestant = Contestant(f"fixnorm_{backend}", _fixnorm_step(backend),
                                    f"FusedFixNorm(backend={backend!r})", backend=backend)
        candidates.append((contestant, reason))
        if backend in STATS_BACKENDS:
            candidates.append((Contestant(f"fixnorm_{backend}{STATS_SUFFIX}", _fixnorm_step(backend, True),
                                          f"FusedFixNorm(backend={backend!r}, track_stats=True)",
                                          backend=backend), reason))
    return candidates


def select_contestants(backends: list[str] | None = None,
                       reference_reps: int = REFERENCE_REPS,
                       device: str = "cpu") -> tuple[list[Contestant], dict[str, str]]:
    """The SGD contestants plus one per FusedFixNorm backend for ``device``.

    With ``backends=None`` every backend that can run here is taken and the
    others are returned as ``{name: reason}``; a backend named explicitly that
    cannot run is an error. ``reference_reps=0`` leaves the reference out.
    """
    if backends is not None:
        known = device_backends(device)
        unknown = sorted(set(backends) - set(known))
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown} for --device {device}; "
                             f"choose from {list(known)}")
    chosen, skipped = [], {}
    for contestant, reason in candidate_contestants(reference_reps, device):
        backend = contestant.backend
        if backend is not None and backends is not None and backend not in backends:
            continue
        if backend == "reference" and reference_reps <= 0:
            default = ", the default on cuda" if device == "cuda" else ""
            skipped[contestant.name] = f"left out (--reference-reps 0{default})"
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
    finished when ``fn`` returns."""

    def __call__(self, fn: StepFn) -> float:
        start = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start) / 1e6


class CudaTimer:
    """CUDA events recorded on the current stream before and after the call.

    ``fn`` returns once its kernels are queued, so the wall clock would time
    the launches only. The timer waits for the end event before returning:
    every step starts on an idle GPU, and a step bound by launch overhead
    (the GPU waiting for the host to queue the next kernel) is charged for
    it, as it would be in training."""

    def __init__(self) -> None:
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: StepFn) -> float:
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end)


def timer_for(device: str | torch.device) -> Timer:
    """The timer for tensors on ``device``."""
    kind = torch.device(device).type
    if kind == "cpu":
        return CpuTimer()
    if kind == "cuda":
        return CudaTimer()
    raise NotImplementedError(f"no timer for tensors on {kind}; pass one built on that device's events")


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


@dataclass
class CopyBandwidth:
    """The device's copy bandwidth: ``dst.copy_(src)`` of ``nbytes`` bytes,
    counted as ``2 * nbytes`` moved (read plus write)."""

    device: str
    nbytes: int
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return _quantile(self.samples_ms, 0.5)

    @property
    def gbps(self) -> float:
        return gbps(2 * self.nbytes, self.median_ms)


def measure_copy_bandwidth(device: str | torch.device, nbytes: int, *, reps: int = DEFAULT_REPS,
                           warmup: int = DEFAULT_WARMUP, timer: Timer | None = None) -> CopyBandwidth:
    """Time ``reps`` copies of one ``nbytes`` float32 buffer into another on
    ``device``, after ``warmup`` untimed ones."""
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = timer_for(device) if timer is None else timer
    samples = []
    for rep in range(warmup + reps):
        elapsed = timer(lambda: dst.copy_(src))
        if rep >= warmup:
            samples.append(elapsed)
    return CopyBandwidth(str(torch.device(device)), numel * 4, samples)


def gbps(nbytes: int, ms: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``ms``."""
    return nbytes / ms / 1e6


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
    devices = {p.device for p in pset.params} or {torch.device("cpu")}
    if len(devices) > 1:
        raise ValueError(f"the parameter set spans several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if timer is None:
        timer = timer_for(device)
    steps = [c.make_step(pset) for c in contestants]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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

def environment(device: str = "cpu") -> dict:
    """What produced the numbers: device, hardware (no hostname), versions,
    commit, and the ``FIXNORM_*`` environment variables that steer the
    kernels (``FIXNORM_CUDA_SCHEDULE``, ``FIXNORM_CPU_GENERIC``, ...)."""
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
    hardware = {"cpu": cpu, "cores": usable, "torch_threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        sm_count=props.multi_processor_count,
                        capability=f"{props.major}.{props.minor}")
    return {
        "device": torch.device(device).type,
        "hardware": hardware,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "torchvision": _package_version("torchvision"),
        "commit": git_commit(),
        "fixnorm_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FIXNORM_")},
    }


def _package_version(name: str) -> str | None:
    """Version of ``name``: the loaded module's ``__version__`` (with its local
    part, ``+cu130``), else the installed one, without importing it; ``None``
    if absent."""
    module = sys.modules.get(name)
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """Short commit of the checkout holding this file, ``+dirty`` when tracked
    files differ from it. Outside git (a copy of the tree on another machine)
    or before the first commit: ``$FIXNORM_COMMIT`` if set, else ``unknown``."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD") or os.environ.get("FIXNORM_COMMIT") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit + "+dirty" if status else commit


def _baseline_ms(results: list[Result]) -> float | None:
    for r in results:
        if r.contestant.name == BASELINE:
            return r.median_ms
    return None


def rows(pset: ParamSet, results: list[Result], env: dict, date: str,
         copy: CopyBandwidth | None = None) -> list[dict]:
    """One machine-readable row per contestant. ``gbps`` counts the bytes of
    :meth:`Contestant.bytes_moved`; ``copy_fraction`` is that bandwidth over
    the run's measured copy bandwidth ``copy_gbps`` (``None`` when the run
    measured none)."""
    base = _baseline_ms(results)
    out = []
    for r in results:
        achieved = gbps(r.contestant.bytes_moved(pset), r.median_ms)
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
            "bytes_per_step": r.contestant.bytes_moved(pset),
            "gbps": round(achieved, 3),
            "copy_gbps": round(copy.gbps, 3) if copy else None,
            "copy_bytes": copy.nbytes if copy else None,
            "copy_fraction": round(achieved / copy.gbps, 4) if copy else None,
            "ratio_to_sgd_fused": round(r.median_ms / base, 4) if base else None,
            "reps": len(r.samples_ms),
            "warmup": r.warmup,
        })
    return out


def format_table(pset: ParamSet, results: list[Result], skipped: dict[str, str],
                 warmup: int, copy: CopyBandwidth | None = None) -> str:
    elem = pset.params[0].element_size() if pset.params else 0
    dtype = str(pset.dtype).removeprefix("torch.")
    device = pset.params[0].device if pset.params else torch.device("cpu")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    lines = [
        f"{pset.model} | {dtype} | {pset.numel:,} elements in {pset.n_tensors} tensors | "
        f"floor {pset.floor_bytes / 1e6:,.0f} MB/step ({ACCESSES_PER_ELEMENT * elem} B/elem) | "
        f"{where}, warmup {warmup}",
        f"  {'contestant':<18} {'reps':>4} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} "
        f"{'GB/s':>8} {'% copy':>7} {'x ' + BASELINE:>12}",
    ]
    base = _baseline_ms(results)
    notes = []
    for r in results:
        mark = ""
        if r.contestant.reps is not None:
            mark = "*"
            notes.append(f"  * {r.contestant.name}: {r.contestant.note}")
        achieved = gbps(r.contestant.bytes_moved(pset), r.median_ms)
        ratio = f"{r.median_ms / base:.2f}" if base else "-"
        share = f"{100 * achieved / copy.gbps:.0f}" if copy else "-"
        lines.append(f"  {r.contestant.name + mark:<18} {len(r.samples_ms):>4} {r.median_ms:>10.3f} "
                     f"{r.p20_ms:>9.3f} {r.p80_ms:>9.3f} {achieved:>8.1f} {share:>7} {ratio:>12}")
    lines += notes
    lines += [f"  {line}" for line in stats_overheads(results)]
    lines += [f"  skipped {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


def stats_overheads(results: list[Result]) -> list[str]:
    """What track_stats costs: each ``fixnorm_<b>_stats`` step over the
    ``fixnorm_<b>`` step of the same run."""
    by_name = {r.contestant.name: r.median_ms for r in results}
    out = []
    for name, ms in by_name.items():
        plain = by_name.get(name.removesuffix(STATS_SUFFIX)) if name.endswith(STATS_SUFFIX) else None
        if plain:
            out.append(f"track_stats overhead ({name} over {name.removesuffix(STATS_SUFFIX)}, same run): "
                       f"{100 * (ms / plain - 1):+.1f}%")
    return out


# The speed targets (contestant, model, measure, op, bound). The CUDA backend
# (issue 3): at most 1.10x fused SGD's step and at least 1.5x faster than the
# composition on resnet50, at least 80% of the copy bandwidth on synthetic1b.
# The Triton backend (issue 4): at most 1.25x the CUDA backend's step and
# 1.3x fused SGD's on resnet50 and synthetic1b. "x NAME" is the step time over
# contestant NAME's in the same run.
SPEED_TARGETS = (
    ("fixnorm_cuda", "resnet50", "x sgd_fused", "<=", 1.10),
    ("fixnorm_cuda", "resnet50", "speedup over composition", ">=", 1.5),
    ("fixnorm_cuda", SYNTHETIC, "fraction of copy", ">=", 0.80),
    ("fixnorm_triton", "resnet50", "x fixnorm_cuda", "<=", 1.25),
    ("fixnorm_triton", "resnet50", "x sgd_fused", "<=", 1.30),
    ("fixnorm_triton", SYNTHETIC, "x fixnorm_cuda", "<=", 1.25),
    ("fixnorm_triton", SYNTHETIC, "x sgd_fused", "<=", 1.30),
    # Issue 7's aim: track_stats costs at most 3% of the CPU step.
    ("fixnorm_cpu_stats", "resnet50", "x fixnorm_cpu", "<=", 1.03),
)


def _target_value(run: dict[tuple[str, str], dict], contestant: str, model: str, measure: str) -> float | None:
    """``measure`` of ``contestant`` on ``model`` in one run's rows, or None."""
    mine = run.get((model, contestant))
    if mine is None:
        return None
    if measure == "fraction of copy":
        return mine["copy_fraction"]
    if measure == "speedup over composition":
        other = run.get((model, "composition"))
        return None if other is None else other["median_ms"] / mine["median_ms"]
    if measure.startswith("x "):
        other = run.get((model, measure[2:]))
        return None if other is None else mine["median_ms"] / other["median_ms"]
    raise ValueError(f"unknown speed measure {measure!r}")


def speed_report(rows: list[dict], contestants: tuple[str, ...] | None = None) -> list[str]:
    """One line per run (same date, dtype and ``FIXNORM_CUDA_SCHEDULE``) and
    target of :data:`SPEED_TARGETS` (only those of ``contestants`` if given):
    the value and whether it meets the target, or ``no data`` when the run
    lacks the rows it needs."""
    runs: dict[tuple, dict[tuple[str, str], dict]] = {}
    for row in rows:
        schedule = row.get("fixnorm_env", {}).get("FIXNORM_CUDA_SCHEDULE", "-")
        key = (row["date"], row["dtype"], schedule)
        runs.setdefault(key, {})[(row["model"], row["contestant"])] = row
    lines = [f"{'dtype':<9} {'schedule':<8} {'model':<12} {'measure':<42} {'value':>6}  target"]
    for (_, dtype, schedule), run in runs.items():
        for contestant, model, measure, op, bound in SPEED_TARGETS:
            if contestants is not None and contestant not in contestants:
                continue
            value = _target_value(run, contestant, model, measure)
            if value is None:
                verdict, shown = "no data", "-"
            else:
                met = value <= bound if op == "<=" else value >= bound
                verdict, shown = ("met" if met else "MISSED"), f"{value:.3f}"
            lines.append(f"{dtype:<9} {schedule:<8} {model:<12} {contestant + ' ' + measure:<42} "
                         f"{shown:>6}  {op} {bound}: {verdict}")
    return lines


def print_speed_report(path: str | Path, *contestants: str) -> None:
    """Print :func:`speed_report` for the rows of a results file (the targets
    of ``contestants`` only, if any are named)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print("\n".join(speed_report(rows, contestants or None)))


# ------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the parameter sets live and are stepped (default: %(default)s)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated torchvision model names, or "
                             f"{SYNTHETIC} (default: %(default)s)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of parameters, gradients and state (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS,
                        help="timed steps per contestant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help="untimed steps per contestant first (default: %(default)s)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated FusedFixNorm backends: out of "
                             f"{','.join(CPU_BACKENDS)} on cpu, {','.join(CUDA_BACKENDS)} on "
                             "cuda (default: every one that can run here; one named here "
                             "that cannot run is an error)")
    parser.add_argument("--reference-reps", type=int, default=None,
                        help="timed steps of the slow reference backend, 0 to leave it "
                             f"out (default: {DEFAULT_REFERENCE_REPS['cpu']} on cpu, "
                             f"{DEFAULT_REFERENCE_REPS['cuda']} on cuda)")
    parser.add_argument("--fc-norm", type=float, default=FC_NORM,
                        help="classifier norm bound given to fixnorm_param_groups (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="batch of the one forward/backward that makes the gradients "
                             "(default: %(default)s)")
    parser.add_argument("--synthetic-params", type=int, default=SYNTHETIC_NUMEL, metavar="N",
                        help=f"shrink {SYNTHETIC} to at most N elements, still in "
                             f"{SYNTHETIC_MATRICES} matrices (default: %(default)s; on cpu at "
                             f"most {CPU_SYNTHETIC_MAX})")
    parser.add_argument("--copy-mb", type=float, default=None,
                        help="MB (1e6 bytes) copied by the once-per-run copy-bandwidth "
                             f"measurement, 0 to skip it (default: {DEFAULT_COPY_MB['cpu']} on "
                             f"cpu, {DEFAULT_COPY_MB['cuda']} on cuda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON-lines file the rows are appended to (default: "
                             f"{DEFAULT_OUT['cpu']} on cpu, {DEFAULT_OUT['cuda']} on cuda)")
    parser.add_argument("--no-save", action="store_true", help="print the tables only")


def _refuse(message: str) -> int:
    """Say on one line why the run cannot start; exit status 2, like argparse."""
    print(f"bench: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    if args.reps < 1 or args.warmup < 0:
        return _refuse("--reps must be at least 1 and --warmup at least 0")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        built = (f"built with CUDA {torch.version.cuda}" if torch.version.cuda
                 else "a build without CUDA")
        return _refuse(f"--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
                       f"here (torch {torch.__version__}, {built}); use --device cpu")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        return _refuse("--models names no model")
    if SYNTHETIC in models:
        if args.synthetic_params < SYNTHETIC_MATRICES:
            return _refuse(f"--synthetic-params must be at least {SYNTHETIC_MATRICES}")
        if device == "cpu" and args.synthetic_params > CPU_SYNTHETIC_MAX:
            return _refuse(f"{SYNTHETIC} with {args.synthetic_params:,} elements is too big for a "
                           f"CPU run (every contestant holds its own copy); shrink it with "
                           f"--synthetic-params N, N <= {CPU_SYNTHETIC_MAX:,}, or use --device cuda")
    vision = [m for m in models if m != SYNTHETIC]
    if vision:
        try:
            import torchvision
        except ImportError:
            return _refuse(f"{vision} are torchvision models, but torchvision is not installed; "
                           f"install it or ask for --models {SYNTHETIC} only")
        unknown = [m for m in vision if m not in torchvision.models.list_models()]
        if unknown:
            return _refuse(f"unknown torchvision model(s) {unknown}; see "
                           "torchvision.models.list_models()")
    backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    reference_reps = (DEFAULT_REFERENCE_REPS[device] if args.reference_reps is None
                      else args.reference_reps)
    try:
        contestants, skipped = select_contestants(backends, reference_reps, device)
    except (ValueError, RuntimeError) as exc:
        return _refuse(str(exc))
    copy_mb = DEFAULT_COPY_MB[device] if args.copy_mb is None else args.copy_mb
    out = DEFAULT_OUT[device] if args.out is None else args.out
    dtype = DTYPES[args.dtype]
    env = environment(device)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    hw = env["hardware"]
    where = (f"{hw['gpu']} ({hw['gpu_memory_gib']} GiB, CUDA {env['cuda']}), host {hw['cpu']}"
             if device == "cuda" else f"{hw['cpu']}, {hw['cores']} cores, {hw['torch_threads']} torch threads")
    print(f"{where}; torch {env['torch']}, torchvision {env['torchvision']}, "
          f"triton {env['triton']}, commit {env['commit']}", flush=True)
    if env["fixnorm_env"]:
        print("  " + " ".join(f"{k}={v}" for k, v in env["fixnorm_env"].items()), flush=True)

    start = time.perf_counter()
    copy = None
    if copy_mb > 0:
        copy = measure_copy_bandwidth(device, int(copy_mb * 1e6), reps=args.reps, warmup=args.warmup)
        print(f"copy bandwidth: {copy.gbps:,.1f} GB/s (dst.copy_(src) of {copy.nbytes / 1e6:,.0f} MB, "
              f"read + write, median of {len(copy.samples_ms)})", flush=True)
    saved, failed = 0, []
    for model in models:
        # One model failing (out of memory, a kernel error) must not lose the
        # others' rows: each model's rows are saved as soon as they exist.
        try:
            if model == SYNTHETIC:
                pset = build_synthetic_set(dtype, numel=args.synthetic_params, fc_norm=args.fc_norm,
                                           device=device)
            else:
                pset = build_param_set(model, dtype, fc_norm=args.fc_norm, batch_size=args.batch_size,
                                       device=device)
            results = time_contestants(pset, contestants, reps=args.reps, warmup=args.warmup)
            table = format_table(pset, results, skipped, args.warmup, copy)
            model_rows = rows(pset, results, env, date, copy)
        except Exception:
            traceback.print_exc()
            print(f"bench: {model} failed (traceback above); going on with the other models",
                  file=sys.stderr, flush=True)
            failed.append(model)
            continue
        finally:
            pset = results = None
            if device == "cuda":
                torch.cuda.empty_cache()
        print("\n" + table, flush=True)
        if not args.no_save:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in model_rows)
            saved += len(model_rows)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if not args.no_save:
        print(f"appended {saved} rows to {out}")
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
