#!/usr/bin/env bash
# The main job: install the pinned dependencies, build the package with its
# compiled extension, then time one optimizer step (FusedFixNorm backends
# against SGD). Arguments go to the benchmark, e.g.
#   bench/main.sh --models resnet50 --reps 50
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -m pip install -r requirements.txt
python -m pip install --no-build-isolation -e .
python -m fixnorm_ext bench "$@"
