"""The user's errors: what ``python -m healthai`` reports as one line (``healthai <command>: error: ...``), exit 2.

Raise :class:`UserError` (or :class:`ConfigError` for a bad option value) for anything the user can fix by changing
a file, a path or an option; the message must name that file (and line) or option. Everything else is a bug and keeps
its traceback. ``HEALTHAI_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class UserError(Exception):
    """An error the user can fix; the message names the file (and line) or the option, and says what is wrong."""


class ConfigError(UserError, ValueError):
    """An option has a value that cannot work (``batch_size 0``); the message names the option."""


def check_at_least(option: str, value: Any, minimum: int | float, allow_none: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value >= minimum`` (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {value!r}")


def check_model_source(name: str, option: str) -> None:
    """Raise :class:`ConfigError` when ``name`` means a local model folder that does not exist.

    transformers takes a folder or a hub id (``org/name``), and for a missing folder it answers with a hub error ("Repo
    id must be in the form ...") or a network timeout. A name is a local path when it cannot be a hub id (absolute,
    ``./``, ``../``, ``~``, a backslash, more than one ``/``) or when its first part is a local folder
    (``models/Qwen2.5-7B-Instruct`` next to an existing ``models/``); other names are left to transformers.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(f"{option}: {name} is a file, not a model folder")
    cannot_be_hub_id = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    if cannot_be_hub_id or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir()):
        raise ConfigError(f"{option}: no such model folder: {name}")


class MissingExtraError(UserError):
    """An optional feature's package is not installed; the message names the package and the extra that brings it."""


def require_extra(package: str, extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtraError` unless ``package`` can be imported.

    Checked before the import, so that a command whose dependency sits in an optional extra (``serve``, ``report``)
    says in one line what to install instead of ending in an ``ImportError`` traceback.
    """
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise MissingExtraError(
            f"{needed_by} needs {package}, which is not installed: it comes with the {extra!r} extra "
            f"(pip install -e '.[{extra}]' in a clone, pip install 'healthai[{extra}]' otherwise)"
        )


class InputError(UserError, ValueError):
    """A file or folder cannot be used as given: no usable records in it, or an output that would replace an input.
    The message names the file and the option."""


def _same(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file or folder: the same path once links are resolved, or the same inode (a hard
    link, another mount of the same disk)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def check_output(option: str, path: str | Path, inputs: dict[str, Any], folder: bool = False) -> None:
    """Refuse an output that would replace one of the command's inputs, or that is of the wrong kind — the one rule
    every command's outputs follow (an output is never one of its inputs).

    Raises :class:`InputError` when ``path`` (given as ``option``) is one of ``inputs`` (option → path; ``None``
    skipped) by name, through a symbolic link or as a hard link; for a ``folder`` output, also when an input lies
    inside it (writing the folder may clear it) or it is an existing file; for a file output, when it is an existing
    folder.
    """
    out = Path(path)
    target = out.resolve()
    for input_option, value in inputs.items():
        if value is None:
            continue
        given = Path(value)
        inside = folder and target in given.resolve().parents
        if inside or _same(out, given):
            kind = "folder" if folder else "path"
            raise InputError(f"{option} {path} would overwrite {input_option} {value}; choose another {kind}")
    if folder and out.exists() and not out.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder")
    if not folder and out.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file path")
