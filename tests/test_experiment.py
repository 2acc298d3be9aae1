"""python -m fixnorm_ext experiment: the report, its JSON and its plots, on a
tiny real run (--quick) and, for the table logic, on a known objective."""
import json
import math

import pytest

from fixnorm_ext import experiment
from fixnorm_ext.__main__ import main as cli_main


def test_quick_run_writes_the_report(tmp_path):
    assert cli_main(["experiment", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "experiment.md").read_text()
    data = json.loads((tmp_path / "experiment.json").read_text())
    for png in ("grid.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert "python -m fixnorm_ext experiment --quick" in report
    assert set(data["weight_decay"]["summary"]) == {"fixnorm", "sgd_wd"}
    assert len(data["searches"]["scores"]) == 2 and len(data["searches"]["scores"][0]) == 2
    assert set(data["searches"]["methods"]) == {"sequential", "random", "tpe"}
    curves = data["curves"]["fixnorm"]
    assert curves and all(len(c["angle"]) == len(c["effective_lr"]) > 0 for c in curves.values())


def test_trials_needed_counts_the_first_trial_within_half_a_point(monkeypatch):
    """On a known objective (validation accuracy = 99 - distance from a peak
    in log space), the grid's best and the trials each search needs follow
    from the trial lists."""
    def fake_score(self, kind, lr, second, seed, split="val"):
        self.runs += 1
        return 99.0 - 2.0 * (abs(math.log(lr / 0.1)) + abs(math.log(second / 5.0)))

    monkeypatch.setattr(experiment.Trainer, "__init__", lambda self, example, epochs, backend: setattr(self, "runs", 0))
    monkeypatch.setattr(experiment.Trainer, "score", fake_score)
    trainer = experiment.Trainer(None, 1, "auto")
    result = experiment.compare_searches(trainer, budget=6, seeds=2, grid=3)
    lrs, fcs = result["lr"], result["fc_norm"]
    assert lrs[0] == pytest.approx(experiment.LR[0]) and lrs[-1] == pytest.approx(experiment.LR[1])
    assert result["grid_best"] == max(max(row) for row in result["scores"])
    for name, m in result["methods"].items():
        for seed, needed in enumerate(m["trials_needed"]):
            trials = experiment.tuning.METHODS[name](trainer.objective("fixnorm", 0), lr=experiment.LR,
                                                     fc_norm=experiment.FC_NORM, budget=6, seed=seed).trials
            running = [max(t.score for t in trials[:k + 1]) for k in range(len(trials))]
            first = next((k + 1 for k, s in enumerate(running) if s >= result["grid_best"] - 0.5), None)
            assert needed == first, (name, seed)
