#!/usr/bin/env bash
# The GPU check of the CUDA and Triton backends, for a machine with an NVIDIA GPU and no
# network, where python3 and torch are already installed (nothing is
# installed here):
#
#   bash bench/gpu_check.sh OUTDIR
#
# Steps: show the GPU and the versions; build the extension in place with
# CUDA (sm_90); check that the CUDA kernel is registered; run the GPU tests
# of both backends; time one optimizer step with `python -m fixnorm_ext bench
# --device cuda` (each run measures the copy bandwidth first) in float32 and
# bfloat16 on resnet50, mobilenet_v2, efficientnet_b0 and synthetic1b, every
# backend with the fused CUDA schedule, then the cuda backend alone with
# FIXNORM_CUDA_SCHEDULE=phased as a control; report the speed targets of both
# backends; with two GPUs or more, time the norm all-reduce of sharded
# parameters over NCCL (bench/distributed.py, rows in OUTDIR/distributed.jsonl);
# run the rest of the tests if time is left. Everything is logged
# to OUTDIR/log.txt (and shown), the benchmark rows go to OUTDIR/cuda.jsonl.
#
# Each step has its own time limit and the whole run a budget; a step that
# fails does not stop the later ones, but the exit status is 1 when any
# required step failed, timed out or was left out for lack of time. A table
# of the steps comes last.
#
# Settings (environment):
#   FIXNORM_GPU_CHECK_BUDGET_S  wall-time budget in seconds (default 540)
#   FIXNORM_GPU_CHECK_MODELS    comma-separated models for the benchmark
#   FIXNORM_GPU_CHECK_REPS, FIXNORM_GPU_CHECK_WARMUP   timed and untimed steps
#   FIXNORM_COMMIT              commit recorded in the rows where the tree is
#                               a copy without .git
#   PYTHON                      interpreter (default python3)
#   FIXNORM_GPU_CHECK_DRY=1     check this script on a machine without a GPU:
#                               every step runs, with the build made without
#                               CUDA (unless FIXNORM_BUILD_CUDA=1), the
#                               benchmark on --device cpu with tiny settings
#                               and a shrunken synthetic1b.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
LOG="$OUTDIR/log.txt"
RESULTS="$OUTDIR/cuda.jsonl"
: >"$LOG"
: >"$RESULTS"

export PY=${PYTHON:-python3}
export DRY=${FIXNORM_GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1
BUDGET=${FIXNORM_GPU_CHECK_BUDGET_S:-540}
MODELS=${FIXNORM_GPU_CHECK_MODELS:-resnet50,mobilenet_v2,efficientnet_b0,synthetic1b}
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    BUILD_CUDA=${FIXNORM_BUILD_CUDA:-0}
    REPS=${FIXNORM_GPU_CHECK_REPS:-2}
    WARMUP=${FIXNORM_GPU_CHECK_WARMUP:-1}
    # CPU-sized: a 1e6-element synthetic1b, a 16 MB copy, one reference step.
    BENCH_EXTRA=(--synthetic-params 1000000 --copy-mb 16 --reference-reps 1)
    PHASED_BACKENDS=foreach  # no cuda backend in a build without CUDA
else
    DEVICE=cuda
    BUILD_CUDA=1
    # 50 timed steps after 10 warm-up ones: the whole synthetic1b run (six
    # contestants, 5-10 ms a step) takes a few seconds.
    REPS=${FIXNORM_GPU_CHECK_REPS:-50}
    WARMUP=${FIXNORM_GPU_CHECK_WARMUP:-10}
    BENCH_EXTRA=()
    PHASED_BACKENDS=cuda
fi
if [ -z "${FIXNORM_COMMIT:-}" ] && command -v git >/dev/null; then
    FIXNORM_COMMIT=$(git rev-parse --short HEAD 2>/dev/null) && export FIXNORM_COMMIT
fi

START=$SECONDS
FAILED=0
SUMMARY=()

log() { printf '%s\n' "$@" | tee -a "$LOG"; }

# step NAME LIMIT_S required|optional COMMAND...: run COMMAND under `timeout`,
# its output shown and appended to the log, and record how it went.
step() {
    local name=$1 limit=$2 need=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - 10))
    if ((left < 20)); then
        log "" "=== [$name] left out: $((BUDGET - (SECONDS - START))) s of the ${BUDGET} s budget left"
        SUMMARY+=("$(printf '%-22s %-26s %5s' "$name" "LEFT OUT (budget)" 0)")
        [ "$need" = required ] && FAILED=1
        return 0
    fi
    ((limit > left)) && limit=$left
    log "" "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status=ok
    case $rc in
        0) ;;
        124 | 137) status="TIMEOUT (${limit} s)" ;;
        *) status="FAIL (exit $rc)" ;;
    esac
    if [ "$status" != ok ]; then
        if [ "$need" = required ]; then
            FAILED=1
        else
            status="$status, optional"
        fi
    fi
    log "=== [$name] $status after $((SECONDS - t0)) s"
    SUMMARY+=("$(printf '%-22s %-26s %5s' "$name" "$status" $((SECONDS - t0)))")
}

# find_cuda_tool NAME: the toolkit's NAME (nvcc, cuobjdump) on PATH, else in
# $CUDA_HOME/bin, else in /usr/local/cuda/bin.
find_cuda_tool() {
    local c
    for c in "$(command -v "$1")" "${CUDA_HOME:-/nonexistent}/bin/$1" "/usr/local/cuda/bin/$1"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

show_gpu() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
        [ "$DRY" = 1 ]
    fi
}

show_versions() {
    echo "$PY: $(command -v "$PY")"
    "$PY" --version || return 1
    "$PY" - <<'EOF' || return 1
import importlib.metadata as md

import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}, {torch.get_num_threads()} CPU threads")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
print(", ".join(f"{n} {version(n)}" for n in ("triton", "torchvision", "pytest", "setuptools", "ninja", "numpy")))
EOF
    local nvcc
    if nvcc=$(find_cuda_tool nvcc); then
        echo "nvcc: $nvcc"
        "$nvcc" --version | tail -n 2
    else
        echo "nvcc: not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    fi
    echo "c++: $(c++ --version 2>&1 | head -n 1)"
    echo "ninja: $(ninja --version 2>&1 || echo 'not found (the build falls back to one file at a time)')"
    echo "commit: ${FIXNORM_COMMIT:-unknown}"
}

# Per-kernel registers, shared memory and spills of what the build made,
# then whether the op got its CUDA kernel.
show_extension() {
    local so
    so=$(ls fixnorm_ext/_C*.so 2>/dev/null | head -n 1)
    if [ -z "$so" ]; then
        echo "no fixnorm_ext/_C*.so: the build made no extension"
        return 1
    fi
    ls -l "$so"
    local cuobjdump
    if cuobjdump=$(find_cuda_tool cuobjdump); then
        "$cuobjdump" --dump-resource-usage "$so" 2>&1 | head -n 60
    else
        echo "cuobjdump: not found; no resource usage"
    fi
    "$PY" - <<'EOF'
import os
import sys

import torch

import fixnorm_ext
from fixnorm_ext import dispatch

print("extension:", dispatch.EXTENSION_ERROR or "loaded")
for device in ("cpu", "cuda"):
    print(f"available_backends({device!r}):", fixnorm_ext.available_backends(device))
try:
    cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fixnorm_ext::fixnorm_step", "CUDA")
except RuntimeError as exc:
    print("fixnorm_ext::fixnorm_step is not registered:", exc)
    cuda_kernel = False
print("CUDA kernel of fixnorm_ext::fixnorm_step registered:", cuda_kernel)
sys.exit(0 if cuda_kernel or os.environ["DRY"] == "1" else 1)
EOF
}

# The cost of the norm all-reduce of sharded parameters (bench/distributed.py):
# NCCL over every GPU (up to 8) where there are at least two; dry, two gloo
# ranks on the CPU with resnet18; with one GPU, nothing to measure.
bench_distributed() {
    if [ "$DRY" = 1 ]; then
        "$PY" bench/distributed.py --device cpu --world 2 --model resnet18 --reps "$REPS" --warmup "$WARMUP" \
            --out "$OUTDIR/distributed.jsonl"
        return
    fi
    local gpus
    gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || return 1
    if ((gpus < 2)); then
        echo "one GPU: no collective to measure (bench/distributed.py needs two ranks)"
        return 0
    fi
    ((gpus > 8)) && gpus=8
    "$PY" bench/distributed.py --device cuda --world "$gpus" --model resnet50 --reps "$REPS" --warmup "$WARMUP" \
        --out "$OUTDIR/distributed.jsonl"
}

export -f find_cuda_tool show_gpu show_versions show_extension bench_distributed
export OUTDIR REPS WARMUP

log "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s, dry run: $DRY, device $DEVICE, repo $(pwd)"

step gpu 30 required bash -c show_gpu
step versions 60 required bash -c show_versions
# --ptxas-options=-v makes ptxas print each kernel's registers and shared
# memory into the log; NVCC_APPEND_FLAGS reaches nvcc without touching setup.py.
step build 360 required env FIXNORM_BUILD_CUDA="$BUILD_CUDA" TORCH_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS="$(nproc)" NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }--ptxas-options=-v" \
    "$PY" setup.py build_ext --inplace
step extension 60 required bash -c show_extension
# -rs: why tests skipped (an extension without CUDA skips them all); durations to size the limit.
step test_cuda 180 required "$PY" -m pytest tests/test_cuda.py -q -x -rs --durations=10
# The Triton tests on CUDA tensors (compiled; on the CPU, dry, interpreted).
step test_triton 240 required "$PY" -m pytest tests/test_triton.py tests/test_triton_kernels.py -q -x -rs \
    --durations=10
for dtype in float32 bfloat16; do
    step "bench_${dtype}" 180 required env FIXNORM_CUDA_SCHEDULE=fused \
        "$PY" -m fixnorm_ext bench --device "$DEVICE" --dtype "$dtype" --models "$MODELS" \
        --reps "$REPS" --warmup "$WARMUP" "${BENCH_EXTRA[@]}" --out "$RESULTS"
done
for dtype in float32 bfloat16; do
    step "bench_${dtype}_phased" 120 required env FIXNORM_CUDA_SCHEDULE=phased \
        "$PY" -m fixnorm_ext bench --device "$DEVICE" --dtype "$dtype" --models "$MODELS" \
        --backends "$PHASED_BACKENDS" --reps "$REPS" --warmup "$WARMUP" "${BENCH_EXTRA[@]}" --out "$RESULTS"
done
step targets 30 required "$PY" -c \
    'import sys; from fixnorm_ext.bench import print_speed_report; print_speed_report(*sys.argv[1:])' \
    "$RESULTS"
step bench_distributed 120 optional bash -c bench_distributed
step tests_rest 150 optional "$PY" -m pytest tests -q -x --ignore=tests/test_cuda.py --ignore=tests/test_triton.py \
    --ignore=tests/test_triton_kernels.py

log "" "=== summary: $((SECONDS - START)) s of ${BUDGET} s; log $LOG; $(wc -l <"$RESULTS") rows in $RESULTS"
log "$(printf '%-22s %-26s %5s' step status s)"
for line in "${SUMMARY[@]}"; do
    log "$line"
done
if [ "$FAILED" = 1 ]; then
    log "gpu_check: FAILED"
    exit 1
fi
if grep -q "optional" <<<"${SUMMARY[*]}"; then
    log "gpu_check: every required step passed; an optional one did not (see above)"
else
    log "gpu_check: all steps passed"
fi
