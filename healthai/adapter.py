"""Adapters: what fit leaves (a PEFT ``adapter/`` folder, or a Lightning ``.ckpt``), the base each one records, and the
check that an adapter is applied to the base it was trained on.

A LoRA update is a difference against one set of base weights: applied to another base of the same shape it loads
without complaint and predicts nonsense. So every adapter records its base — the name or path as given, the absolute
folder it was found in, and :func:`healthai.provenance.base_fingerprint` — in ``base.json`` (a ``.ckpt`` holds the same
under ``checkpoint["healthai"]``), and predict, validate and export refuse a base whose fingerprint differs unless told
otherwise.
"""

from __future__ import annotations

import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from healthai.errors import UserError
from healthai.prompts import PromptStyle
from healthai.provenance import base_fingerprint, resolve_model_dir

BASE_FILE = "base.json"
"""File inside an adapter folder that records the base model (see :func:`base_record`)."""

CKPT_KEY = "healthai"
"""Key of a Lightning checkpoint holding what :func:`base_record` and the prompt settings record for a folder."""

ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""Config fields recorded with the base, to say whether a mismatching base differs in shape or only in weights."""


class BaseMismatchError(UserError):
    """An adapter applied to a base other than its own: a user error (one line on stderr, exit status 2)."""


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` names a Lightning checkpoint file rather than an adapter folder."""
    return str(path).endswith(".ckpt")


def check_adapter_path(path: str | Path, option: str = "--model.adapter_path") -> Path:
    """``path`` as a Path if it is an adapter folder or a ``.ckpt`` file; else FileNotFoundError naming ``option``."""
    p = Path(path).expanduser()
    if is_checkpoint(p):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such checkpoint file ({option})")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such adapter folder ({option})")
    if not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{p}: not an adapter folder (no adapter_config.json) nor a .ckpt written by fit "
                                f"({option})")  # fmt: skip
    return p


@lru_cache(maxsize=2)
def _load_checkpoint(path: str, mtime: float) -> dict[str, Any]:
    import torch

    # A checkpoint written by fit holds only adapter weights, optimizer state and plain Python values. The optimizer
    # state (twice the adapter's size) is never needed here, so it is not kept in the cache.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt.pop("optimizer_states", None)
    return ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, read once per file version (the data module and the model both need it)."""
    path = Path(path)
    return _load_checkpoint(str(path.resolve()), path.stat().st_mtime)


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


def recorded_base(adapter: str | Path) -> Optional[dict[str, Any]]:
    """The base an adapter folder or ``.ckpt`` records, or None when it records none (an adapter written before
    bases were recorded, or by another tool: only PEFT's ``base_model_name_or_path`` is then known)."""
    adapter = Path(adapter)
    if is_checkpoint(adapter):
        return load_checkpoint(adapter).get(CKPT_KEY, {}).get("base")
    if (adapter / BASE_FILE).is_file():
        return json.loads((adapter / BASE_FILE).read_text(encoding="utf-8"))
    config = adapter / "adapter_config.json"
    if config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if name:
            return {"name_or_path": name, "path": None, "fingerprint": None}
    return None


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def resolve_base(name_or_path: Optional[str], adapter: Optional[str | Path], option: str) -> str:
    """The base to load: ``name_or_path`` (default: the one the adapter records), or — when that is a relative path
    that does not exist from here — the absolute folder the adapter recorded for the same name.

    Raises FileNotFoundError naming ``option`` when neither is found.
    """
    recorded = recorded_base(adapter) if adapter is not None else None
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
        return given  # a hub id: transformers finds it in the cache or downloads it
    where = f" (the adapter recorded it at {recorded['path']}, which is gone too)" if same and recorded.get("path") else ""
    raise FileNotFoundError(f"base model {given}: no such folder from {os.getcwd()}{where}; pass {option} PATH")


def check_base(adapter: str | Path, base: str, allow_mismatch: bool, flag: str) -> Optional[str]:
    """Refuse (:class:`BaseMismatchError`) an adapter whose recorded base fingerprint differs from ``base``'s; with
    ``allow_mismatch`` print the same line as a warning and go on. Returns the mismatch line, or None when the bases
    match or cannot be compared (no recorded fingerprint, or a hub id with no local copy)."""
    recorded = recorded_base(adapter)
    if recorded is None or not recorded.get("fingerprint"):
        return None
    actual = base_fingerprint(base)
    if actual is None or actual == recorded["fingerprint"]:
        return None
    differs = "different weights"
    theirs = recorded.get("architecture") or {}
    folder = resolve_model_dir(base)
    if theirs and folder is not None and (folder / "config.json").is_file():
        ours = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        changed = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in ARCHITECTURE_FIELDS if ours.get(k) != theirs.get(k)]
        differs = f"a different architecture ({', '.join(changed)})" if changed else "the same architecture, other weights"
    line = (f"adapter {adapter} was trained on base {recorded['name_or_path']} (fingerprint {recorded['fingerprint']}); "
            f"{base} (fingerprint {actual}) has {differs}")  # fmt: skip
    if not allow_mismatch:
        raise BaseMismatchError(f"{line}; pass {flag} true to apply it anyway")
    print(f"warning: {line}; applying it anyway ({flag})", file=sys.stderr, flush=True)
    return line


# -- what an adapter carries besides its weights ----------------------------------------------------------------------


def load_prompt(adapter: str | Path) -> PromptStyle:
    """The prompt settings an adapter was trained with (``prompt.json`` of a folder, or a ``.ckpt``'s record)."""
    if is_checkpoint(adapter):
        saved = load_checkpoint(adapter).get(CKPT_KEY, {}).get("prompt")
        if saved is None:
            raise UserError(f"{adapter}: records no prompt settings; was it written by `healthai fit`?")
        return PromptStyle(**saved)
    return PromptStyle.load(adapter)


def tokenizer_source(adapter: Optional[str | Path], fallback: Optional[str]) -> Optional[str]:
    """Where to load the tokenizer from: the adapter folder's copy (saved by fit), else ``fallback`` (the base)."""
    if adapter is not None and not is_checkpoint(adapter) and (Path(adapter) / "tokenizer_config.json").is_file():
        return str(adapter)
    return fallback


def apply_adapter(base, adapter: str | Path, is_trainable: bool = False):
    """``base`` with the adapter applied, as a PeftModel: from a PEFT folder, or from a fit checkpoint (its LoRA
    settings are the run's hyperparameters, its state dict the adapter's weights)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if not is_checkpoint(adapter):
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=is_trainable)
    ckpt = load_checkpoint(adapter)
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("adapter_path") and not is_checkpoint(hp["adapter_path"]) and Path(hp["adapter_path"]).is_dir():
        config = LoraConfig.from_pretrained(hp["adapter_path"])  # the run continued training that adapter
    else:
        config = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                            target_modules=list(hp["target_modules"]), task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, config)
    weights = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    result = model.load_state_dict(weights, strict=False)
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    if result.unexpected_keys or not lora or lora & set(result.missing_keys):
        raise UserError(f"{adapter}: its weights do not fit a LoRA adapter of r={config.r} on {sorted(config.target_modules)}"
                         f" (unexpected {result.unexpected_keys[:3]}, missing {sorted(lora & set(result.missing_keys))[:3]})")
    if not is_trainable:
        model.requires_grad_(False)
    return model


# -- the model card ---------------------------------------------------------------------------------------------------


def write_model_card(directory: str | Path, card: dict[str, Any]) -> Path:
    """Write ``README.md``: what this adapter is, how it was trained and on what, and how to use it."""
    directory = Path(directory)
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
    path = directory / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    return str(value).replace("|", "\\|")
