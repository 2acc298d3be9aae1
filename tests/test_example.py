"""End-to-end check of examples/train_digits.py: a short real training run.

Two epochs on the 8x8 digits already reach well above chance with both
optimizers; an optimizer that never moves the weights stays near 10%.
"""
import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"

# The classifier bound is set low on purpose: Linear(64, 10) starts near norm 1.8
# and plain SGD grows it past FC_NORM within two epochs, so the "max" clamp is
# active and the norm check below is not vacuous.
FC_NORM = 2.0
MIN_ACC = 0.9
ARGS = ["--epochs", "2", "--no-progress", "--fc-norm", str(FC_NORM)]


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def results(example):
    return example.main(ARGS)


def check_fixnorm_run(fixnorm):
    assert fixnorm["test_acc"] > MIN_ACC
    # The clamp holds, and it binds: the norm sits at the bound, not below it.
    assert fixnorm["fc_norm"] <= FC_NORM * (1 + 1e-5)
    assert fixnorm["fc_norm"] == pytest.approx(FC_NORM, rel=1e-5)
    # Each fixed conv weight ends at the norm it started with, up to float32 rounding.
    assert fixnorm["fixed_norm_max_rel_change"] <= 1e-5
    assert fixnorm["fixed_norm_mean"] == pytest.approx(fixnorm["fixed_norm_init"], rel=1e-5)


def test_both_optimizers_learn(results):
    assert results["sgd_wd"]["test_acc"] > MIN_ACC
    check_fixnorm_run(results["fixnorm"])


def test_baseline_norms_drift(results):
    # Without norm control the same layers change norm and the classifier grows
    # past the bound; this is what makes the FixNorm checks above meaningful.
    sgd = results["sgd_wd"]
    assert sgd["fc_norm"] > FC_NORM * 1.05
    assert sgd["fixed_norm_max_rel_change"] > 1e-3


def test_runs_share_initialisation(results):
    assert results["fixnorm"]["fixed_norm_init"] == results["sgd_wd"]["fixed_norm_init"]


def test_foreach_backend(example):
    results = example.main(ARGS + ["--backend", "foreach"])
    assert results["backend"] == "foreach"
    check_fixnorm_run(results["fixnorm"])
