#!/usr/bin/env bash
# Every GPU figure in one command, on the lent GPU machine (docs/performance.md, "GPU figures"):
#
#   bash scripts/gpu_check.sh [scripts/gpu_check.py options]
#
# Installs the wheels carried in .whl/ (fetched beforehand by `bash scripts/fetch_gpu_wheels.sh` on a machine with
# PyPI) into /tmp/site, puts that first on PYTHONPATH, then runs scripts/gpu_check.py. The whole script, the install
# included, ends within GPU_CHECK_LIMIT_S (300 s, so that a rerun fits a 15-minute device budget): the Python side
# gets that budget less 30 s and plans its items to fit, and `timeout` stops it at the limit if it hangs. The report
# (gpu_check.json) and this log (gpu_check.log) go to $OUT, else checkpoints/gpu_check/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}
LIMIT_S=${GPU_CHECK_LIMIT_S:-300}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-checkpoints/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
{
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if ((${#wheels[@]})); then
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}"; then
      echo "gpu_check.sh: installing the wheels of $WHEELS into $SITE failed" >&2
      exit 2
    fi
    export PYTHONPATH="$SITE:$PWD"
    echo "installed ${#wheels[@]} wheels from $WHEELS into $SITE ($(($(date +%s) - GPU_CHECK_T0)) s)"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "no wheels in $WHEELS: using the installed packages"
  fi
  left=$((LIMIT_S - ($(date +%s) - GPU_CHECK_T0)))
  timeout -k 5 "$left" "$PY" scripts/gpu_check.py --out "$OUT_DIR" --budget_s $((LIMIT_S - 30)) "$@"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
