"""Issue 34: the demo's memorisation check (scripts/demo.sh) holds — configs/demo.yaml, on a few of the demo's own
training records, makes an adapter that writes their answers back on its own (no ``truncated`` row), and the losses
scripts/print_losses.py reads from the run show training at work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_jsonl, write_jsonl
from healthai.cli import cli_main
from healthai.evaluate import evaluate


def print_losses():
    spec = importlib.util.spec_from_file_location("print_losses", REPO / "scripts" / "print_losses.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_demo_recipe_memorises_its_records_and_the_answers_close(tmp_path: Path, tiny_model_dir, monkeypatch,
                                                                    capsys):
    """Two of the demo's six records, its shortest (one batch of two, the demo config's 60 steps, one validation), to
    keep the test short; the demo itself runs all six."""
    monkeypatch.chdir(REPO)
    trained = write_jsonl(tmp_path / "trained.jsonl", read_jsonl(REPO / "data" / "sample_train.jsonl")[3:5])
    runs = str(tmp_path / "runs")
    cli_main(["fit", "--config", "configs/demo.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--data.train_file", str(trained), "--data.val_file", str(trained),
              "--data.val_overlap", "keep", "--data.batch_size", "2",
              "--trainer.check_val_every_n_epoch", "60",
              "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
              "--trainer.enable_progress_bar", "false"])  # fmt: skip
    (run,) = (tmp_path / "runs" / "demo").glob("version_*")
    out = tmp_path / "tuned.jsonl"
    cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--model.adapter_path", str(run / "adapter"), "--data.predict_file", str(trained),
              "--writer.output_path", str(out), "--writer.progress", "false"])  # fmt: skip
    report = evaluate(out, trained)
    assert report["parse_status"]["truncated"] == 0 and report["n"] == 2, report["parse_status"]
    assert report["disease_f1"] >= 0.8, report

    losses = print_losses()
    train = losses.scalars(run)["train/loss"]
    assert train[-1][1] < train[0][1] / 10, train  # memorised: the loss on the trained records fell tenfold
    capsys.readouterr()
    assert losses.main([str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"train/loss (the records it trains on): {train[0][1]:.3f} -> {train[-1][1]:.3f}" in printed
    assert "val/loss" in printed
