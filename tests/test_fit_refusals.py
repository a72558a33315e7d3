"""fit refuses to start without training data (case 3 of issue 10): no records after rejects, fewer records than one
batch, an empty validation file; and a run that took no optimizer step writes no adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import REPO, labelled_records, write_jsonl
from healthai.cli import HealthAICLI, cli_main


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def fit_args(tmp_path: Path, model: Path, train: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(model),
        "--data.train_file", str(train), "--data.val_file", "null", "--data.val_fraction", "0",
        "--data.max_length", "256", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks.dirpath", str(tmp_path / "runs" / "ckpt"), "--trainer.enable_progress_bar", "false",
        "--model.generate_every_n_epochs", "0", "--trainer.max_steps", "2", *extra,
    ]  # fmt: skip


def tree(folder: Path) -> set[str]:
    """Every file under ``folder``, relative: what a run left behind. Lightning creates the TensorBoard event file
    before the data is read (an empty log of a run that did not start), so it is left out."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "tfevents" not in p.name}


def test_an_empty_train_file_is_refused_and_nothing_is_written(tmp_path, tiny_model_dir):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"")
    with pytest.raises(ValueError) as err:
        cli_main(fit_args(tmp_path, tiny_model_dir, train))
    assert str(err.value) == f"{train}: no usable training records"
    assert tree(tmp_path) == {"train.jsonl"}  # no config.yaml, no checkpoint, no adapter/


def test_every_record_rejected_is_refused_naming_the_rejects_file(tmp_path, tiny_model_dir):
    rows = [dict(r, feature_content="") for r in labelled_records(3)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError) as err:
        cli_main(fit_args(tmp_path, tiny_model_dir, train, "--data.on_bad_record", "skip"))
    rejects = tmp_path / "train.rejects.jsonl"
    assert str(err.value) == f"{train}: no usable training records (3 rejected, see {rejects})"
    assert tree(tmp_path) == {"train.jsonl", "train.rejects.jsonl"}
    assert rejects.read_text(encoding="utf-8").count("\n") == 3


def test_fewer_records_than_one_batch_are_refused(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(3))
    with pytest.raises(ValueError) as err:
        cli_main(fit_args(tmp_path, tiny_model_dir, train, "--data.batch_size", "4"))
    assert str(err.value) == (
        f"{train}: 3 usable training record(s) (after the validation split, if any), fewer than one batch "
        "(data.batch_size 4 x 1 device); lower data.batch_size or add records"
    )
    assert tree(tmp_path) == {"train.jsonl"}


def test_an_empty_validation_file_is_refused(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    val = tmp_path / "val.jsonl"
    val.write_bytes(b"\n")
    with pytest.raises(ValueError) as err:
        cli_main(fit_args(tmp_path, tiny_model_dir, train, "--data.val_file", str(val), "--data.val_fraction", "null"))
    assert str(err.value) == f"{val}: no usable validation records"
    assert tree(tmp_path) == {"train.jsonl", "val.jsonl"}


def test_a_run_that_took_no_optimizer_step_writes_no_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """Stopped before its first step (here by a callback, as an early stop or a scheduler could): the base model's
    untrained LoRA initialisation must not be saved and announced as the adapter."""

    class StopAtOnce(Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.should_stop = True

    add = lambda cli: cli.trainer.callbacks.append(StopAtOnce())  # noqa: E731
    monkeypatch.setattr(HealthAICLI, "before_fit", add, raising=False)
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    cli = cli_main(fit_args(tmp_path, tiny_model_dir, train))
    assert cli.trainer.global_step == 0
    left = tree(tmp_path / "runs")
    assert not any("adapter" in name for name in left), left
    # Lightning's own records of the run (config, hparams, the epoch-end checkpoint at step 0) — and no adapter/.
    assert left == {"tiny/version_0/config.yaml", "tiny/version_0/hparams.yaml", "ckpt/last.ckpt"}


class Poison(Callback):
    """Makes step 2 (of 2) non-finite where ``where`` says: its loss or its gradient."""

    def __init__(self, where: str):
        self.where = where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "loss" and trainer.global_step == 1:
            batch["poison"] = True

    def on_after_backward(self, trainer, pl_module):
        if self.where == "gradient" and trainer.global_step == 1:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0].fill_(float("inf"))


@pytest.mark.parametrize("where, line", [
    ("loss", "train/loss is nan at optimizer step 2: training diverged; the step was not taken and no adapter is "
             "written; "),
    ("gradient", "the gradient norm is inf at optimizer step 2 (loss "),
])  # fmt: skip
def test_a_non_finite_loss_or_gradient_stops_fit_without_an_adapter(where, line, tmp_path, tiny_model_dir,
                                                                           monkeypatch, capfd):  # fmt: skip
    """#29 item 5: a run whose loss turned NaN wrote an adapter of NaNs and exited 0."""
    from healthai.__main__ import main
    from healthai.model import DiagnosisLoRA

    answer_loss = DiagnosisLoRA.answer_loss
    poisoned = lambda self, batch, reduction="mean": answer_loss(self, batch, reduction) * (  # noqa: E731
        float("nan") if batch.get("poison") else 1.0)
    monkeypatch.setattr(DiagnosisLoRA, "answer_loss", poisoned)
    monkeypatch.setattr(HealthAICLI, "before_fit", lambda cli: cli.trainer.callbacks.append(Poison(where)))
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    with pytest.raises(SystemExit) as info:
        main(fit_args(tmp_path, tiny_model_dir, train, "--data.batch_size", "2"))
    err = capfd.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]
    assert info.value.code == 2 and last.startswith(f"healthai fit: error: {line}"), err
    assert last.endswith("lower model.learning_rate (or look for records that overflow), then resume from an earlier "
                         "checkpoint with --ckpt_path PATH") and "Traceback" not in err  # fmt: skip
    assert not any("adapter" in name for name in tree(tmp_path / "runs")), tree(tmp_path / "runs")


def test_the_adapter_saver_refuses_non_finite_weights():
    """The last step's update can make the weights NaN with a finite loss: AdapterSaver checks what it would write."""
    from healthai.finite import TrainingDiverged, check_weights

    weights = {"a.lora_A.weight": torch.ones(2, 2), "a.lora_B.weight": torch.tensor([[0.0, float("nan")]])}
    with pytest.raises(TrainingDiverged) as err:
        check_weights(weights, 7)
    assert str(err.value).startswith("the weights are not finite after optimizer step 7 (e.g. a.lora_B.weight): no "
                                     "adapter is written; lower model.learning_rate")  # fmt: skip
    check_weights({"a.lora_A.weight": torch.ones(2, 2), "step": torch.tensor(3)}, 7)  # finite, and an integer


def test_sigterm_in_the_sanity_check_exits_143_without_a_run_folder(tmp_path, tiny_model_dir, monkeypatch, capfd):
    """#29 item 4: a SIGTERM after Lightning registered its handler, before the training loop, stopped with status 0."""
    import os
    import signal

    from healthai.__main__ import main
    from healthai.fit_stop import STOPPED_BEFORE_A_STEP

    class SigtermInSanityCheck(Callback):
        def on_sanity_check_start(self, trainer, pl_module):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(HealthAICLI, "before_fit", lambda cli: cli.trainer.callbacks.append(SigtermInSanityCheck()))
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    with pytest.raises(SystemExit) as info:
        main(fit_args(tmp_path, tiny_model_dir, train, "--data.batch_size", "1", "--data.val_fraction", "0.25",
                      "--trainer.num_sanity_val_steps", "1"))  # fmt: skip
    last = capfd.readouterr().err.rstrip("\n").splitlines()[-1]
    assert (info.value.code, last) == (143, STOPPED_BEFORE_A_STEP)
    assert tree(tmp_path / "runs") == set()  # refused before its first step: no run folder, no checkpoint
