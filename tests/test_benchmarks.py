"""Smoke runs of the benchmark scripts at tiny sizes: they start, run both sides and print their result lines.
No timing is asserted (that is what the scripts themselves report). They run with one torch thread: on a shared,
busy CPU, two OpenMP threads can make every small op wait milliseconds on a descheduled thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def run_script(name: str, *args: str, timeout: float = 120) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_predict_smoke(tiny_model_dir):
    out = run_script("bench_predict.py", "--model", str(tiny_model_dir), "--records", "4", "--old_records", "2",
                     "--max_new_tokens", "8", "--threads", "1")  # fmt: skip
    assert "(a) project" in out and "(b) old" in out
    assert "ratio (a)/(b):" in out.splitlines()[-1]


@pytest.mark.slow
def test_bench_train_smoke(tiny_model_dir):
    out = run_script("bench_train.py", "--model", str(tiny_model_dir), "--steps", "1", "--records", "16",
                     "--max_length", "512", "--batch_size", "4", "--threads", "1")  # fmt: skip
    assert "(a) project" in out and "(b) HF Trainer" in out
    assert "warning: the variants saw different tokens" not in out
    assert "ratio (a)/(b):" in out.splitlines()[-1]
