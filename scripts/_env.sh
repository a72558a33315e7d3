# Shared by demo.sh and test.sh: create .venv if missing, install torch only where absent, then the project.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# A user's own torch (e.g. a CUDA build) is kept; otherwise the pinned CPU build (a local wheel on our machines).
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[${HEALTHAI_EXTRAS:-tiny}]"
# The small random-weight Qwen2.5-architecture model every test and the demo run on (no model hub needed). Rebuilt
# whenever its builder (the script or the 7B config files it copies) changed since it was written (a hash stamp).
python scripts/make_tiny_model.py --out models/tiny-qwen2.5 --if_stale
