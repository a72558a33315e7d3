#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks into .whl/ (git-ignored), for its Python 3.12 on manylinux x86_64: it has
# no network, so scripts/gpu_check.sh installs them there from the carried folder. Run it here, with PyPI access:
#
#   bash scripts/fetch_gpu_wheels.sh [DEST]      # DEST defaults to .whl
#
# then, through the device tool: run `bash scripts/gpu_check.sh` with carry [".whl"] (docs/performance.md, "GPU figures").
#
# The wheels and their versions are listed in scripts/gpu_wheels.txt. The machine's image (its package list read on
# 2026-11-17, DEVICE in scripts/gpu_wheels.py) has torch 2.11 + CUDA 13, triton 3.6, lightning 2.6.6, transformers 5.17,
# tokenizers, safetensors, accelerate, torchmetrics, tensorboard, numpy, scipy, matplotlib and more, but none of the
# packages fetched here. After the download scripts/gpu_wheels.py checks, offline, that every requirement of every
# wheel and of the project (setup.cfg's install_requires and its gpu and report extras; serve's LitServe is not
# needed there) is met by a fetched wheel or by the image, in a matching version where the version there is known; that
# each package is fetched once (two versions stop the install there); and the total size. Then it records each wheel's
# requirements in scripts/gpu_wheels.requires.json (commit it): tests/test_gpu_wheels.py runs the same check offline
# on the pinned list with that record, so a new dependency, or a pin changed without fetching it, fails there first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
MAX_MIB=${MAX_MIB:-40}

# name==version words, comments after #
read -r -a WHEELS <<< "$(sed 's/#.*//' scripts/gpu_wheels.txt | tr '\n' ' ')"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # a stale second version of a package would stop the install on the machine
platforms=()
for p in manylinux_2_{17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"

"$PY" scripts/gpu_wheels.py "$DEST" "$MAX_MIB"
