"""Smoke runs of the benchmark scripts at tiny sizes: they start, run both sides and print their result lines.
No timing is asserted (that is what the scripts themselves report). They run with one torch thread: on a shared,
busy CPU, two OpenMP threads can make every small op wait milliseconds on a descheduled thread."""

from __future__ import annotations

import os
import runpy
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
def test_bench_predict_smoke(tiny_model_dir, monkeypatch, capsys):
    # In this process (an interpreter start would cost more than the run): the script as `python scripts/...` runs it,
    # its exit status 0, and torch's thread count (which --threads sets) put back after.
    import torch

    threads = torch.get_num_threads()
    try:
        # 16 new tokens: the budget must hold at least the empty answer object (12 tokens with its end of turn).
        exited = run_script_in_process("bench_predict.py", "--model", str(tiny_model_dir), "--n_records", "4",
                                       "--old_records", "2", "--max_new_tokens", "16", "--threads", "1",
                                       monkeypatch=monkeypatch)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert exited.code == 0
    out = capsys.readouterr().out
    assert "(a) project" in out and "(c) transformers alone" in out and "(b) old" in out
    assert "records of " + str(REPO / "tests" / "fixtures" / "seed_records.jsonl") in out  # the committed fixture
    assert "ratio (a)/(c):" in out
    assert "ratio (a)/(b):" in out.splitlines()[-1]
    # The constraint closes every answer within the budget as strict JSON (json.loads of the text as generated).
    assert "(a)'s answers: every row strictly valid JSON;" in out
    assert "closed by the 16-token budget" in out and "ms per decoding step" in out


def test_bench_predict_refuses_a_budget_no_answer_fits_in(tiny_model_dir, monkeypatch):
    # One line, before the models are built: the processor could not close an answer in 8 tokens.
    message = run_script_in_process("bench_predict.py", "--model", str(tiny_model_dir), "--n_records", "2",
                                    "--old_records", "0", "--max_new_tokens", "8", monkeypatch=monkeypatch).code
    assert isinstance(message, str)
    assert message.startswith("--max_new_tokens=8 is below the 12 tokens of an empty answer object")


@pytest.mark.slow
def test_bench_train_smoke_with_trl_on_the_same_tokens(tiny_model_dir):
    pytest.importorskip("trl", reason="TRL comes with the bench extra: pip install -e .[bench]")
    # One epoch of one batch (every variant sees both records); max_length 480 trims both case texts, so the token
    # check covers trimmed prompts too.
    # The seed recipe (b) is left out: the script's code for it is unchanged, and each variant is a child process.
    out = run_script("bench_train.py", "--model", str(tiny_model_dir), "--n_records", "2", "--batch_size", "2",
                     "--max_length", "480", "--variants", "a,t", "--threads", "1", timeout=300)  # fmt: skip
    assert "(a) project" in out and "(t) TRL SFTTrainer" in out and "(b) seed recipe" not in out
    assert "TRL token check: 2/2 of TRL's tokenised prompt+completion rows equal" in out
    assert "saw different tokens" not in out
    assert out.splitlines()[-1].startswith("ratio (a)/(t) TRL:")


def run_script_in_process(name: str, *args: str, monkeypatch) -> SystemExit:
    """``python scripts/<name> <args>`` in this process (no interpreter start): the exit it raises (a script's
    ``raise SystemExit(main())``; for a refusal, its message is what Python prints as stderr's last line, status 1)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # what running the file puts first: benchlib is imported
    monkeypatch.setattr(sys, "argv", [str(REPO / "scripts" / name), *args])
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "scripts" / name), run_name="__main__")
    return exited.value


@pytest.mark.parametrize("script", ["bench_train.py", "bench_predict.py", "bench_label.py"])
def test_bench_records_count_beyond_the_file_is_a_one_line_error(script, monkeypatch):
    message = run_script_in_process(script, "--n_records", "1000", monkeypatch=monkeypatch).code
    assert isinstance(message, str)  # a message, not a status: printed to stderr, exit status 1
    assert message.strip().splitlines()[-1].startswith("--n_records 1000")
    assert "seed_records.jsonl holds only 96 records" in message


def test_bench_serve_records_count_beyond_the_file_is_the_same_one_line_error(monkeypatch):
    # Read before the server starts; the count's flag is --records here.
    message = run_script_in_process("bench_serve.py", "--records", "1000", monkeypatch=monkeypatch).code
    assert message == f"--records 1000: {REPO / 'tests' / 'fixtures' / 'seed_records.jsonl'} holds only 96 records"
