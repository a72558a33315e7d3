"""LightningCLI for ``fit``, ``validate`` and ``predict``: it builds objects and runs them, nothing else."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from healthai.adapter_saver import AdapterSaver
from healthai.data import DiagnosisDataModule
from healthai.errors import PositiveInt, check_value
from healthai.model import DiagnosisLoRA
from healthai.writer import DiagnosisWriter


class HealthAICLI(LightningCLI):
    """LightningCLI with the project's links between model and data, the adapter saver on ``fit`` and the prediction
    writer on ``predict``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Written once: the data module tokenises with the model's tokenizer, and takes the adapter's saved prompt.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_path")
        parser.link_arguments("model.adapter_path", "data.adapter_path")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # `--writer.output_path OUT.jsonl`; LightningCLI appends the callback to the trainer's.
            parser.add_lightning_class_args(DiagnosisWriter, "writer")
        return parser

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            # Always on, not an option: a fit that leaves no adapter/ folder has nothing for predict or export.
            trainer.callbacks.append(AdapterSaver())
        return trainer

    def before_instantiate_classes(self) -> None:
        # Lightning's signature says int and it takes 0, to fail later with a ZeroDivisionError after the model has
        # loaded; its type is not ours to declare, so the same check is made here.
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_value("trainer.accumulate_grad_batches", config.trainer.accumulate_grad_batches, PositiveInt)

    def before_fit(self) -> None:
        from healthai.resume import check_last_checkpoint

        # Lightning only warns when `--ckpt_path last` finds no last.ckpt, and trains from scratch.
        check_last_checkpoint(self.trainer, self.config["fit"].get("ckpt_path"))

    def before_predict(self) -> None:
        # Rows are streamed to disk by the writer; holding every prediction in memory too would defeat that.
        self.trainer.predict_loop.return_predictions = False


def cli_main(args: Optional[list[str]] = None) -> HealthAICLI:
    return HealthAICLI(
        DiagnosisLoRA,
        DiagnosisDataModule,
        args=args,
        # A rerun in the same run folder must not abort on the config.yaml the previous run saved.
        save_config_kwargs={"overwrite": True},
        # A bad option raises ArgumentError, which `python -m healthai` reports as one line (healthai/__main__.py).
        parser_kwargs={"exit_on_error": False},
    )
