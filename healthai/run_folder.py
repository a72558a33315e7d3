"""A fit's run folder (``<save_dir>/<name>/version_N``: TensorBoard events, ``config.yaml``, ``adapter/``): one per
run, from its first step to its last.

* Every checkpoint records the folder of the run that wrote it (:class:`RunFolderRecorder`), so ``fit --ckpt_path``
  continues writing into that folder instead of opening a new ``version_N`` (:func:`resume_in_run_folder`): its curves
  go on in one TensorBoard run and its adapter lands where the first part's config is.
* A fit refused before its first step (bad records, a label over the budget, a resume that does not match) leaves no
  folder behind (:func:`remove_refused_run`): TensorBoard would list it as a run.
* A finished fit writes ``predict.yaml`` next to its adapter — the predict settings of this run (base, dtype,
  accelerator, lengths, adapter) — and prints the command that uses it (:func:`write_predict_config`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from healthai.atomic import write_text

CKPT_KEY = "healthai_run"
"""The checkpoint entry that names the run folder which wrote it."""

LIGHTNING_FILES = ("config.yaml", "hparams.yaml")
"""What Lightning writes into a run folder before the first step, besides TensorBoard's event files."""


class RunFolderRecorder(Callback):
    """Records the run folder in every checkpoint fit writes (added by the CLI to every ``fit``)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        folder = run_folder(trainer)
        if folder is not None:
            checkpoint[CKPT_KEY] = {"log_dir": str(folder.resolve())}


def run_folder(trainer: L.Trainer) -> Optional[Path]:
    """The run folder of this process's first logger (no collective call, unlike ``trainer.log_dir``), or None."""
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(log_dir) if log_dir else None


def resume_in_run_folder(trainer: L.Trainer, ckpt_path: Optional[str]) -> None:
    """Before ``fit --ckpt_path``: make a TensorBoard logger that was given no version write into the folder of the
    run that wrote the checkpoint, when that folder lies under the logger's own ``save_dir/name``. Call it before
    anything reads the logger's ``log_dir``. A checkpoint from elsewhere (another tool, another save_dir) starts a new
    version folder, as before."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = trainer.logger
    if not isinstance(logger, TensorBoardLogger) or logger._version is not None:  # noqa: SLF001 (an explicit version)
        return
    path = checkpoint_file(trainer, ckpt_path)
    if path is None:
        return
    from healthai.adapter import load_checkpoint

    recorded = load_checkpoint(path).get(CKPT_KEY, {}).get("log_dir")
    if not recorded:
        return
    recorded = Path(recorded)
    if recorded.parent != Path(logger.root_dir).resolve():
        rank_zero_info(f"--ckpt_path {path} was written by the run in {recorded}, not under this logger's "
                       f"{logger.root_dir}: this run gets a new folder")  # fmt: skip
        return
    # TensorBoardLogger reads a version given as a string as the folder's name (version_3, or a name of the user's).
    logger._version = recorded.name  # noqa: SLF001 (the constructor argument, set before any log_dir is read)
    rank_zero_info(f"resuming in the run folder {Path(logger.log_dir)}")


def checkpoint_file(trainer: L.Trainer, ckpt_path: Optional[str]) -> Optional[Path]:
    """The file ``--ckpt_path`` names: a path as given, or ``last`` resolved as Lightning resolves it (the newest
    ``last*.ckpt`` of the ModelCheckpoint callbacks); None for anything else (``best``, ``hpc``, none)."""
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        path = Path(ckpt_path)
        return path if path.is_file() else None
    from lightning.pytorch.callbacks import ModelCheckpoint

    found = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)  # noqa: SLF001 (Lightning's own rule for `last`)
    files = [Path(f) for f in found if Path(f).is_file()]
    return max(files, key=lambda f: f.stat().st_mtime) if files else None


def remove_refused_run(folder: Optional[Path], existed: bool) -> None:
    """After a fit refused before its first step: remove the run folder this run created, if it holds only what
    Lightning writes at start (its config, hparams and empty TensorBoard event files). Anything else is kept."""
    if folder is None or existed or not folder.is_dir():
        return
    for item in folder.iterdir():
        if not (item.is_file() and (item.name in LIGHTNING_FILES or item.name.startswith("events.out.tfevents."))):
            return
    shutil.rmtree(folder, ignore_errors=True)


PREDICT_TRAINER = ("accelerator", "precision", "default_root_dir")
"""The fit's trainer settings that predict takes over (one device: predict's own rule for several is ddp)."""

INFERENCE_PRECISION = {"bf16-mixed": "bf16-true", "16-mixed": "16-true"}
"""Mixed precision trains fp32 LoRA weights on a low-precision base; predict runs the base in that precision."""


PREDICT_MODEL = ("model_name_or_path", "dtype", "attn_implementation", "quantization", "liger_kernel",
                 "merge_for_inference", "allow_base_mismatch", "generation")  # fmt: skip
"""The fit's model settings that predict uses (the LoRA and training ones are the adapter's, or unused)."""

PREDICT_DATA = ("max_length", "eval_batch_size", "on_bad_record", "pad_to_multiple_of", "num_workers")
"""The fit's data settings that predict uses (the prompt is the adapter's)."""


def write_predict_config(folder: Path, fit_config: dict[str, Any], adapter: Path) -> Path:
    """Write ``folder/predict.yaml``: the fit's model and data settings with ``adapter`` applied, the answer budget
    the adapter's, greedy JSON-constrained decoding, predictions written to ``folder/predictions.jsonl``."""
    import yaml

    trainer = {k: fit_config["trainer"][k] for k in PREDICT_TRAINER if fit_config["trainer"].get(k) is not None}
    if trainer.get("precision") in INFERENCE_PRECISION:
        trainer["precision"] = INFERENCE_PRECISION[trainer["precision"]]
    trainer.update(devices=1, logger=False, enable_progress_bar=False)
    model = {k: fit_config["model"][k] for k in PREDICT_MODEL if k in fit_config["model"]}
    model.update(adapter_path=str(adapter), gradient_checkpointing=False)
    model["generation"] = dict(model.get("generation") or {}, max_new_tokens=None)  # the adapter's budget
    data = {k: fit_config["data"][k] for k in PREDICT_DATA if k in fit_config["data"]}
    data["predict_file"] = fit_config["data"].get("val_file") or fit_config["data"]["train_file"]
    config = {"trainer": trainer, "model": model, "data": data,
              "writer": {"output_path": str(folder / "predictions.jsonl")}}  # fmt: skip
    path = folder / "predict.yaml"
    header = (f"# python -m healthai predict --config {path} --data.predict_file RECORDS.jsonl\n"
              "# Written by fit: this run's base, settings and adapter. --writer.output_path to write elsewhere.\n")
    write_text(path, header + yaml.safe_dump(config, allow_unicode=True, sort_keys=False))  # whole or not at all
    return path
