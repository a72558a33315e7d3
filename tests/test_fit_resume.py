"""``fit --ckpt_path``: a checkpoint resumes only into the layout, base, LoRA settings and prompt it was written with,
and only when it restores every trainable weight; ``--ckpt_path last`` needs a last.ckpt. Each refusal is one line
and exit status 2. Also the start-up checks of fit's settings: when to validate, what a checkpoint monitors."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import struct
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import REPO, labelled_records, write_jsonl
from healthai.__main__ import main
from healthai.cli import HealthAICLI, cli_main
from healthai.errors import ConfigError


def fit_args(folder: Path, model: Path, train: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(model),
        "--data.train_file", str(train), "--data.val_file", str(train), "--data.val_overlap", "keep",
        "--data.max_length", "160",
        "--data.batch_size", "2", "--trainer.max_epochs", "10", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder),
        "--trainer.callbacks.dirpath", str(folder / "ckpt"), "--trainer.enable_progress_bar", "false",
        "--model.generate_every_n_epochs", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def trained_cli(tmp_path_factory, tiny_model_dir) -> tuple[Path, HealthAICLI]:
    """A run folder with train.jsonl (8 records) and ckpt/last.ckpt after 2 steps of batch 2 (mid-epoch); and the
    CLI that trained it."""
    folder = tmp_path_factory.mktemp("trained")
    train = write_jsonl(folder / "train.jsonl", labelled_records(8))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cli = cli_main(fit_args(folder, tiny_model_dir, train, "--trainer.max_steps", "2"))
    finally:
        os.chdir(cwd)
    return folder, cli


@pytest.fixture(scope="module")
def trained(trained_cli) -> Path:
    """The run folder of :func:`trained_cli`."""
    return trained_cli[0]


def test_fit_writes_its_checkpoints_and_last_ckpt_link_atomically(trained_cli):
    """#29 item 6: every checkpoint through AtomicCheckpointIO, save_last: link through the atomic link; and what
    it wrote resumes (the checkpoint tests above and below load it) and leaves no temporary file."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from healthai.checkpoint_io import AtomicCheckpointIO, atomic_link_checkpoint

    folder, cli = trained_cli
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoints and all(c._link_checkpoint is atomic_link_checkpoint for c in checkpoints)
    assert "last.ckpt" in {p.name for p in (folder / "ckpt").iterdir()}
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def run_main(argv: list[str], capfd) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return info.value.code, lines[-1] if lines else ""


def other_base(tiny_model_dir: Path, folder: Path) -> Path:
    """The small model with one weight changed in its last bit: the same shape, another base."""
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 64] ^= 1  # the low mantissa byte of one bf16/fp32 element
    weights.write_bytes(bytes(data))
    return folder


@pytest.mark.parametrize("change, named", [
    (["--data.batch_size", "4"], "data.batch_size 2, now 4"),
    (["--data.seed", "7"], "data.seed 42, now 7"),
    (["--data.mega_batch_mult", "3"], "data.mega_batch_mult 50, now 3"),
    (["--trainer.accumulate_grad_batches", "2"], "trainer.accumulate_grad_batches 1, now 2"),
    ("train file", "training records (ids and token lengths"),
])  # fmt: skip
def test_a_resume_in_another_layout_is_refused_naming_the_change(run_dir, tiny_model_dir, change, named, capfd):
    train = run_dir / "train.jsonl"
    if change == "train file":
        write_jsonl(train, labelled_records(8, offset=1))  # one record out, another in: same count, other records
        change = []
    code, line = run_main(fit_args(run_dir, tiny_model_dir, train, "--trainer.max_steps", "3", "--ckpt_path", "last",
                                   *change), capfd)  # fmt: skip
    assert code == 2 and line.startswith("healthai fit: error: --ckpt_path ") and named in line, line
    assert "--data.allow_layout_change true" in line
    assert not (run_dir / "tiny" / "version_1" / "adapter").exists()


def test_allow_layout_change_resumes_in_a_new_layout_with_a_warning(run_dir, tiny_model_dir, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, batch_idx, trainer.global_step))

    monkeypatch.setattr(HealthAICLI, "before_fit", lambda cli: cli.trainer.callbacks.append(Probe()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(fit_args(run_dir, tiny_model_dir, run_dir / "train.jsonl", "--trainer.max_steps", "3",
                          "--ckpt_path", "last", "--data.batch_size", "4",
                          "--data.allow_layout_change", "true"))  # fmt: skip
    assert len(seen) == 1 and seen[0][2] == 2  # one step more than the checkpoint's 2, in batches of 4
    assert any("data.batch_size 2, now 4" in str(w.message) and "may repeat or miss" in str(w.message) for w in caught)


@pytest.mark.parametrize("change, named", [
    ("base", "was trained on base"),
    (["--model.lora_alpha", "32"], "LoRA adapter of other settings (lora_alpha 16, now 32)"),
    (["--model.target_modules", "[q_proj,v_proj]"], "LoRA adapter of other settings (target_modules"),
    (["--data.prompt.system", "另一个提示"], "another prompt (prompt.system differs)"),
])  # fmt: skip
def test_a_checkpoint_resumed_onto_another_base_lora_or_prompt_is_refused(run_dir, tiny_model_dir, change, named,
                                                                          capfd):  # fmt: skip
    model = tiny_model_dir
    if change == "base":
        model, change = other_base(tiny_model_dir, run_dir / "other-base"), []
    code, line = run_main(fit_args(run_dir, model, run_dir / "train.jsonl", "--trainer.max_steps", "3",
                                   "--ckpt_path", "last", *change), capfd)  # fmt: skip
    assert code == 2 and line.startswith("healthai fit: error: --ckpt_path ") and named in line, line


@pytest.mark.parametrize("spelling", ["--ckpt_path last", "--ckpt_path FILE", "--model.adapter_path FILE"])
def test_a_checkpoint_onto_another_base_is_refused_however_it_is_named(run_dir, tiny_model_dir, spelling, capfd):
    """#29 item 1: an explicit .ckpt was compared with itself (LightningCLI put the checkpoint's own
    model_name_or_path in place of the one given), so another base trained on; `last` was refused."""
    model = other_base(tiny_model_dir, run_dir / "other-base")
    ckpt = run_dir / "ckpt" / "last.ckpt"
    option, value = spelling.split()
    given = [option, "last" if value == "last" else str(ckpt)]
    code, line = run_main(fit_args(run_dir, model, run_dir / "train.jsonl", "--trainer.max_steps", "3", *given), capfd)
    assert code == 2 and "was trained on base" in line and str(model) in line, line
    assert not (run_dir / "tiny" / "version_1").exists()  # refused before its first step: no run folder


def test_a_checkpoint_that_restores_no_trainable_weight_is_refused(run_dir, tiny_model_dir, capfd):
    """Another PEFT version's names: every key misses, and strict=False would resume from fresh LoRA weights."""
    ckpt = torch.load(run_dir / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    n = len(ckpt["state_dict"])
    ckpt["state_dict"] = {k.replace(".default.", ".adapter0."): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, run_dir / "renamed.ckpt")
    code, line = run_main(fit_args(run_dir, tiny_model_dir, run_dir / "train.jsonl", "--trainer.max_steps", "3",
                                   "--ckpt_path", str(run_dir / "renamed.ckpt")), capfd)  # fmt: skip
    assert code == 2 and f"restores 0 of the {n} trainable weights: {n} not restored" in line, line


def test_ckpt_path_last_without_a_last_checkpoint_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, capfd,
                                                                                   monkeypatch):  # fmt: skip
    from healthai.model import DiagnosisLoRA

    monkeypatch.setattr(DiagnosisLoRA, "configure_model", lambda self: pytest.fail("the model was loaded"))
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    code, line = run_main(fit_args(tmp_path, tiny_model_dir, train, "--ckpt_path", "last"), capfd)
    assert code == 2 and "--ckpt_path last: no last.ckpt in" in line and str(tmp_path / "ckpt") in line, line


@pytest.mark.parametrize("extra, named", [
    (["--trainer.max_steps", "0"], "trainer.max_steps 0 takes no optimizer step, so fit would write no adapter"),
    (["--model.lora_alpha", "0"], 'model.lora_alpha: Not of type PositiveInt: 0 does not conform'),
    (["--model.val_every_n_steps", "2", "--trainer.val_check_interval", "4"], "both say when to validate"),
])  # fmt: skip
def test_settings_that_can_only_be_a_mistake_are_refused_before_the_model_loads(tmp_path, tiny_model_dir, extra,
                                                                                named, capfd, monkeypatch):  # fmt: skip
    from healthai.model import DiagnosisLoRA

    monkeypatch.setattr(DiagnosisLoRA, "configure_model", lambda self: pytest.fail("the model was loaded"))
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    code, line = run_main(fit_args(tmp_path, tiny_model_dir, train, *extra), capfd)
    assert code == 2 and named in line, line


# -- when to validate, and what a checkpoint may monitor --------------------------------------------------------------


def test_val_every_n_steps_validates_between_optimizer_steps(tmp_path, tiny_model_dir, monkeypatch):
    """16 records, batch 2, accumulate 2: 8 micro-batches, 4 steps an epoch; every 2 steps = after steps 2 and 4."""
    from lightning.pytorch.callbacks import Callback

    validated = []

    class Probe(Callback):
        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                validated.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.ready))

    monkeypatch.setattr(HealthAICLI, "before_fit", lambda cli: cli.trainer.callbacks.append(Probe()))
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(16))
    cli_main(fit_args(tmp_path, tiny_model_dir, train, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
                      "--trainer.accumulate_grad_batches", "2", "--model.val_every_n_steps", "2"))  # fmt: skip
    assert validated == [(2, 4), (4, 8)]


@pytest.mark.parametrize("steps, accumulate, batches, expected", [
    (25, 8, 1000, 200),  # the 7B config on one GPU
    (25, 2, 1000, 50),  # the DDP overlay: 25 steps are 50 micro-batches per GPU, whatever the number of GPUs
    (25, 2, 30, 1.0),  # an epoch of 15 steps: validate at its end
])  # fmt: skip
def test_validation_interval_counts_optimizer_steps(steps, accumulate, batches, expected):
    from healthai.model import validation_interval

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert validation_interval(steps, accumulate, batches) == expected
    assert bool([w for w in caught if "longer than an epoch (15 step(s)" in str(w.message)]) == (expected == 1.0)


@pytest.mark.parametrize("every, monitor, refused", [
    (2, "val/disease_f1", True), (0, "val/json_valid", True), (1, "val/disease_f1", False), (2, "val/loss", False),
])  # fmt: skip
def test_a_monitored_metric_that_some_validations_do_not_log_is_refused_at_start(every, monitor, refused):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from healthai.model import DiagnosisLoRA

    model = DiagnosisLoRA("unused", generate_every_n_epochs=every)
    checkpoint = ModelCheckpoint(monitor=monitor, mode="max")
    model._trainer = SimpleNamespace(max_steps=-1, callbacks=[checkpoint], checkpoint_callbacks=[checkpoint],
                                     strategy=SimpleNamespace(world_size=1))  # one process: no folder to share  # fmt: skip
    if refused:
        with pytest.raises(ConfigError, match=f"ModelCheckpoint monitors {monitor}, which only validations that"):
            model.setup("fit")
    else:
        model.setup("fit")


# -- a stop signal during fit (#29 item 4) ----------------------------------------------------------------------------


class SignalAt(Callback):
    """Sends ``signum`` to this process as the micro-batch ``batch_idx`` of optimizer step ``step`` (0-based) starts:
    inside an accumulation window, so the run must finish the window before it stops."""

    def __init__(self, signum: int, step: int, batch_idx: int):
        self.signum, self.step, self.batch_idx = signum, step, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.global_step, batch_idx) == (self.step, self.batch_idx):
            os.kill(os.getpid(), self.signum)


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "tiny" / "version_0" / "adapter" / "adapter_model.safetensors")


def test_sigterm_and_ctrl_c_save_last_ckpt_at_the_step_reached_and_resume_to_the_uninterrupted_weights(
        tmp_path, tiny_model_dir, monkeypatch, capfd):  # fmt: skip
    """4 records, batch 1, accumulate 2: 2 optimizer steps an epoch, 4 in all. SIGTERM during step 2's first
    micro-batch stops after step 2 (exit 143), the resume is stopped by Ctrl+C during step 3's second (exit 130), the
    second resume finishes: its adapter is the uninterrupted run's. Lightning alone exited 0 / 1 with no last.ckpt."""
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    common = ["--trainer.max_steps", "4", "--trainer.accumulate_grad_batches", "2", "--model.gradient_checkpointing",
              "false", "--data.batch_size", "1"]  # fmt: skip
    cli_main(fit_args(tmp_path / "full", tiny_model_dir, train, *common))
    cut = tmp_path / "cut"
    before_fit = HealthAICLI.before_fit  # resumes in the run folder: kept, with the signal added
    for signum, step, batch_idx, status, ckpt in [(signal.SIGTERM, 1, 2, 143, []), (signal.SIGINT, 2, 1, 130, ["last"])]:
        monkeypatch.setattr(HealthAICLI, "before_fit", lambda cli, s=signum, t=step, b=batch_idx: (
            before_fit(cli), cli.trainer.callbacks.append(SignalAt(s, t, b))))
        argv = fit_args(cut, tiny_model_dir, train, *common, *(["--ckpt_path", *ckpt] if ckpt else []))
        monkeypatch.setattr(sys, "argv", [str(REPO / "healthai" / "__main__.py"), *argv])
        code, line = run_main(argv, capfd)
        saved = torch.load(cut / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
        assert (code, saved["global_step"]) == (status, step + 1), line
        assert line == (f"fit: stopped by {signal.Signals(signum).name} after optimizer step {step + 1}: saved "
                        f"{cut / 'ckpt' / 'last.ckpt'}; to resume: python -m healthai "
                        f"{shlex.join([a for a in argv if a not in ('--ckpt_path', 'last')])} --ckpt_path last")
        assert not (cut / "tiny" / "version_0" / "adapter").exists()
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    cli_main(fit_args(cut, tiny_model_dir, train, *common, "--ckpt_path", "last"))
    full, resumed = adapter_weights(tmp_path / "full"), adapter_weights(cut)
    assert full.keys() == resumed.keys() and full
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-7, msg=name)
