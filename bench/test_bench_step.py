"""pytest-benchmark timings of one optimizer step on ResNet-50's parameters.

The same contestants as ``python -m fixnorm_ext bench`` (see fixnorm_ext/bench.py),
on float32 parameters and one real gradient of ResNet-50 (161 tensors, 25.6 M
elements). pytest-benchmark runs the contestants one after another rather than
interleaved, so on a noisy machine prefer the CLI's round-robin numbers.

Run on demand, not with the tests:

    python -m pytest bench --benchmark-only
"""
import pytest
import torch

from fixnorm_ext import bench

MODEL = "resnet50"


@pytest.fixture(scope="module")
def resnet50():
    return bench.build_param_set(MODEL, torch.float32)


def _cases():
    for contestant, reason in bench.candidate_contestants():
        marks = [pytest.mark.skip(reason=f"{contestant.name}: {reason}")] if reason else []
        yield pytest.param(contestant, id=contestant.name, marks=marks)


@pytest.mark.parametrize("contestant", _cases())
def test_step(benchmark, resnet50, contestant):
    step = contestant.make_step(resnet50)
    # The first step only creates the momentum buffers; time the steady state.
    for _ in range(bench.DEFAULT_WARMUP if contestant.warmup is None else contestant.warmup):
        step()
    benchmark.group = f"{MODEL} {resnet50.dtype} step"
    benchmark.extra_info.update(numel=resnet50.numel, n_tensors=resnet50.n_tensors,
                                floor_bytes=resnet50.floor_bytes)
    if contestant.reps is None:
        benchmark(step)
    else:
        benchmark.pedantic(step, rounds=contestant.reps, iterations=1)
