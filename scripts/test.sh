#!/usr/bin/env bash
# Run the test suite on a fresh machine: creates .venv if missing, installs with test extras, runs pytest (CPU only).
# Two pytest-xdist workers, each test file on one worker (module fixtures such as a shared fitted run are built once),
# the costliest files first (tests/file_costs.py);
# HEALTHAI_TEST_WORKERS=0 runs the tests in this one process. Extra arguments go to pytest, e.g. scripts/test.sh -k data -x
HEALTHAI_EXTRAS=test . "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python -m pytest -n "${HEALTHAI_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
