#!/usr/bin/env bash
# The main job: install the pinned dependencies, build the package with its
# compiled extension, then time one optimizer step (FusedFixNorm backends
# against SGD), and the sharded step's all-reduce on 2 gloo ranks. Arguments
# go to the first benchmark, e.g.
#   bench/main.sh --models resnet50 --reps 50
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -m pip install -r requirements.txt
python -m pip install --no-build-isolation -e .
python -m fixnorm_ext bench "$@"
# Sharded parameters: the norm all-reduce across 2 gloo ranks (bench/distributed.py).
python bench/distributed.py
