#!/usr/bin/env bash
# Run the test suite on a fresh machine: creates .venv if missing, installs with test extras, runs pytest (CPU only).
# Extra arguments go to pytest, e.g. scripts/test.sh -k data -x
HEALTHAI_EXTRAS=test . "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python -m pytest "$@"
