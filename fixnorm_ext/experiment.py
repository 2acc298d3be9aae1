"""``python -m fixnorm_ext experiment``: FixNorm against weight decay, and the
few-trial tuner against random search and TPE, on real data: the digits of
fixnorm_ext.digits (the default, written to ``docs/``) or Fashion-MNIST of
fixnorm_ext.fashion (``--dataset fashion``, written to ``docs/fashion/``), as a
Markdown report, a JSON file of every number and two PNG plots.

(a) FixNorm (``lr``, ``fc_norm``) against SGD with weight decay (``lr``,
    ``weight_decay``), each tuned by the same sequential search with the same
    budget on the validation split, then trained with its best pair and
    scored on the test split; several seeds (the seed of the search and of the
    training), mean and spread.
(b) An exhaustive grid over (lr, fc_norm) gives the best validation score
    reachable; each search method, over several seeds, is run on the same
    objective, and the table gives the number of trials it needed to come
    within 0.5 points of the grid's best.
(c) Plots: validation accuracy over the grid; per-layer effective learning
    rate ``lr / ||w||^2`` and the angle each conv layer turned per step over
    training, FixNorm against weight decay (same schedule, same start).

Every training here is the example's net trained with a per-step cosine
schedule (10 epochs for the digits, 5 for Fashion-MNIST, by default); a cache
keeps each (method, lr, second hyperparameter, seed) result, so the grid and
the searches share trainings. ``--quick`` shrinks everything to check the
command in seconds (on the digits).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import time
from pathlib import Path

import torch

from fixnorm_ext import training, tuning
from fixnorm_ext.diagnostics import angles, layer_stats

LR = (0.01, 1.0)
FC_NORM = (1.0, 30.0)
WEIGHT_DECAY = (1e-5, 1e-2)
WITHIN = 0.5  # points of accuracy, for (b)
OUT = {"digits": "docs", "fashion": "docs/fashion"}
# The settings of (a) and (b); --epochs defaults to the example's EPOCHS.
SETTINGS = {"budget": 8, "seeds": 3, "search_budget": 10, "search_seeds": 3, "grid": 5}
QUICK = {"epochs": 1, "budget": 3, "seeds": 1, "search_budget": 3, "search_seeds": 1, "grid": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=training.EXAMPLES, default="digits",
                        help="the example's data and net (fixnorm_ext.digits or fixnorm_ext.fashion)")
    parser.add_argument("--out", default=None, help="folder for experiment.md, experiment.json and the plots "
                        "(default: " + ", ".join(f"{v} for {k}" for k, v in OUT.items()) + ")")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of every run (default: the example's, 10 digits, 5 fashion)")
    parser.add_argument("--budget", type=int, default=SETTINGS["budget"], help="trials per search in (a)")
    parser.add_argument("--seeds", type=int, default=SETTINGS["seeds"], help="seeds in (a)")
    parser.add_argument("--search-budget", type=int, default=SETTINGS["search_budget"],
                        help="trials per search in (b)")
    parser.add_argument("--search-seeds", type=int, default=SETTINGS["search_seeds"], help="seeds per method in (b)")
    parser.add_argument("--grid", type=int, default=SETTINGS["grid"], help="points per axis of the grid in (b)")
    parser.add_argument("--backend", default="auto", help="FusedFixNorm backend")
    parser.add_argument("--quick", action="store_true", help="a tiny run (1 epoch, 2x2 grid, budget 3, 1 seed)")


class Trainer:
    """Trains the example's net; results cached by (kind, lr, second, seed, split)."""

    def __init__(self, example, epochs: int, backend: str):
        self.example, self.epochs, self.backend = example, epochs, backend
        self.train, self.val, self.test = example.load_data(validation=True)
        self.cache: dict = {}
        self.runs = 0

    def optimizer(self, kind: str, model, lr: float, second: float):
        if kind == "fixnorm":
            return training.fixnorm_optimizer(model, lr, second, backend=self.backend)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=second)

    def score(self, kind: str, lr: float, second: float, seed: int, split: str = "val") -> float:
        key = (kind, round(math.log(lr), 9), round(math.log(second), 9), seed, split)
        if key not in self.cache:
            self.cache[key] = self.example.fit_and_score(lambda model: self.optimizer(kind, model, lr, second),
                                                         self.train, self.val if split == "val" else self.test,
                                                         epochs=self.epochs, seed=seed)
            self.runs += 1
        return self.cache[key]

    def objective(self, kind: str, seed: int):
        return lambda lr, second: self.score(kind, lr, second, seed)


def compare_to_weight_decay(trainer: Trainer, budget: int, seeds: int) -> dict:
    rows = []
    for seed in range(seeds):
        for kind, second in (("fixnorm", FC_NORM), ("sgd_wd", WEIGHT_DECAY)):
            best = tuning.tune(trainer.objective(kind, seed), lr=LR, fc_norm=second, budget=budget, seed=seed)
            test = trainer.score(kind, best.best_lr, best.best_fc_norm, seed, split="test")
            rows.append({"seed": seed, "kind": kind, "lr": best.best_lr, "second": best.best_fc_norm,
                         "val": best.best_score, "test": test})
    summary = {}
    for kind in ("fixnorm", "sgd_wd"):
        tests = [r["test"] for r in rows if r["kind"] == kind]
        summary[kind] = {"mean": statistics.mean(tests), "stdev": statistics.stdev(tests) if len(tests) > 1 else 0.0}
    return {"rows": rows, "summary": summary, "budget": budget}


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    if n == 1:
        return [math.sqrt(lo * hi)]
    return [math.exp(math.log(lo) + k * (math.log(hi) - math.log(lo)) / (n - 1)) for k in range(n)]


def compare_searches(trainer: Trainer, budget: int, seeds: int, grid: int) -> dict:
    lrs, fcs = log_grid(*LR, grid), log_grid(*FC_NORM, grid)
    objective = trainer.objective("fixnorm", 0)
    scores = [[objective(lr, fc) for fc in fcs] for lr in lrs]
    grid_best = max(s for row in scores for s in row if not math.isnan(s))
    methods = {}
    for name, search in tuning.METHODS.items():
        if name == "tpe" and importlib.util.find_spec("optuna") is None:
            methods[name] = {"skipped": "optuna is not installed"}
            continue
        needed = []
        for seed in range(seeds):
            result = search(objective, lr=LR, fc_norm=FC_NORM, budget=budget, seed=seed)
            best, reached = -math.inf, None
            for t in result.trials:
                best = max(best, -math.inf if t.score is None else t.score)
                if reached is None and best >= grid_best - WITHIN:
                    reached = t.index + 1
            needed.append(reached)
        methods[name] = {"trials_needed": needed,
                         "reached": sum(n is not None for n in needed),
                         "mean_when_reached": statistics.mean([n for n in needed if n is not None])
                         if any(n is not None for n in needed) else None}
    return {"lr": lrs, "fc_norm": fcs, "scores": scores, "grid_best": grid_best, "budget": budget,
            "seeds": seeds, "methods": methods}


def training_curves(trainer: Trainer, fc_norm: float, weight_decay: float, lr: float) -> dict:
    """Per conv layer, effective lr and the angle turned per step, for FixNorm
    and for SGD + weight decay from the same start on the same schedule."""
    curves = {}
    for kind, second in (("fixnorm", fc_norm), ("sgd_wd", weight_decay)):
        torch.manual_seed(0)
        model = trainer.example.build_model()
        opt = trainer.optimizer(kind, model, lr, second)
        convs = [(name, p) for name, p in model.named_parameters() if p.dim() == 4]
        previous = [p.detach().clone() for _, p in convs]
        record = {name: {"effective_lr": [], "angle": []} for name, _ in convs}

        def on_step(step, opt=opt, convs=convs, previous=previous, record=record):
            now = [p.detach() for _, p in convs]
            lr_now = opt.param_groups[0]["lr"]
            for (name, _), angle, w in zip(convs, angles(previous, now), now):
                record[name]["angle"].append(angle.item())
                record[name]["effective_lr"].append(lr_now / w.double().norm().item() ** 2)
            previous[:] = [w.clone() for w in now]

        training.train(model, opt, trainer.train, epochs=trainer.epochs, seed=0, on_step=on_step)
        curves[kind] = record
        if kind == "fixnorm":
            curves["fixnorm_final_layers"] = [vars(r) for r in layer_stats(opt, model)]
    return curves


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = results["searches"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    image = ax.imshow(grid["scores"], origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid["fc_norm"])), [f"{v:.3g}" for v in grid["fc_norm"]])
    ax.set_yticks(range(len(grid["lr"])), [f"{v:.3g}" for v in grid["lr"]])
    ax.set_xlabel("fc_norm")
    ax.set_ylabel("lr")
    ax.set_title(f"FixNorm on {results['title']}: validation accuracy (%)")
    for i, row in enumerate(grid["scores"]):
        for j, v in enumerate(row):
            ax.text(j, i, "nan" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    grid_png = out / "grid.png"
    fig.savefig(grid_png, dpi=120)
    plt.close(fig)

    curves = results["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("fixnorm", "-"), ("sgd_wd", "--")):
        for k, (name, rec) in enumerate(curves[kind].items()):
            label = f"{'FixNorm' if kind == 'fixnorm' else 'SGD + wd'} {name}"
            axes[0].plot(rec["effective_lr"], style, color=f"C{k}", label=label)
            axes[1].plot(rec["angle"], style, color=f"C{k}", label=label, linewidth=0.8)
    axes[0].set_title("effective learning rate lr / ||w||^2")
    axes[1].set_title("angle turned per step (rad)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    curves_png = out / "training.png"
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)
    return [grid_png, curves_png]


def report(results: dict) -> str:
    a, b = results["weight_decay"], results["searches"]
    lines = [
        f"# FixNorm on {results['title']}: the experiment", "",
        f"Made by `{results['command']}` ({results['seconds']:.0f} s, {results['trainings']} trainings of "
        f"{results['epochs']} epochs, {results['date']}). Numbers: accuracy in % ({results['split']}).", "",
        "Settings: " + ", ".join(f"`--{name.replace('_', '-')} {value}`"
                                 for name, value in results["settings"].items()) + ".", "",
        f"## (a) FixNorm against weight decay, each tuned with {a['budget']} trials", "",
        "| seed | FixNorm: lr, fc_norm | val | test | SGD + wd: lr, weight_decay | val | test |",
        "|---|---|---|---|---|---|---|"]
    for seed in sorted({r["seed"] for r in a["rows"]}):
        f = next(r for r in a["rows"] if r["seed"] == seed and r["kind"] == "fixnorm")
        s = next(r for r in a["rows"] if r["seed"] == seed and r["kind"] == "sgd_wd")
        lines.append(f"| {seed} | {f['lr']:.3g}, {f['second']:.3g} | {f['val']:.2f} | {f['test']:.2f} | "
                     f"{s['lr']:.3g}, {s['second']:.3g} | {s['val']:.2f} | {s['test']:.2f} |")
    fs, ss = a["summary"]["fixnorm"], a["summary"]["sgd_wd"]
    lines += ["", f"Test accuracy, mean ± standard deviation over seeds: FixNorm {fs['mean']:.2f} ± {fs['stdev']:.2f}, "
              f"SGD + weight decay {ss['mean']:.2f} ± {ss['stdev']:.2f}.", "",
              f"## (b) Trials to come within {WITHIN} points of the grid's best", "",
              f"Grid: {len(b['lr'])} × {len(b['fc_norm'])} (lr × fc_norm, log-spaced), best validation accuracy "
              f"{b['grid_best']:.2f}. Each method gets {b['budget']} trials, {b['seeds']} seeds (the search's "
              "seed; the training seed is 0 throughout, so every method sees the same objective).", "",
              "| method | trials needed, per seed (- = not within the budget) | reached | mean when reached |",
              "|---|---|---|---|"]
    for name, m in b["methods"].items():
        if "skipped" in m:
            lines.append(f"| {name} | skipped: {m['skipped']} | | |")
            continue
        needed = ", ".join("-" if n is None else str(n) for n in m["trials_needed"])
        mean = "-" if m["mean_when_reached"] is None else f"{m['mean_when_reached']:.1f}"
        lines.append(f"| {name} | {needed} | {m['reached']}/{len(m['trials_needed'])} | {mean} |")
    lines += ["", "## (c) Plots", "", "![validation accuracy over the grid](grid.png)", "",
              "![effective learning rate and angular update per conv layer](training.png)", "",
              "Left of the second plot: with FixNorm every conv layer's effective learning rate follows the "
              "schedule exactly (its norm is fixed); with weight decay it also moves with the norm. Right: the "
              "angle each conv layer turned per step.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    example = training.load_example(args.dataset)
    defaults = {"epochs": example.EPOCHS, **SETTINGS}
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    elif args.epochs is None:
        args.epochs = example.EPOCHS
    settings = {name: getattr(args, name) for name in defaults}
    for name, value in settings.items():
        if value < 1:
            raise SystemExit(f"experiment: --{name.replace('_', '-')} must be >= 1")
    out = Path(args.out or OUT[args.dataset])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        trainer = Trainer(example, args.epochs, args.backend)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"experiment: {exc}") from None
    print(f"(a) FixNorm vs weight decay: {args.seeds} seeds x 2 searches of {args.budget} trials", flush=True)
    weight_decay = compare_to_weight_decay(trainer, args.budget, args.seeds)
    print(f"(b) searches vs a {args.grid}x{args.grid} grid ({trainer.runs} trainings so far, "
          f"{time.perf_counter() - start:.0f} s)", flush=True)
    searches = compare_searches(trainer, args.search_budget, args.search_seeds, args.grid)
    print(f"(c) training curves ({trainer.runs} trainings so far, {time.perf_counter() - start:.0f} s)", flush=True)
    best = max(weight_decay["rows"], key=lambda r: (r["kind"] == "fixnorm", r["val"]))
    best_wd = max((r for r in weight_decay["rows"] if r["kind"] == "sgd_wd"), key=lambda r: r["val"])
    curves = training_curves(trainer, best["second"], best_wd["second"], best["lr"])
    # The command that makes this report again (--out aside).
    command = "python -m fixnorm_ext experiment" + ("" if args.dataset == "digits" else f" --dataset {args.dataset}")
    if args.quick:
        command += " --quick"
    else:
        command += "".join(f" --{name.replace('_', '-')} {value}" for name, value in settings.items()
                           if value != defaults[name])
    if args.backend != "auto":
        command += f" --backend {args.backend}"
    results = {"command": command, "dataset": args.dataset, "title": example.TITLE, "split": example.SPLIT,
               "settings": settings, "epochs": args.epochs, "date": time.strftime("%Y-%m-%d"),
               "weight_decay": weight_decay, "searches": searches, "curves": curves,
               "trainings": trainer.runs, "seconds": time.perf_counter() - start}
    pngs = plot(results, out)
    (out / "experiment.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "experiment.md").write_text(report(results))
    print(f"wrote {out / 'experiment.md'}, {out / 'experiment.json'}, " + ", ".join(map(str, pngs)))
    return 0
