"""A base model named by something that is not a local folder: found in the Hugging Face cache, or checked against
the hub once, briefly, before transformers is asked for it (#29 item 13).

transformers takes any name that is not a folder for a hub id, and without network it retries for minutes
(``Retrying in 8s``) before a 30-frame ``OSError``; a mistyped folder (``models/Qwen2.5-7B`` in a clone with no
``models/``) ends the same way. Here such a name is one line naming the option, the folder looked for and the download
command, after at most one short request to the hub (none when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

from healthai.errors import ConfigError

HUB_TIMEOUT_S = 10.0
"""The one request's time limit: a reachable hub answers in well under a second."""

DEFAULT_DOWNLOAD = "Qwen/Qwen2.5-7B-Instruct"
"""What the download command suggests for a folder whose name says nothing of the model."""


def download_command(name: str) -> str:
    """The ``scripts/download_model.py`` command that fills the folder ``name`` (for a hub id: ``models/<name>``)."""
    path = Path(name)
    hub_shaped = not path.is_absolute() and len(path.parts) == 2 and not Path(path.parts[0]).is_dir()
    repo = name if hub_shaped and path.parts[0] != "models" else (
        f"Qwen/{path.name}" if path.name.lower().startswith("qwen") else DEFAULT_DOWNLOAD)
    out = f"models/{path.name}" if hub_shaped else name
    return f"python scripts/download_model.py --model {repo} --out {out}"


def missing_model(name: str, option: str, why: str) -> ConfigError:
    """The one line for a model that is neither a local folder nor to be had from the hub."""
    looked = Path(name).expanduser().absolute()
    return ConfigError(f"{option}: no such model folder: {name} (looked for {looked}){why}; download it first: "
                       f"{download_command(name)}")  # fmt: skip


def offline() -> bool:
    """Whether the user turned the hub off (huggingface_hub reads these at import; read here at the call)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip


def check_hub_model(name: str, option: str) -> None:
    """Return when ``name`` is a local folder, a model in the hub cache, or a model the hub has; else raise
    :class:`ConfigError` naming ``option``, the folder looked for and the download command."""
    if Path(name).expanduser().is_dir():
        return
    why = _hub_answer(name, offline())
    if why is not None:
        raise missing_model(name, option, why)


@lru_cache(maxsize=8)
def _hub_answer(name: str, hub_off: bool) -> Optional[str]:
    """None when the hub cache or the hub has ``name``; else why not (asked once per process, name and offline
    setting: the data module, the model and the base record all resolve the same base)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
    except HFValidationError:
        return ", and it cannot be a hub id either"
    if hub_off:
        return ", and the hub is off (HF_HUB_OFFLINE), so it cannot be fetched as a hub id"
    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        return ", and the hub has no model of that name"
    except HfHubHTTPError:
        return None  # gated or private: the hub knows it; transformers says what access it needs
    except Exception as e:  # noqa: BLE001 — no network, DNS, proxy, timeout: whatever stops the one request
        return f", and the hub cannot be reached to fetch it as a hub id ({type(e).__name__})"
    return None
