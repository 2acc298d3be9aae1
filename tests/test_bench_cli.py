"""The benchmark's device handling, synthetic set and bandwidth arithmetic.

Everything here runs on CPU except the CUDA timer test, which skips without a
GPU. Timings are not checked, only what is done with them.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from fixnorm_ext import FusedFixNorm, bench
from fixnorm_ext.__main__ import main as cli

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------ device refusal

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda would run")
def test_cli_refuses_cuda_without_gpu_in_one_line():
    done = subprocess.run([sys.executable, "-m", "fixnorm_ext", "bench", "--device", "cuda", "--no-save"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("bench: --device cuda needs a CUDA GPU")
    assert done.stdout == ""


def test_main_refuses_cuda_before_doing_anything(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def must_not_build(*args, **kwargs):
        raise AssertionError("a parameter set was built although the run was refused")

    monkeypatch.setattr(bench, "build_param_set", must_not_build)
    monkeypatch.setattr(bench, "build_synthetic_set", must_not_build)
    assert cli(["bench", "--device", "cuda", "--models", "resnet50,synthetic1b", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.cuda.is_available() is False" in err


def test_cpu_refuses_full_synthetic_set(monkeypatch, capsys):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the full synthetic set was built on CPU")

    monkeypatch.setattr(bench, "build_synthetic_set", must_not_build)
    assert cli(["bench", "--models", "synthetic1b", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too big for a CPU run" in err and "--synthetic-params" in err
    limit = str(bench.CPU_SYNTHETIC_MAX + 1)
    assert cli(["bench", "--models", "synthetic1b", "--synthetic-params", limit, "--no-save"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--models", "synthetic1b", "--synthetic-params", "63"], "at least 64"),
    (["--models", "not_a_model_at_all"], "unknown torchvision model"),
    (["--backends", "cuda"], "unknown backend(s) ['cuda'] for --device cpu"),
    (["--reps", "0"], "--reps must be at least 1"),
])
def test_cli_refuses_bad_arguments(capsys, argv, message):
    assert cli(["bench", *argv, "--no-save"]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------ synthetic set

def test_synthetic_full_size():
    shapes = bench.synthetic_shapes()
    assert shapes == [(4096, 3840)] * 64
    assert sum(r * c for r, c in shapes) == bench.SYNTHETIC_NUMEL == 1_006_632_960


@pytest.mark.parametrize("numel", [64, 1000, 64 * 3840 - 1, 64 * 3840, 10**6, 49_999_999, 10**12])
def test_synthetic_shapes_shrink_to_at_most_numel(numel):
    shapes = bench.synthetic_shapes(numel)
    assert len(shapes) == 64 and all(r >= 1 and 1 <= c <= 3840 for r, c in shapes)
    total = sum(r * c for r, c in shapes)
    wanted = min(numel, bench.SYNTHETIC_NUMEL)
    # Rounding loses less than one row per matrix and the remainder of numel / 64.
    assert wanted - 64 * shapes[0][1] - 64 < total <= wanted


def test_synthetic_shapes_refuse_fewer_elements_than_matrices():
    with pytest.raises(ValueError, match="at least 64"):
        bench.synthetic_shapes(63)


@pytest.mark.parametrize("dtype, bytes_per_element", [(torch.float32, 20), (torch.bfloat16, 10)])
def test_synthetic_set_layout(dtype, bytes_per_element):
    pset = bench.build_synthetic_set(dtype, numel=64 * 3840 * 2, fc_norm=3.0)
    assert pset.model == "synthetic1b" and pset.n_tensors == 64 and pset.numel == 64 * 2 * 3840
    assert all(p.shape == (2, 3840) and p.dtype == dtype for p in pset.params)
    assert all(g.shape == p.shape and g.dtype == dtype for p, g in zip(pset.params, pset.grads))
    fixed, classifier = pset.groups
    assert (fixed["norm"], fixed["target_norm"]) == ("fixed", None)
    assert (classifier["norm"], classifier["target_norm"]) == ("max", 3.0)
    assert sorted(fixed["params"] + classifier["params"]) == list(range(64))
    assert classifier["params"] == [63]
    # DESIGN section 5: 20 bytes per float32 element with momentum, 10 per bfloat16 one.
    assert pset.floor_bytes == bytes_per_element * pset.numel
    again = bench.build_synthetic_set(dtype, numel=64 * 3840 * 2, fc_norm=3.0)
    assert all(torch.equal(a, b) for a, b in zip(pset.params + pset.grads, again.params + again.grads))


def test_synthetic_set_is_a_fixnorm_problem():
    """Its groups drive FusedFixNorm: fixed norms stay, the classifier is clamped."""
    pset = bench.build_synthetic_set(torch.float64, numel=64 * 50, fc_norm=0.5)
    params = pset.copy()
    before = [p.detach().norm().item() for p in params]
    assert before[63] > 0.5  # the clamp has work to do
    opt = FusedFixNorm(pset.groups_for(params), lr=bench.LR, momentum=bench.MOMENTUM, backend="foreach")
    opt.step()
    after = [p.detach().norm().item() for p in params]
    assert after[:63] == pytest.approx(before[:63], rel=1e-12)
    assert after[63] == pytest.approx(0.5, rel=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(params, pset.params))


# ---------------------------------------------------------- GB/s arithmetic

def test_gbps_units():
    assert bench.gbps(2 * 10**9, 1000.0) == pytest.approx(2.0)
    assert bench.gbps(5 * 10**6, 1.0) == pytest.approx(5.0)


def test_measure_copy_bandwidth_counts_read_and_write():
    calls = []

    def fixed_timer(fn):
        fn()
        calls.append(1)
        return 0.25

    copy = bench.measure_copy_bandwidth("cpu", 4000, reps=3, warmup=2, timer=fixed_timer)
    assert len(calls) == 5 and copy.samples_ms == [0.25] * 3
    assert copy.nbytes == 4000
    assert copy.gbps == pytest.approx(2 * 4000 / 0.25e-3 / 1e9)


@pytest.mark.parametrize("dtype, bytes_per_element", [(torch.float32, 20), (torch.bfloat16, 10)])
def test_rows_report_bandwidth_and_copy_fraction(dtype, bytes_per_element):
    pset = bench.build_synthetic_set(dtype, numel=64 * 100)
    n = pset.numel
    contestants = {c.name: c for c, _ in bench.candidate_contestants()}
    results = [bench.Result(contestants["sgd_fused"], [3.0, 1.0, 2.0], 1),
               bench.Result(contestants["copy"], [0.5], 1)]
    copy = bench.CopyBandwidth("cpu", 10**6, [0.1])  # 2e6 bytes in 0.1 ms: 20 GB/s
    by_name = {r["contestant"]: r for r in bench.rows(pset, results, {"device": "cpu"}, "today", copy)}

    fused = by_name["sgd_fused"]
    assert fused["bytes_per_step"] == bytes_per_element * n
    expected = bytes_per_element * n / 2.0e-3 / 1e9  # median of 1, 2, 3 ms
    assert fused["gbps"] == pytest.approx(expected, abs=1e-3)
    assert fused["copy_gbps"] == pytest.approx(20.0)
    assert fused["copy_fraction"] == pytest.approx(expected / 20.0, abs=1e-4)
    assert fused["ratio_to_sgd_fused"] == 1.0

    flat_copy = by_name["copy"]
    assert flat_copy["bytes_per_step"] == 2 * (bytes_per_element // 5) * n
    assert flat_copy["ratio_to_sgd_fused"] == pytest.approx(0.25)

    without = bench.rows(pset, results, {}, "today", None)
    assert all(r["copy_gbps"] is None and r["copy_fraction"] is None for r in without)


def test_table_shows_copy_fraction():
    pset = bench.build_synthetic_set(torch.float32, numel=64 * 100)
    contestants = {c.name: c for c, _ in bench.candidate_contestants()}
    # 20 B * 6400 elements in 0.0128 ms: 10 GB/s, half of a 20 GB/s copy.
    result = bench.Result(contestants["sgd_fused"], [0.0128], 1)
    table = bench.format_table(pset, [result], {}, 1, bench.CopyBandwidth("cpu", 10**6, [0.1]))
    fields = table.splitlines()[-1].split()
    assert fields[0] == "sgd_fused" and fields[5:7] == ["10.0", "50"]


# ------------------------------------------------------------- contestants

def test_cuda_contestants_are_known_without_a_gpu():
    chosen, skipped = bench.select_contestants(None, reference_reps=0, device="cuda")
    names = [c.name for c in chosen] + list(skipped)
    for name in ("copy", "sgd_fused", "sgd_foreach", "composition", "fixnorm_foreach", "fixnorm_cuda"):
        assert name in names
    assert "fixnorm_cpu" not in names
    assert "--reference-reps 0, the default on cuda" in skipped["fixnorm_reference"]
    if "fixnorm_cuda" in skipped:
        assert skipped["fixnorm_cuda"]  # a reason, never a silent omission


def test_cuda_backends_refuse_cpu_backend():
    with pytest.raises(ValueError, match="for --device cuda"):
        bench.select_contestants(["cpu"], device="cuda")


def test_small_cpu_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert cli(["bench", "--models", "synthetic1b", "--synthetic-params", str(64 * 200), "--reps", "2",
                "--warmup", "1", "--copy-mb", "1", "--backends", "foreach", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth:" in printed and "synthetic1b | float32 | 12,800 elements in 64 tensors" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["contestant"] for r in rows] == ["copy", "sgd_fused", "sgd_foreach", "composition",
                                               "fixnorm_foreach"]
    for r in rows:
        assert r["device"] == "cpu" and r["model"] == "synthetic1b" and r["numel"] == 12_800
        assert r["copy_bytes"] == 10**6 and r["copy_gbps"] > 0 and r["reps"] == 2
        # From the rounded median: unlike the rounded gbps, it keeps four digits.
        achieved = r["bytes_per_step"] / r["median_ms"] / 1e6
        assert math.isclose(r["copy_fraction"], achieved / r["copy_gbps"], rel_tol=1e-2, abs_tol=1e-4)
        assert isinstance(r["fixnorm_env"], dict)


# -------------------------------------------------------------------- GPU

@needs_cuda
def test_cuda_timer_waits_for_the_gpu():
    timer = bench.CudaTimer()
    cycles = 50_000_000  # tens of milliseconds on any current GPU
    slept = timer(lambda: torch.cuda._sleep(cycles))
    assert slept > 1.0
    assert timer(lambda: None) < slept


@needs_cuda
def test_cuda_run_times_on_the_gpu():
    pset = bench.build_synthetic_set(torch.bfloat16, numel=64 * 3840, device="cuda")
    assert all(p.is_cuda for p in pset.params)
    chosen, _ = bench.select_contestants(["foreach"], reference_reps=0, device="cuda")
    results = bench.time_contestants(pset, chosen, reps=3, warmup=1)
    assert [len(r.samples_ms) for r in results] == [3] * len(chosen)
    assert all(r.median_ms > 0 for r in results)


def test_a_failing_model_keeps_the_others_rows(tmp_path, monkeypatch, capsys):
    real = bench.build_synthetic_set
    calls = []

    def fail_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "build_synthetic_set", fail_first)
    out = tmp_path / "rows.jsonl"
    assert cli(["bench", "--models", "synthetic1b,synthetic1b", "--synthetic-params", "640", "--reps", "1",
                "--warmup", "0", "--copy-mb", "0", "--backends", "foreach", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "simulated out of memory" in err and "bench: failed: synthetic1b" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["copy_gbps"] is None for r in rows)


def _row(model, contestant, ms, dtype="float32", date="2026-12-03T00:00:00Z", copy_fraction=None):
    return {"date": date, "dtype": dtype, "model": model, "contestant": contestant, "median_ms": ms,
            "copy_fraction": copy_fraction, "fixnorm_env": {}}


def test_speed_report_measures_each_target():
    rows = [_row("resnet50", "sgd_fused", 1.0), _row("resnet50", "composition", 3.0),
            _row("resnet50", "fixnorm_cuda", 1.05), _row("resnet50", "fixnorm_triton", 1.4),
            _row(bench.SYNTHETIC, "sgd_fused", 5.0), _row(bench.SYNTHETIC, "fixnorm_cuda", 5.2, copy_fraction=0.75)]
    lines = bench.speed_report(rows)
    assert any("fixnorm_cuda x sgd_fused" in line and "1.050  <= 1.1: met" in line for line in lines)
    assert any("fixnorm_cuda speedup over composition" in line and f"{3.0 / 1.05:.3f}" in line for line in lines)
    assert any("fixnorm_cuda fraction of copy" in line and "0.750" in line and "MISSED" in line for line in lines)
    assert any("resnet50" in line and "fixnorm_triton x fixnorm_cuda" in line and f"{1.4 / 1.05:.3f}" in line
               and "MISSED" in line for line in lines)
    assert any("resnet50" in line and "fixnorm_triton x sgd_fused" in line and "1.400" in line
               and "MISSED" in line for line in lines)
    # No triton row on synthetic1b: no data, not a verdict.
    assert any(bench.SYNTHETIC in line and "fixnorm_triton x sgd_fused" in line and "no data" in line
               for line in lines)
    only = bench.speed_report(rows, ("fixnorm_triton",))
    assert len(only) == 1 + 4 and all("fixnorm_cuda speedup" not in line for line in only)
