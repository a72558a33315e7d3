"""Adapters: what fit leaves (a PEFT ``adapter/`` folder, or a Lightning ``.ckpt``), and :class:`Adapter`, the one
object every command opens one with. It alone tells a folder from a ``.ckpt``, and answers the questions a command
asks about an adapter once: the base it records, the prompt it was trained with, where its tokenizer is, how it is
applied to a base, and its fingerprint.

A LoRA update is a difference against one set of base weights: applied to another base of the same shape it loads
without complaint and predicts nonsense. So every adapter records its base — the name or path as given, the absolute
folder it was found in, and :func:`healthai.provenance.base_fingerprint` — in ``base.json`` (a ``.ckpt`` holds the same
under ``checkpoint["healthai"]``), and predict, validate, export and serve refuse a base whose fingerprint differs
unless told otherwise (:meth:`Adapter.check_base`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

from healthai.errors import UserError
from healthai.prompts import PROMPT_FILE, PromptStyle
from healthai.provenance import base_fingerprint, resolve_model_dir, sha256_file

BASE_FILE = "base.json"
"""File inside an adapter folder that records the base model (see :func:`base_record`)."""

CKPT_KEY = "healthai"
"""Key of a Lightning checkpoint holding what :func:`base_record` and the prompt settings record for a folder."""

ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""Config fields recorded with the base, to say whether a mismatching base differs in shape or only in weights."""


class BaseMismatchError(UserError):
    """An adapter applied to a base other than its own: a user error (one line on stderr, exit status 2)."""


@lru_cache(maxsize=2)
def _load_checkpoint(path: str, mtime: float) -> dict[str, Any]:
    import torch

    # A checkpoint written by fit holds only adapter weights, optimizer state and plain Python values. The optimizer
    # state (twice the adapter's size) is never needed here, so it is not kept in the cache.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt.pop("optimizer_states", None)
    return ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, read once per file version (the data module, the model and the adapter saver all
    need it)."""
    path = Path(path)
    return _load_checkpoint(str(path.resolve()), path.stat().st_mtime)


# -- the adapter ------------------------------------------------------------------------------------------------------


def _warn(line: str) -> None:
    """One ``warning:`` line on stderr, from the first process only: every DDP/FSDP rank opens the adapter, and N
    copies of one warning would read as N problems. (Lightning sets the rank from the launcher's environment.)"""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"warning: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True, eq=False)
class Adapter:
    """An adapter folder or fit ``.ckpt``, checked to exist (:meth:`open`); what it records is read once, when first
    asked for.

    **The prompt rule** (every command: fit/validate/predict through the data module, export, serve): the prompt is
    the one the adapter saved — a folder's ``prompt.json``, a ``.ckpt``'s record. An adapter that saved none (a PEFT
    folder written by another tool) is used with the default :class:`~healthai.prompts.PromptStyle`, and one warning
    line on stderr names the adapter and says how to give it its own. An unreadable ``prompt.json`` is a
    :class:`~healthai.errors.UserError`.
    """

    path: Path
    """The folder or ``.ckpt`` file, as given (``~`` expanded)."""

    @classmethod
    def open(cls, path: str | Path, option: str = "--model.adapter_path") -> "Adapter":
        """The adapter at ``path``: an adapter folder (holding ``adapter_config.json``) or a ``.ckpt`` file; else
        FileNotFoundError, one line naming ``option``."""
        p = Path(path).expanduser()
        if p.name.endswith(".ckpt"):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such checkpoint file ({option})")
        elif not p.is_dir():
            raise FileNotFoundError(f"{p}: no such adapter folder ({option})")
        elif not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{p}: not an adapter folder (no adapter_config.json) nor a .ckpt written by fit "
                                    f"({option})")  # fmt: skip
        return cls(p)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def kind(self) -> Literal["folder", "checkpoint"]:
        """``checkpoint`` for a Lightning ``.ckpt`` written by fit, ``folder`` for a PEFT adapter folder."""
        return "checkpoint" if self.path.name.endswith(".ckpt") else "folder"

    @property
    def is_checkpoint(self) -> bool:
        return self.kind == "checkpoint"

    def _record(self) -> dict[str, Any]:
        """A ``.ckpt``'s ``checkpoint["healthai"]``: the base and prompt it records (empty for a folder)."""
        return (load_checkpoint(self.path).get(CKPT_KEY) or {}) if self.is_checkpoint else {}

    # -- the base -----------------------------------------------------------------------------------------------------

    @cached_property
    def base(self) -> Optional[dict[str, Any]]:
        """The base this adapter records (:func:`base_record`), or None when it records none (an adapter written
        before bases were recorded, or by another tool: only PEFT's ``base_model_name_or_path`` is then known)."""
        if self.is_checkpoint:
            return self._record().get("base")
        if (self.path / BASE_FILE).is_file():
            return _read_json(self.path / BASE_FILE)
        name = _read_json(self.path / "adapter_config.json").get("base_model_name_or_path")
        return {"name_or_path": name, "path": None, "fingerprint": None} if name else None

    def resolve_base(self, name_or_path: Optional[str], option: str) -> str:
        """The base to load: ``name_or_path`` (default: the one this adapter records), or — when that is a relative
        path that does not exist from here — the absolute folder the adapter recorded for the same name
        (:func:`resolve_base`)."""
        return resolve_base(name_or_path, option, self.base)

    def check_base(self, base: str, allow_mismatch: bool, flag: str,
                   fingerprint: Optional[str] = None) -> Optional[str]:  # fmt: skip
        """Refuse (:class:`BaseMismatchError`) this adapter on ``base`` when the fingerprint it records differs from
        ``base``'s; with ``allow_mismatch`` print the same line as a warning and go on. Returns the mismatch line, or
        None when the bases match or cannot be compared (no recorded fingerprint, or a hub id with no local copy).
        ``fingerprint``: ``base``'s, computed already (rank 0's, in a process group), else computed here."""
        recorded = self.base
        if recorded is None or not recorded.get("fingerprint"):
            return None
        actual = fingerprint if fingerprint is not None else base_fingerprint(base)
        if actual is None or actual == recorded["fingerprint"]:
            return None
        differs = "different weights"
        theirs = recorded.get("architecture") or {}
        folder = resolve_model_dir(base)
        if theirs and folder is not None and (folder / "config.json").is_file():
            ours = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            changed = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in ARCHITECTURE_FIELDS
                       if ours.get(k) != theirs.get(k)]  # fmt: skip
            differs = (f"a different architecture ({', '.join(changed)})" if changed
                       else "the same architecture, other weights")  # fmt: skip
        line = (f"adapter {self} was trained on base {recorded['name_or_path']} (fingerprint "
                f"{recorded['fingerprint']}); {base} (fingerprint {actual}) has {differs}")  # fmt: skip
        if not allow_mismatch:
            raise BaseMismatchError(f"{line}; pass {flag} true to apply it anyway")
        _warn(f"{line}; applying it anyway ({flag})")
        return line

    # -- what it carries besides its weights --------------------------------------------------------------------------

    @cached_property
    def prompt(self) -> PromptStyle:
        """The prompt this adapter was trained with, by the rule in the class docstring (the warning is printed once
        per opened adapter)."""
        try:
            if self.is_checkpoint:
                saved = self._record().get("prompt")
                if saved is not None:
                    return PromptStyle.from_dict(saved, f"{self} (its {CKPT_KEY!r} record)")
            elif (self.path / PROMPT_FILE).is_file():
                return PromptStyle.load(self.path)
        except ValueError as e:  # not JSON, unknown settings, a template without {case}
            raise UserError(str(e)) from None
        hint = ("not a checkpoint written by `healthai fit`?" if self.is_checkpoint else
                f"no {PROMPT_FILE}; if it was trained with another prompt, save that as {self.path / PROMPT_FILE}")
        _warn(f"adapter {self} records no prompt settings; using the default prompt ({hint})")
        return PromptStyle()

    @cached_property
    def budget(self):
        """The answer budget fit trained this adapter for (:class:`~healthai.generation.AnswerBudget`: a folder's
        ``answer_budget.json``, a ``.ckpt``'s record), or None when it records none (another tool's adapter, or an
        older one): then the settings' own budget, or the default, applies."""
        from healthai.generation import AnswerBudget

        if self.is_checkpoint:
            saved = self._record().get("budget")
            return None if saved is None else AnswerBudget.from_dict(saved, f"{self} (its {CKPT_KEY!r} record)")
        return AnswerBudget.load(self.path)

    def tokenizer_source(self, fallback: Optional[str]) -> Optional[str]:
        """Where to load the tokenizer from: the adapter folder's copy (saved by fit, the one it was trained with),
        else ``fallback`` (the base; a ``.ckpt`` holds no tokenizer)."""
        if not self.is_checkpoint and (self.path / "tokenizer_config.json").is_file():
            return str(self.path)
        return fallback

    def apply(self, base, is_trainable: bool = False):
        """``base`` with this adapter applied, as a PeftModel: from a PEFT folder, or from a fit checkpoint (its LoRA
        settings are the run's hyperparameters — variant included —, its state dict the adapter's weights; a PiSSA or
        OLoRA run's weights converted with the initial ones it records into the plain LoRA of the unmodified base,
        as fit saves its folder: :mod:`healthai.lora_variants`)."""
        from peft import LoraConfig, PeftModel, get_peft_model

        from healthai.lora_variants import MOVES_BASE, convert, converted_settings, lora_config_kwargs

        if not self.is_checkpoint:
            return PeftModel.from_pretrained(base, str(self.path), is_trainable=is_trainable)
        ckpt = load_checkpoint(self.path)
        hp = ckpt.get("hyper_parameters", {})
        weights = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        started = hp.get("adapter_path")
        if started and Path(started).is_dir():
            config = LoraConfig.from_pretrained(started)  # the run continued training that adapter folder
        else:
            r, alpha = hp["lora_r"], hp["lora_alpha"]
            variant, init = hp.get("lora_variant", "lora"), hp.get("lora_init", "default")
            if init in MOVES_BASE:  # trained against rewritten base weights: convert (see healthai.lora_variants)
                initial = self._record().get("initial_lora")
                if not initial:
                    raise UserError(f"{self}: a lora_init {init} checkpoint that records no initial weights (not "
                                    "written by `healthai fit`?): it cannot be applied to the unmodified base")
                weights = convert(weights, initial)
                (r, alpha), init = converted_settings(r, alpha, variant), "default"
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=hp["lora_dropout"],
                                target_modules=list(hp["target_modules"]), task_type="CAUSAL_LM",
                                **lora_config_kwargs(variant, init))  # fmt: skip
        model = get_peft_model(base, config)
        result = model.load_state_dict(weights, strict=False)
        lora = {n for n, _ in model.named_parameters() if "lora_" in n}
        if result.unexpected_keys or not lora or lora & set(result.missing_keys):
            raise UserError(f"{self}: its weights do not fit a LoRA adapter of r={config.r} on "
                            f"{sorted(config.target_modules)} (unexpected {result.unexpected_keys[:3]}, "
                            f"missing {sorted(lora & set(result.missing_keys))[:3]})")  # fmt: skip
        if not is_trainable:
            model.requires_grad_(False)
        return model

    @cached_property
    def fingerprint(self) -> str:
        """A content hash of the adapter: a ``.ckpt`` file's, or a folder's weights and LoRA config (what a
        predictions file's provenance compares)."""
        if self.is_checkpoint:
            return sha256_file(self.path)[:16]
        h = hashlib.sha256()
        for f in [self.path / "adapter_config.json", *sorted(self.path.glob("adapter_model*.safetensors"))]:
            if f.is_file():
                h.update(f.name.encode())
                h.update(sha256_file(f).encode())
        return h.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


# -- the base ---------------------------------------------------------------------------------------------------------


def base_record(name_or_path: str) -> dict[str, Any]:
    """What an adapter records about its base: the name or path as given, the absolute folder it was found in (so a
    run from another working directory still finds it), its fingerprint and its architecture."""
    folder = resolve_model_dir(name_or_path)
    record: dict[str, Any] = {"name_or_path": name_or_path, "path": str(folder) if folder else None,
                              "fingerprint": base_fingerprint(name_or_path)}  # fmt: skip
    if folder is not None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        record["architecture"] = {k: config.get(k) for k in ARCHITECTURE_FIELDS}
    return record


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def resolve_base(name_or_path: Optional[str], option: str, recorded: Optional[dict[str, Any]] = None) -> str:
    """The base to load: ``name_or_path`` (default: ``recorded["name_or_path"]``, the base an adapter records), or —
    when that is a relative path that does not exist from here — the absolute folder ``recorded`` holds for the same
    name. With an adapter, call :meth:`Adapter.resolve_base`.

    Raises FileNotFoundError naming ``option`` when neither is found.
    """
    given = name_or_path if name_or_path is not None else (recorded or {}).get("name_or_path")
    if given is None:
        raise UserError(f"no base model: pass {option}")
    if Path(given).expanduser().is_dir():
        return given
    same = recorded is not None and recorded.get("name_or_path") == given
    if same and recorded.get("path") and Path(recorded["path"]).is_dir():
        return recorded["path"]
    # A hub id looks like a relative path (org/name); the adapter's record tells a local folder from a hub snapshot.
    was_local = same and recorded.get("path") and "models--" not in recorded["path"]
    if _looks_like_hub_id(given) and not was_local:
        from healthai.hub import check_hub_model

        # A hub id: transformers finds it in the cache or downloads it, once the hub is known to have it (no minutes
        # of retries offline, #29 item 13).
        check_hub_model(given, option)
        return given
    where = f" (the adapter recorded it at {recorded['path']}, which is gone too)" if same and recorded.get("path") else ""
    raise FileNotFoundError(f"base model {given}: no such folder from {os.getcwd()}{where}; pass {option} PATH")


# -- the model card ---------------------------------------------------------------------------------------------------


def write_model_card(directory: str | Path, card: dict[str, Any], named: Optional[str | Path] = None) -> Path:
    """Write ``README.md`` into ``directory``: what this adapter is, how it was trained and on what, and how to use it.
    ``named``: the folder the commands it shows should name, when ``directory`` is a temporary one renamed to it."""
    path = Path(directory) / "README.md"
    directory = Path(named) if named is not None else Path(directory)
    base = card["base"]
    lines = [
        f"# {card['title']}",
        "",
        "A LoRA adapter written by `python -m healthai fit`: it answers a Chinese clinical case record with",
        '`{"diseases": "...", "reason": "..."}`.',
        "",
        f"- Base model: `{base['name_or_path']}` (found at `{base.get('path')}`, fingerprint `{base.get('fingerprint')}`)",
        f"- Weights: {card['which']}",
        "",
        "## Use",
        "",
        "```bash",
        f"python -m healthai predict --config configs/predict.yaml --model.model_name_or_path {base['name_or_path']} \\",
        f"  --model.adapter_path {directory} --data.predict_file RECORDS.jsonl --writer.output_path PREDICTIONS.jsonl",
        f"python -m healthai export --adapter {directory} --out MERGED_FOLDER",
        "```",
        "",
    ]
    for title, key in (("Validation metrics", "metrics"), ("LoRA", "lora"), ("Training", "training"),
                       ("Generation settings (validation)", "generation"), ("Package versions", "versions")):  # fmt: skip
        values = card.get(key)
        if values:
            lines += [f"## {title}", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in values.items()]
            lines.append("")
    if card.get("data"):
        lines += ["## Data", "", "| split | file | records used | sha256 |", "|---|---|---|---|"]
        lines += [f"| {d['split']} | `{d['file']}` | {d['records']} | `{d['sha256']}` |" for d in card["data"]]
        lines.append("")
    lines += ["## Prompt", "", "```json", json.dumps(card["prompt"], ensure_ascii=False, indent=2), "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    return str(value).replace("|", "\\|")
