"""``fit --ckpt_path``: what a checkpoint must match to be resumed, and the refusals (one line each) when it does not.

A checkpoint's loader position (epoch, batches handed out) only means something in the layout that produced it: the
number of processes, the batch size, the accumulation, the sampler's settings and seed, and the training records
themselves (which also decide a ``val_fraction`` split). So the position is saved with that layout
(:func:`training_layout`), and a resume in another layout is refused naming what changed (:func:`layout_changes`)
unless ``data.allow_layout_change`` accepts the change (the epoch's order is then drawn again in the new layout).

The adapter a checkpoint holds is a difference against one base, for one LoRA configuration and one prompt: the
checkpoint records all three (``checkpoint["healthai"]``), and a resume onto others is refused
(:func:`check_checkpoint_matches`). Every trainable weight must come back from the checkpoint
(:func:`check_all_restored`): Lightning loads it with ``strict=False`` (it holds no base weights), which would otherwise
accept a checkpoint whose LoRA names do not match and train on from a fresh initialisation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence

from healthai.errors import ConfigError, UserError
from healthai.records import id_key

LAYOUT_OPTIONS = {
    "world_size": "processes (trainer.devices × trainer.num_nodes)",
    "batch_size": "data.batch_size",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "mega_batch_mult": "data.mega_batch_mult",
    "seed": "data.seed",
    "train": "training records (ids and token lengths: data.train_file, data.max_length, the validation split)",
    "val": "validation records (data.val_file, or data.val_fraction / data.seed of the split)",
}
"""Each field of a saved layout and what the user changes to change it (named in the refusal)."""

LAYOUT_OPTION = "--data.allow_layout_change true"
"""The option that accepts a changed layout."""


class ResumeRefused(UserError, ValueError):
    """A checkpoint or an output cannot be continued by this run; the message says what differs and what to do."""


def records_digest(items: Sequence[Any]) -> dict[str, Any]:
    """``{"records": n, "sha256": ...}`` of a list of JSON-able items (ids compared by :func:`id_key`)."""
    text = json.dumps(list(items), ensure_ascii=False, separators=(",", ":"))
    return {"records": len(items), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def training_layout(datamodule, trainer) -> dict[str, Any]:
    """What the training loader's position depends on: processes, batch size, accumulation, sampler settings, seed,
    the training records (ids and token lengths, in order) and the validation ids."""
    train = datamodule.train_set.examples if datamodule.train_set is not None else []
    val = datamodule.val_set.examples if datamodule.val_set is not None else []
    return {
        "world_size": trainer.world_size,
        "batch_size": datamodule.batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "mega_batch_mult": datamodule.mega_batch_mult,
        "seed": datamodule.seed,
        "train": records_digest([[id_key(e["id"]), len(e["input_ids"])] for e in train]),
        "val": records_digest([id_key(e["id"]) for e in val]),
    }


def layout_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's layout and this run's, in words (empty: the same layout)."""
    out = []
    for key, option in LAYOUT_OPTIONS.items():
        before, after = saved.get(key), now.get(key)
        if before == after:
            continue
        if isinstance(before, dict) or isinstance(after, dict):
            before, after = (f"{d.get('records')} [{d.get('sha256')}]" if d else None for d in (before, after))
        out.append(f"{option} {before}, now {after}")
    return out


def check_layout(saved: Optional[dict[str, Any]], now: dict[str, Any], ckpt: Any, allow: bool) -> None:
    """Refuse (:class:`ResumeRefused`) to resume a loader position saved in another layout; with ``allow`` only warn.
    A checkpoint that saved no layout (written before layouts were saved) is not compared."""
    if not saved:
        return
    changes = layout_changes(saved, now)
    if not changes:
        return
    what = "; ".join(changes)
    if not allow:
        raise ResumeRefused(f"--ckpt_path {ckpt} was written in another training layout ({what}): its position in the "
                            f"epoch would skip or repeat records here; resume with the checkpoint's settings, or pass "
                            f"{LAYOUT_OPTION} to draw the epoch's order again in this layout")  # fmt: skip
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(f"WARNING: --ckpt_path {ckpt} was written in another training layout ({what}); {LAYOUT_OPTION}: "
                   "the epoch's order is drawn again in this layout and the run goes on at the checkpoint's batch "
                   "count, so this epoch may repeat or miss records (later epochs are whole)")  # fmt: skip


LORA_DEFAULTS = {"variant": "lora", "init": "default"}
"""What a checkpoint written before the LoRA variants were recorded was trained with."""


def lora_settings(peft_model) -> dict[str, Any]:
    """The LoRA configuration that gives an adapter's weights their meaning: rank, alpha, target modules, variant
    (``lora``, ``dora``, ``rslora``) and initialisation (:mod:`healthai.lora_variants`)."""
    from healthai.lora_variants import init_of, variant_of

    config = peft_model.peft_config["default"]
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "variant": variant_of(config), "init": init_of(config)}  # fmt: skip


def check_checkpoint_matches(recorded: dict[str, Any], base: dict[str, Any], lora: dict[str, Any],
                             prompt: dict[str, Any], ckpt: Any, allow_base_mismatch: bool) -> None:  # fmt: skip
    """Refuse to resume a checkpoint trained on another base (by fingerprint), with other LoRA settings or another
    prompt. ``recorded`` is the checkpoint's ``checkpoint["healthai"]``; what it does not record is not compared."""
    old_base = recorded.get("base") or {}
    if old_base.get("fingerprint") and base.get("fingerprint") and old_base["fingerprint"] != base["fingerprint"]:
        line = (f"--ckpt_path {ckpt} was trained on base {old_base.get('name_or_path')} (fingerprint "
                f"{old_base['fingerprint']}); {base.get('name_or_path')} has fingerprint "
                f"{base['fingerprint']}")  # fmt: skip
        if not allow_base_mismatch:
            raise ResumeRefused(f"{line}; resume with its base, or pass --model.allow_base_mismatch true")
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"WARNING: {line}; resuming anyway (--model.allow_base_mismatch)")
    old_lora = {**LORA_DEFAULTS, **recorded["lora"]} if recorded.get("lora") else None
    if old_lora:
        changed = [f"{k} {old_lora.get(k)!r}, now {lora.get(k)!r}" for k in sorted(set(old_lora) | set(lora))
                   if old_lora.get(k) != lora.get(k)]  # fmt: skip
        if changed:
            raise ResumeRefused(f"--ckpt_path {ckpt} holds a LoRA adapter of other settings ({'; '.join(changed)}); "
                                "resume with the checkpoint's model.lora_* / model.target_modules")  # fmt: skip
    old_prompt = recorded.get("prompt")
    if old_prompt is not None and old_prompt != prompt:
        fields = sorted(k for k in set(old_prompt) | set(prompt) if old_prompt.get(k) != prompt.get(k))
        names = ", ".join(f"prompt.{k}" for k in fields)
        raise ResumeRefused(f"--ckpt_path {ckpt} was trained with another prompt ({names} differs); resume with the "
                            "checkpoint's --data.prompt settings")  # fmt: skip


def check_all_restored(saved: Sequence[str], trainable: set[str], ckpt: Any) -> None:
    """Refuse a checkpoint that does not restore every trainable weight (or holds weights this model lacks): loading
    it non-strictly would continue from freshly initialised LoRA weights with the old optimizer state."""
    saved = set(saved)
    missing, unexpected = sorted(trainable - saved), sorted(saved - trainable)
    if not missing and not unexpected:
        return
    extra = f"; it holds {len(unexpected)} weight(s) this model lacks (e.g. {unexpected[0]})" if unexpected else ""
    example = f" (e.g. {missing[0]})" if missing else ""
    restored = len(trainable) - len(missing)
    raise ResumeRefused(f"--ckpt_path {ckpt} restores {restored} of the {len(trainable)} trainable weights: "
                        f"{len(missing)} not restored{example}{extra}; was it written by another PEFT version or with "
                        "other LoRA settings?")  # fmt: skip


def check_last_checkpoint(trainer, ckpt_path: Any) -> None:
    """``--ckpt_path last`` with no ``last.ckpt`` anywhere: Lightning warns and trains from scratch, which is never
    what a rerun that asks to resume means."""
    if ckpt_path != "last":
        return
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    found = set().union(*(cb._find_last_checkpoints(trainer) for cb in callbacks)) if callbacks else set()
    if not found:
        where = sorted({str(cb.dirpath) for cb in callbacks if cb.dirpath}) or ["(no ModelCheckpoint with save_last)"]
        raise ResumeRefused(f"--ckpt_path last: no last.ckpt in {', '.join(where)}; run without --ckpt_path to start "
                            "a new run, or pass the checkpoint's path")  # fmt: skip


def check_max_steps(trainer) -> None:
    """``trainer.max_steps 0`` trains nothing and Lightning ends at once, without a word about the adapter."""
    if trainer.max_steps == 0:
        raise ConfigError("trainer.max_steps 0 takes no optimizer step, so fit would write no adapter; use a positive "
                          "max_steps (or -1 for max_epochs), or `healthai validate` to score a model")  # fmt: skip
