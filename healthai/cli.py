"""LightningCLI for ``fit``, ``validate`` and ``predict``: it builds objects and runs them, nothing else."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from healthai.adapter_saver import AdapterSaver
from healthai.checkpoint_io import make_checkpoints_atomic
from healthai.data import DiagnosisDataModule
from healthai.errors import ConfigError, PositiveInt, UserError, check_value
from healthai.fit_stop import EXIT_CODES, STOPPED_BEFORE_A_STEP, StopAtStep
from healthai.model import DiagnosisLoRA
from healthai.model_summary import without_flops
from healthai.run_folder import RunFolderRecorder
from healthai.writer import DiagnosisWriter

SUMMARIES = {
    "fit": "Fine-tune a LoRA adapter of the base model on labelled case records: checkpoints, TensorBoard logs and "
           "the adapter/ folder that predict, validate, serve and export take are written to the run folder.",
    "validate": "Validation loss and generated-answer metrics (disease P/R/F1, JSON validity, reason ROUGE-L) of the "
                "base model or of an adapter on the validation records.",
    "predict": "Answer case records with the base model or an adapter: batched, JSON-constrained generation streamed "
               "to a JSONL file, resumed where an interrupted run stopped.",
}  # fmt: skip
"""What each command's --help opens with (Lightning would take the first line of Trainer's method's docstring)."""


class HealthAICLI(LightningCLI):
    """LightningCLI with the project's links between model and data, the adapter saver on ``fit`` and the prediction
    writer on ``predict``."""

    def __init__(self, *args: Any, command: Optional[str] = None, **kwargs: Any) -> None:
        """``command``: the one subcommand these arguments run, when known: only its parser is built."""
        self._command = command
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        # LightningCLI builds a parser per subcommand on every run (the Trainer's, the model's and the data module's
        # signatures: ~0.25 s each here); one is used. The commands: those SUMMARIES describes (not Lightning's test).
        every = {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUMMARIES}
        return {self._command: every[self._command]} if self._command in every else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Written once: the data module tokenises with the model's tokenizer, and takes the adapter's saved prompt.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_path")
        parser.link_arguments("model.adapter_path", "data.adapter_path")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs) -> LightningArgumentParser:
        kwargs["description"] = SUMMARIES.get(subcommand, kwargs.get("description"))
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand != "fit":
            # Evaluation and greedy decoding draw no random numbers: no seed (nor Lightning's "No seed found"
            # warning). A sampling predict (--model.generation.do_sample true) is seeded by --seed_everything N.
            parser.set_defaults(seed_everything=False)
        if subcommand == "predict":
            # `--writer.output_path OUT.jsonl`; LightningCLI appends the callback to the trainer's.
            parser.add_lightning_class_args(DiagnosisWriter, "writer")
        return parser

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks = [without_flops(c) for c in trainer.callbacks]  # a FLOPs column of zeros: model_summary.py
        if self.subcommand == "fit":
            # Always on, not an option: a fit that leaves no adapter/ folder has nothing for predict or export.
            # StopAtStep: SIGTERM / Ctrl+C save a resumable last.ckpt and exit 143 / 130 (healthai.fit_stop).
            trainer.callbacks.extend([AdapterSaver(), RunFolderRecorder(), StopAtStep()])
            make_checkpoints_atomic(trainer)  # a full disk mid-save must not tear last.ckpt (#29 item 6)
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI puts a .ckpt's saved hyperparameters over the options given. In fit that made the checkpoint's
        # own model_name_or_path (and LoRA settings) stand in for the user's, so the resume checks compared the
        # checkpoint with itself and another base trained on (#29 item 1). fit resumes with the options given and
        # refuses a checkpoint that does not match them (healthai.resume), as `--ckpt_path last` always has.
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        # Lightning's signature says int and it takes 0, to fail later with a ZeroDivisionError after the model has
        # loaded; its type is not ours to declare, so the same check is made here.
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_value("trainer.accumulate_grad_batches", config.trainer.accumulate_grad_batches, PositiveInt)
        check_devices(config.trainer.devices)
        # Before the Trainer is built: Lightning's answer to a GPU config on a CPU machine is a 39-line traceback
        # (MisconfigurationException: No supported gpu backend found!), #29 item 14.
        check_gpu_available(config.trainer.accelerator, self.subcommand)

    def before_fit(self) -> None:
        from healthai.resume import check_last_checkpoint
        from healthai.run_folder import resume_in_run_folder

        ckpt_path = self.config["fit"].get("ckpt_path")
        # Lightning only warns when `--ckpt_path last` finds no last.ckpt, and trains from scratch.
        check_last_checkpoint(self.trainer, ckpt_path)
        resume_in_run_folder(self.trainer, ckpt_path)
        check_fit_outputs(self.trainer)

    def fit(self, model: DiagnosisLoRA, **kwargs: Any) -> None:
        """``trainer.fit``, and around it the run folder's rules (:mod:`healthai.run_folder`): a run refused before
        its first step leaves no folder; a finished one writes ``predict.yaml`` and says how to predict with it."""
        from healthai.run_folder import remove_refused_run, run_folder

        folder = run_folder(self.trainer) if self.trainer.is_global_zero else None
        existed = folder is not None and folder.exists()
        try:
            self.trainer.fit(model, **kwargs)
        except UserError:
            if self.trainer.global_step == 0:
                remove_refused_run(folder, existed)
            raise
        except SIGTERMException:
            # Lightning's own SIGTERM stop (a SystemExit with status 0) in the sanity check, after it registered its
            # handler (during base loading SIGTERM is still the default: the process ends, 143): no step of this run
            # taken, nothing to save. In the training loop healthai.fit_stop stops instead.
            if self.trainer.global_step == 0:
                remove_refused_run(folder, existed)
            if self.trainer.is_global_zero:
                print(STOPPED_BEFORE_A_STEP, file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES[signal.SIGTERM]) from None
        self._point_at_adapter(folder)

    def _point_at_adapter(self, folder: Optional[Path]) -> None:
        """The run's adapter and the predict command that uses it, the last lines fit prints (rank zero)."""
        from healthai.run_folder import write_predict_config

        adapter = folder / "adapter" if folder is not None else None
        if adapter is None or not (adapter / "adapter_config.json").is_file():
            return
        config = write_predict_config(folder, self.config["fit"].as_dict(), adapter)
        print(f"\nadapter: {adapter}\npredict with it:\n  python -m healthai predict --config {config} "
              "--data.predict_file RECORDS.jsonl", flush=True)

    def before_predict(self) -> None:
        # Rows are streamed to disk by the writer; holding every prediction in memory too would defeat that.
        self.trainer.predict_loop.return_predictions = False


def check_devices(devices: Any) -> None:
    """Refuse ``trainer.devices`` 0 or a negative count in one line: Lightning's signature takes any int and its
    refusal was a traceback (#29 item 12)."""
    count = devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        count = int(devices)
    if isinstance(count, int) and not isinstance(count, bool) and count < 1 and count != -1:
        raise ConfigError(f"trainer.devices {devices}: give a number of devices of 1 or more, -1 (all), a list of "
                          "device indices such as [0, 1], or auto")  # fmt: skip


def check_fit_outputs(trainer: Trainer) -> None:
    """Refuse, before the base model loads, a run folder or checkpoint folder that the system will not let fit write
    (read-only, permission denied, immutable: #29 item 8); each is named with the option it comes from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from healthai.paths import check_writable
    from healthai.run_folder import run_folder

    if not trainer.is_global_zero:
        return
    folder = run_folder(trainer)
    if folder is not None:
        check_writable("trainer.logger (the run folder)", folder, folder=True)
    else:  # without a logger, checkpoints without a dirpath go here; with one, into the run folder
        check_writable("trainer.default_root_dir", trainer.default_root_dir, folder=True)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            check_writable("ModelCheckpoint dirpath", callback.dirpath, folder=True)


GPU_ACCELERATORS = ("gpu", "cuda")
"""``trainer.accelerator`` values that need a CUDA device (``gpu`` also means Apple's MPS, where there is one)."""


def check_gpu_available(accelerator: Any, command: Optional[str]) -> None:
    """Raise :class:`ConfigError` when ``trainer.accelerator`` asks for a GPU and torch finds none here, saying how
    to run on the CPU instead. Other accelerators (``cpu``, ``auto``, an object) are Lightning's to check."""
    if not isinstance(accelerator, str) or accelerator.lower() not in GPU_ACCELERATORS:
        return
    import torch

    if torch.cuda.is_available() or (accelerator.lower() == "gpu" and torch.backends.mps.is_available()):
        return
    raise ConfigError(f"trainer.accelerator {accelerator}: the config asks for a GPU and torch finds none on this "
                      f"machine; to run {command or 'it'} on the CPU pass --trainer.accelerator cpu (with "
                      "--trainer.precision 32-true for exact fp32; slow for a 7B model)")  # fmt: skip


def cli_main(args: Optional[list[str]] = None) -> HealthAICLI:
    """Run ``args`` (``sys.argv``'s when None), e.g. ``["fit", "--config", "configs/tiny.yaml"]``."""
    given = sys.argv[1:] if args is None else args
    return HealthAICLI(
        DiagnosisLoRA,
        DiagnosisDataModule,
        command=given[0] if given else None,
        args=args,
        # A rerun in the same run folder must not abort on the config.yaml the previous run saved.
        save_config_kwargs={"overwrite": True},
        # A bad option raises ArgumentError, which `python -m healthai` reports as one line (healthai/__main__.py).
        parser_kwargs={"exit_on_error": False},
    )
