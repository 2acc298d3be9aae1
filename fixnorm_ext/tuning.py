"""Few-trial tuning of FixNorm's two hyperparameters, ``lr`` and ``fc_norm``.

FixNorm's claim is that once weight decay is replaced by direct norm control
only these two matter, and that each is well behaved on a log scale, so a
handful of sequential one-dimensional searches finds a good pair:

1. the classifier norm, at a middling learning rate (the geometric mean of
   the lr range);
2. the learning rate, at the best classifier norm found;
3. a refinement: a point on either side of the best pair so far, one
   hyperparameter at a time in turn (half the coarse spacing away, halved
   again once both sides are known), until the budget is spent.

Each one-dimensional search lays a coarse grid of up to three points over
the range in log space (reusing any point of that line already evaluated),
then halves the step around the best point: toward its better neighbour, or
outward when the best point is the last one before an end of the range.

:func:`tune` runs that search; :func:`random_search` (log-uniform) and
:func:`tpe_search` (optuna's TPE, when optuna is installed) take the same
arguments and return the same :class:`TuneResult`, as baselines. ``objective``
is called as ``objective(lr, fc_norm)`` and returns a score to maximize; a
NaN score (a diverged run) counts as the worst. No point is evaluated twice,
and the budget is never exceeded. ``on_trial(trial)``, if given, is called
after each trial (the CLI prints its progress line there). ``objective_info``,
a JSON-able dict that says what the objective is (the CLI: example, epochs,
backend), is kept in the log: a log of another objective is not resumed.

``log``, a path, keeps the trials as JSON, rewritten after each one. Given a
log that exists, a search with the same method, ranges and seed takes the
scores of the points it already holds instead of calling ``objective``, so an
interrupted run resumes where it stopped (and a finished one costs nothing
to repeat).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

LOG_VERSION = 1
COARSE_POINTS = 3  # per one-dimensional search, before it starts halving


@dataclass
class Trial:
    index: int
    lr: float
    fc_norm: float
    score: Optional[float]  # None: the objective returned NaN
    phase: str              # which search asked for it ("fc_norm", "lr", "refine", "random", "tpe")
    resumed: bool = False   # taken from the log, not evaluated in this run


@dataclass
class TuneResult:
    best_lr: float
    best_fc_norm: float
    best_score: float
    trials: list[Trial] = field(default_factory=list)
    method: str = "sequential"

    def __str__(self) -> str:
        return (f"{self.method}: best score {self.best_score:.6g} at lr={self.best_lr:.6g}, "
                f"fc_norm={self.best_fc_norm:.6g} ({len(self.trials)} trials)")


Objective = Callable[[float, float], float]
Range = tuple[float, float]


def _check_range(name: str, value) -> Range:
    try:
        lo, hi = value
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (lo, hi) of numbers, got {value!r}") from None
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"{name} range must satisfy 0 < lo < hi < inf (it is searched in log space), got ({lo}, {hi})")
    return lo, hi


def _check_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 (the number of objective calls), got {budget!r}")
    return budget


class _Evaluator:
    """Calls the objective at most ``budget`` times, never twice for one point,
    and keeps the log. Points are compared in log space, rounded, so that the
    same point reached by two routes is one point."""

    def __init__(self, objective: Objective, budget: int, method: str, space: dict, seed: int,
                 log: Optional[Union[str, Path]], on_trial: Optional[Callable[[Trial], None]] = None,
                 objective_info: Optional[dict] = None):
        if not callable(objective):
            raise TypeError(f"objective must be callable as objective(lr, fc_norm), got {type(objective).__name__}")
        self.objective, self.budget, self.on_trial = objective, budget, on_trial
        self.header = {"version": LOG_VERSION, "method": method, "space": space, "seed": seed,
                       "objective": objective_info}
        self.log = None if log is None else Path(log)
        if self.log is not None and not self.log.parent.is_dir():
            raise ValueError(f"log {self.log}: the folder {self.log.parent} does not exist")
        self.trials: list[Trial] = []
        self.seen: dict[tuple, Trial] = {}
        self.earlier: list[dict] = []  # the log's trials, kept in it even when this run does not ask for them
        self.logged: dict[tuple, Optional[float]] = self._read_log()

    @staticmethod
    def key(lr: float, fc_norm: float) -> tuple:
        return round(math.log(lr), 9), round(math.log(fc_norm), 9)

    def _read_log(self) -> dict:
        if self.log is None or not self.log.exists():
            return {}
        try:
            saved = json.loads(self.log.read_text())
            header = {k: saved[k] for k in self.header}
            trials = saved["trials"] + saved.get("earlier_trials", [])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.log} is not a tuning log of this version: {exc}") from None
        if json.loads(json.dumps(self.header)) != header:
            raise ValueError(f"{self.log} was written by another search ({header}); this one is {self.header}: "
                             "use another log path, or the same method, ranges and seed to resume")
        try:
            self.earlier = [{k: t[k] for k in ("lr", "fc_norm", "score", "phase")} for t in trials]
            for t in self.earlier:
                if not (isinstance(t["lr"], (int, float)) and isinstance(t["fc_norm"], (int, float))
                        and t["lr"] > 0 and t["fc_norm"] > 0
                        and (t["score"] is None or isinstance(t["score"], (int, float)))):
                    raise ValueError(f"bad trial {t}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.log} is not a tuning log of this version: {exc}") from None
        return {self.key(t["lr"], t["fc_norm"]): t["score"] for t in self.earlier}

    @property
    def left(self) -> int:
        return self.budget - len(self.trials)

    def has(self, lr: float, fc_norm: float) -> bool:
        return self.key(lr, fc_norm) in self.seen

    def __call__(self, lr: float, fc_norm: float, phase: str) -> Optional[float]:
        key = self.key(lr, fc_norm)
        if key in self.seen:
            return self.seen[key].score
        if self.left <= 0:
            raise RuntimeError("the tuning budget is spent")  # the searches check `left` first: a bug if seen
        if key in self.logged:
            score, resumed = self.logged[key], True
        else:
            value = float(self.objective(lr, fc_norm))
            score, resumed = (None if math.isnan(value) else value), False
        trial = Trial(len(self.trials), lr, fc_norm, score, phase, resumed)
        self.trials.append(trial)
        self.seen[key] = trial
        self._write_log()
        if self.on_trial is not None:
            self.on_trial(trial)
        return score

    def _write_log(self) -> None:
        if self.log is None:
            return
        trials = [{k: v for k, v in asdict(t).items() if k != "resumed"} for t in self.trials]
        unused = [t for t in self.earlier if self.key(t["lr"], t["fc_norm"]) not in self.seen]
        data = {**self.header, "trials": trials, "earlier_trials": unused}
        tmp = self.log.with_name(self.log.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.log)  # a run killed mid-write leaves the previous log whole

    def result(self, method: str) -> TuneResult:
        scored = [t for t in self.trials if t.score is not None]
        if not scored:
            raise RuntimeError(f"every one of the {len(self.trials)} trials returned NaN: no best point")
        best = max(scored, key=lambda t: t.score)  # the first of equal scores
        return TuneResult(best.lr, best.fc_norm, best.score, list(self.trials), method)


def _best_point(evaluate: _Evaluator, default: tuple[float, float]) -> tuple[float, float]:
    """(lr, fc_norm) of the best trial so far, or ``default`` while every
    trial has returned NaN."""
    scored = [t for t in evaluate.trials if t.score is not None]
    if not scored:
        return default
    best = max(scored, key=lambda t: t.score)
    return best.lr, best.fc_norm


def _rank(score: Optional[float]) -> float:
    return -math.inf if score is None else score


def _line_search(evaluate: _Evaluator, axis: str, fixed: float, lo: float, hi: float, new: int, phase: str,
                 jitter: float) -> None:
    """Spend at most ``new`` evaluations along one line: ``axis`` ("lr" or
    "fc_norm") over ``[lo, hi]``, the other hyperparameter at ``fixed``.
    Points of this line evaluated before are used as they are."""
    def point(u: float) -> tuple[float, float]:
        return (math.exp(u), fixed) if axis == "lr" else (fixed, math.exp(u))

    ulo, uhi = math.log(lo), math.log(hi)
    spacing = (uhi - ulo) / COARSE_POINTS
    other = "fc_norm" if axis == "lr" else "lr"
    known: dict[float, Optional[float]] = {  # log-position on the line -> score
        math.log(getattr(t, axis)): t.score for t in evaluate.trials
        if round(math.log(getattr(t, other)), 9) == round(math.log(fixed), 9)}
    stop = len(evaluate.trials) + new

    def spend(u: float) -> bool:
        if len(evaluate.trials) >= stop or evaluate.left <= 0:
            return False
        known[u] = evaluate(*point(u), phase)
        return True

    for i in range(COARSE_POINTS):
        u = ulo + (i + 0.5 + jitter) * spacing
        if not evaluate.has(*point(u)) and not spend(u):
            return
    # Halve around the best point until the evaluations are spent.
    for _ in range(60):  # each round halves a gap: 60 rounds reach float resolution
        if len(evaluate.trials) >= stop or evaluate.left <= 0:
            return
        order = sorted(known)
        best = max(order, key=lambda u: _rank(known[u]))
        i = order.index(best)
        # Toward the better neighbour; an end of the range ranks above any
        # neighbour: the best point is the last one on that side, so the
        # optimum may lie beyond it.
        sides = [(_rank(known[order[i - 1]]) if i > 0 else math.inf, order[i - 1] if i > 0 else ulo),
                 (_rank(known[order[i + 1]]) if i + 1 < len(order) else math.inf,
                  order[i + 1] if i + 1 < len(order) else uhi)]
        for _, edge in sorted(sides, key=lambda side: -side[0]):
            u = (best + edge) / 2
            if abs(u - best) > 1e-9 and not evaluate.has(*point(u)):
                spend(u)
                break
        else:
            return  # both gaps closed to nothing: this line is done


def tune(objective: Objective, *, lr: Range = (1e-3, 1.0), fc_norm: Range = (1.0, 100.0), budget: int = 8,
         seed: int = 0, log: Optional[Union[str, Path]] = None,
         on_trial: Optional[Callable[[Trial], None]] = None,
         objective_info: Optional[dict] = None) -> TuneResult:
    """FixNorm's sequential search (module docstring): classifier norm first
    at the middle learning rate, then the learning rate, then refinement."""
    lr, fc_norm, budget = _check_range("lr", lr), _check_range("fc_norm", fc_norm), _check_budget(budget)
    evaluate = _Evaluator(objective, budget, "sequential", {"lr": list(lr), "fc_norm": list(fc_norm)}, seed, log,
                          on_trial, objective_info)
    rng = random.Random(seed)
    # A seed moves the coarse grids by up to a quarter of their spacing: a
    # different, equally spread start for each seed (seed 0 included).
    jitters = [rng.uniform(-0.25, 0.25) for _ in range(2)]
    lr_mid = math.sqrt(lr[0] * lr[1])
    first = max(1, round(budget * 3 / 8))
    second = max(0, min(budget - first, round(budget * 3 / 8)))
    middle = (lr_mid, math.sqrt(fc_norm[0] * fc_norm[1]))
    _line_search(evaluate, "fc_norm", lr_mid, *fc_norm, first, "fc_norm", jitters[0])
    _line_search(evaluate, "lr", _best_point(evaluate, middle)[1], *lr, second, "lr", jitters[1])
    # Refinement: a step of half the coarse spacing on each side of the best
    # pair (the side where earlier trials scored better first), one direction
    # at a time; a step whose both sides are known is halved.
    ranges = {"fc_norm": fc_norm, "lr": lr}
    steps = {axis: (math.log(hi) - math.log(lo)) / COARSE_POINTS / 2 for axis, (lo, hi) in ranges.items()}
    axis = "fc_norm"
    for _ in range(4 * 60):  # every pass evaluates or halves a step: 60 halvings reach float resolution
        if evaluate.left <= 0:
            break
        best_lr, best_fc = _best_point(evaluate, middle)
        centre = math.log(best_lr if axis == "lr" else best_fc)
        lo, hi = map(math.log, ranges[axis])
        # The side where the trials so far scored better first.
        below = max((_rank(t.score) for t in evaluate.trials if math.log(getattr(t, axis)) < centre - 1e-9),
                    default=-math.inf)
        above = max((_rank(t.score) for t in evaluate.trials if math.log(getattr(t, axis)) > centre + 1e-9),
                    default=-math.inf)
        for sign in ((1, -1) if above >= below else (-1, 1)):
            u = min(max(centre + sign * steps[axis], lo), hi)
            pair = (math.exp(u), best_fc) if axis == "lr" else (best_lr, math.exp(u))
            if abs(u - centre) > 1e-9 and not evaluate.has(*pair):
                evaluate(*pair, "refine")
                break
        else:
            steps[axis] /= 2
        axis = "lr" if axis == "fc_norm" else "fc_norm"
    return evaluate.result("sequential")


def random_search(objective: Objective, *, lr: Range = (1e-3, 1.0), fc_norm: Range = (1.0, 100.0),
                  budget: int = 8, seed: int = 0, log: Optional[Union[str, Path]] = None,
                  on_trial: Optional[Callable[[Trial], None]] = None,
         objective_info: Optional[dict] = None) -> TuneResult:
    """``budget`` points drawn log-uniformly over both ranges (a baseline)."""
    lr, fc_norm, budget = _check_range("lr", lr), _check_range("fc_norm", fc_norm), _check_budget(budget)
    evaluate = _Evaluator(objective, budget, "random", {"lr": list(lr), "fc_norm": list(fc_norm)}, seed, log,
                          on_trial, objective_info)
    rng = random.Random(seed)
    while evaluate.left > 0:
        point = (math.exp(rng.uniform(*map(math.log, lr))), math.exp(rng.uniform(*map(math.log, fc_norm))))
        if not evaluate.has(*point):
            evaluate(*point, "random")
    return evaluate.result("random")


def tpe_search(objective: Objective, *, lr: Range = (1e-3, 1.0), fc_norm: Range = (1.0, 100.0), budget: int = 8,
               seed: int = 0, log: Optional[Union[str, Path]] = None,
               on_trial: Optional[Callable[[Trial], None]] = None,
         objective_info: Optional[dict] = None) -> TuneResult:
    """Optuna's TPE sampler over both ranges in log space (a baseline; needs
    ``pip install optuna``)."""
    try:
        import optuna
    except ImportError:
        raise ImportError("tpe_search needs optuna (pip install optuna); tune and random_search do not") from None
    lr, fc_norm, budget = _check_range("lr", lr), _check_range("fc_norm", fc_norm), _check_budget(budget)
    evaluate = _Evaluator(objective, budget, "tpe", {"lr": list(lr), "fc_norm": list(fc_norm)}, seed, log,
                          on_trial, objective_info)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    asked = 0
    while evaluate.left > 0 and asked < 20 * budget:  # TPE may propose a point twice: ask again
        asked += 1
        trial = study.ask()
        point = (trial.suggest_float("lr", *lr, log=True), trial.suggest_float("fc_norm", *fc_norm, log=True))
        repeat = evaluate.has(*point)
        score = evaluate(*point, "tpe")
        if repeat:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif score is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, score)
    return evaluate.result("tpe")


METHODS = {"sequential": tune, "random": random_search, "tpe": tpe_search}
