"""``AdapterSaver``: the fit callback that leaves the run's adapter folders, each with a model card.

At the end of fit it writes ``adapter/`` — the best checkpoint by the monitored metric when a ModelCheckpoint monitors
one, else the last step — and, in the first case, ``adapter-last/`` with the last step's weights, next to the run's
TensorBoard events and config. The CLI adds it to every ``fit`` (:class:`healthai.cli.HealthAICLI`), as it adds
:class:`healthai.writer.DiagnosisWriter` to ``predict``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from healthai.atomic import atomic_folder


class AdapterSaver(Callback):
    """Write the trained LoRA adapter (best and last) with its tokenizer, prompt, base record and model card."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``adapter/`` (best or last) and, when a checkpoint monitors a metric, ``adapter-last/``; say which
        is which. Collective: every rank takes part."""
        if trainer.global_step == 0:  # stopped before its first step: the adapter would be its initialisation
            rank_zero_warn("WARNING: no optimizer step was taken: no adapter written (it would equal the base)")
            return
        # Every rank takes part: under FSDP this gathers the sharded weights; elsewhere it is a plain state_dict.
        state = trainer.strategy.lightning_module_state_dict()
        directory = adapter_dir(trainer)  # collective too: trainer.log_dir broadcasts rank zero's folder
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        trainable = pl_module.trainable_names()
        last = {k[len("model.") :]: v for k, v in state.items() if k in trainable}
        from healthai.finite import check_weights

        check_weights(last, step)  # never an adapter of NaNs (the last step's update may have made them)
        last_metrics = pl_module._val_metrics()
        best = monitored_best(trainer)
        if best is None:
            save_adapter(pl_module, directory, last, {"which": f"the last step ({step})", "metrics": last_metrics},
                         trainer)  # fmt: skip
            rank_zero_info(f"adapter saved to {directory} (last step {step}; no checkpoint monitors a metric)")
            return
        from healthai.adapter import CKPT_KEY, load_checkpoint

        callback, path = best
        ckpt = load_checkpoint(path)
        weights = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        score = float(callback.best_model_score)
        best_step = ckpt.get("global_step")
        which = f"best {callback.monitor} = {score:.4g} at step {best_step} (epoch {ckpt.get('epoch')}, {path})"
        best_metrics = ckpt.get(CKPT_KEY, {}).get("val_metrics") or {callback.monitor: score}
        save_adapter(pl_module, directory, weights, {"which": which, "metrics": best_metrics}, trainer)
        last_dir = adapter_dir(trainer, "adapter-last")
        save_adapter(pl_module, last_dir, last, {"which": f"the last step ({step})", "metrics": last_metrics}, trainer)
        rank_zero_info(f"adapter saved to {directory}: {which}")
        rank_zero_info(f"last step's adapter saved to {last_dir} (step {step})")


def adapter_dir(trainer: L.Trainer, name: str = "adapter") -> Path:
    """``<run folder>/<name>``: next to the TensorBoard events and config of this run. Call it on every rank."""
    run_dir = trainer.log_dir or trainer.default_root_dir
    return Path(run_dir) / name


def monitored_best(trainer: L.Trainer) -> Optional[tuple[Any, Path]]:
    """``(callback, path)`` of the best checkpoint of the first ModelCheckpoint that monitors a metric, or None."""
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "best_model_path", "")
        if getattr(callback, "monitor", None) and path and Path(path).is_file():
            return callback, Path(path)
    return None


def save_adapter(module, directory: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None,
                 card: Optional[dict[str, Any]] = None, trainer: Optional[L.Trainer] = None) -> Path:  # fmt: skip
    """Write ``module``'s PEFT adapter (a :class:`~healthai.model.DiagnosisLoRA`; from ``state_dict`` if given, e.g.
    gathered under FSDP), the tokenizer, the prompt settings, the answer budget (``answer_budget.json``), the base it
    was trained on (``base.json``) and a model card (``README.md``, with ``trainer``'s settings and data when given) to ``directory``."""
    final = Path(directory)
    # A temporary folder renamed over adapter/ at the end (#29 item 6): a full disk or a kill mid-save leaves the
    # previous adapter whole (or none), never one whose weights and base.json belong to different saves.
    with atomic_folder(final) as directory:
        _write_adapter(module, directory, final, state_dict, card, trainer)
    return final


def _write_adapter(module, directory: Path, final: Path, state_dict: Optional[dict[str, torch.Tensor]],
                   card: Optional[dict[str, Any]], trainer: Optional[L.Trainer]) -> None:  # fmt: skip
    """The files of :func:`save_adapter`, written into ``directory`` (the temporary folder of ``final``)."""
    from healthai.adapter import BASE_FILE, write_model_card

    module.model.save_pretrained(directory, state_dict=state_dict)
    initial = getattr(module, "_initial_lora", None)
    if initial is not None:  # PiSSA / OLoRA: saved as the plain LoRA of the unmodified base (healthai.lora_variants)
        from healthai.lora_variants import convert_saved

        convert_saved(directory, initial)
    module.tokenizer.save_pretrained(directory)
    prompt = module._prompt()
    prompt.save(directory)
    if module.answer_budget is not None:  # the budget the labels were checked against (validate/predict/serve use it)
        module.answer_budget.save(directory)
    base = module.base_record()
    (directory / BASE_FILE).write_text(json.dumps(base, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    card = dict(card or {})
    card.setdefault("title", f"HealthAI LoRA adapter ({final.name})")
    card.setdefault("which", "as saved")
    facts = card_facts(module, trainer)
    write_model_card(directory, {**facts, **card, "base": base, "prompt": dataclasses.asdict(prompt)}, named=final)


def card_facts(module, trainer: Optional[L.Trainer] = None) -> dict[str, Any]:
    """Hyperparameters, data files and versions for the model card of ``module`` trained by ``trainer``."""
    from healthai.provenance import package_versions, sha256_file

    hp = dict(module.hparams)
    lora_keys = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_variant", "lora_init")
    lora = {k: hp.get(k) for k in lora_keys}
    if getattr(module, "_initial_lora", None) is not None:
        lora["saved_as"] = "a plain LoRA of rank 2 x lora_r on the unmodified base (converted from the trained one)"
    facts: dict[str, Any] = {
        "lora": lora,
        "generation": dataclasses.asdict(module.generation),
        "versions": package_versions("healthai", "torch", "transformers", "peft", "lightning", "xgrammar"),
    }
    training = {k: v for k, v in hp.items() if k not in lora_keys and k != "generation" and not k.startswith("_")}
    datamodule = None
    if trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
        training.update(max_epochs=trainer.max_epochs, max_steps=trainer.max_steps,
                        accumulate_grad_batches=trainer.accumulate_grad_batches,
                        precision=str(trainer.precision), devices=trainer.world_size,
                        optimizer_steps=trainer.global_step, epochs_done=trainer.current_epoch)  # fmt: skip
    if datamodule is not None:
        training.update(batch_size=getattr(datamodule, "batch_size", None),
                        max_length=getattr(datamodule, "max_length", None),
                        seed=getattr(datamodule, "seed", None))  # fmt: skip
        data = []
        for split, file, dataset in (("train", datamodule.train_file, datamodule.train_set),
                                     ("validation", datamodule.val_file, datamodule.val_set)):  # fmt: skip
            if file is not None and dataset is not None and Path(file).is_file():
                data.append({"split": split, "file": str(Path(file).resolve()), "records": len(dataset),
                             "sha256": sha256_file(file)})  # fmt: skip
        if datamodule.val_file is None and datamodule.val_set is not None:
            data.append({"split": f"validation ({datamodule.val_fraction:g} of train, seed {datamodule.seed})",
                         "file": str(Path(datamodule.train_file).resolve()), "records": len(datamodule.val_set),
                         "sha256": sha256_file(datamodule.train_file)})  # fmt: skip
        facts["data"] = data
    facts["training"] = training
    return facts
