"""``python -m fixnorm_ext tune``: tune ``lr`` and ``fc_norm`` of FusedFixNorm
on a real-data example with the few-trial search of fixnorm_ext.tuning.

    python -m fixnorm_ext tune --example digits --budget 8
    python -m fixnorm_ext tune --example digits --budget 8 --log trials.json   # resumable
    python -m fixnorm_ext tune --example digits --method random --budget 8
    python -m fixnorm_ext tune --example fashion --budget 8                    # Fashion-MNIST, read from disk

Each trial trains the example's model from the same initial weights with
FusedFixNorm (no weight decay) and scores it on a validation split held out
from the training set; one line per trial, then the result.
"""
from __future__ import annotations

import argparse
import math
import time

from fixnorm_ext import tuning
from fixnorm_ext.training import EXAMPLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--example", choices=EXAMPLES, default="digits", help="the problem to tune on")
    parser.add_argument("--budget", type=int, default=8, help="objective calls (trainings), at most")
    parser.add_argument("--method", choices=sorted(tuning.METHODS), default="sequential",
                        help="sequential (FixNorm's search), or the baselines random and tpe (needs optuna)")
    parser.add_argument("--lr", type=float, nargs=2, default=(0.01, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--fc-norm", type=float, nargs=2, default=(1.0, 30.0), metavar=("LO", "HI"))
    parser.add_argument("--seed", type=int, default=0, help="of the search and of every training")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs per trial (default: the example's, 10 digits, 5 fashion)")
    parser.add_argument("--backend", default="auto", help="FusedFixNorm backend")
    parser.add_argument("--log", default=None, help="JSON trial log; an existing one is resumed")


def main(args: argparse.Namespace) -> int:
    from fixnorm_ext import available_backends, training

    example = training.load_example(args.example)
    if args.epochs is None:
        args.epochs = example.EPOCHS
    if args.epochs < 1:
        raise SystemExit("tune: --epochs must be >= 1")
    backends = available_backends("cpu")
    if args.backend != "auto" and backends.get(args.backend, "unknown backend") is not None:
        raise SystemExit(f"tune: backend {args.backend!r} cannot run here: {backends.get(args.backend, 'unknown')}")
    try:
        objective = example.objective(epochs=args.epochs, seed=args.seed, backend=args.backend)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"tune: {exc}") from None
    start = last = time.perf_counter()
    best = [-math.inf]

    def progress(trial: tuning.Trial) -> None:
        nonlocal last
        now = time.perf_counter()
        score = "NaN (diverged)" if trial.score is None else f"{trial.score:.2f}"
        if trial.score is not None:
            best[0] = max(best[0], trial.score)
        note = " (from the log)" if trial.resumed else f" {now - last:.1f} s"
        print(f"trial {trial.index + 1}/{args.budget} [{trial.phase}] lr={trial.lr:.4g} fc_norm={trial.fc_norm:.4g}"
              f" -> {score}  best {best[0]:.2f}{note}", flush=True)
        last = now

    try:
        result = tuning.METHODS[args.method](objective, lr=tuple(args.lr), fc_norm=tuple(args.fc_norm),
                                             budget=args.budget, seed=args.seed, log=args.log,
                                             on_trial=progress, objective_info={
                                                 "example": args.example, "epochs": args.epochs,
                                                 "backend": args.backend})
    except (ValueError, TypeError, ImportError) as exc:
        raise SystemExit(f"tune: {exc}") from None
    print(f"{result}  [{time.perf_counter() - start:.1f} s; validation accuracy, %]")
    return 0
