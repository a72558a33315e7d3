"""The user's errors: what ``python -m healthai`` reports as one line (``healthai <command>: error: ...``), exit 2.

Raise :class:`UserError` (or :class:`ConfigError` for a bad option value) for anything the user can fix by changing
a file, a path or an option; the message must name that file (and line) or option. Everything else is a bug and keeps
its traceback. ``HEALTHAI_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import collections.abc
import errno
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, OpenUnitInterval, PositiveFloat
from jsonargparse.typing import PositiveInt, register_type, restricted_number_type


class UserError(Exception):
    """An error the user can fix; the message names the file (and line) or the option, and says what is wrong."""


class ConfigError(UserError, ValueError):
    """An option has a value that cannot work (``batch_size 0``); the message names the option."""


# Option ranges are declared in the signatures with these restricted number types (jsonargparse's own, and three it
# lacks), so the parser checks them, names the option and `--help` shows them: `(type: PositiveInt, default: 4)`.
# A check a type cannot say (two options together, a file, a model folder) stays a ConfigError in code.
HalfOpenUnitInterval = restricted_number_type(
    "HalfOpenUnitInterval", float, [(">=", 0), ("<", 1)], docstring="float restricted to be ≥0 and <1"
)
# The upper bound: a billion resamples ran for hours in silence (#29 item 12); a million already pins a 95% interval.
ResampleCount = restricted_number_type(
    "ResampleCount", int, [(">=", 100), ("<=", 1_000_000)], docstring="int restricted to be ≥100 and ≤1000000"
)
# OpenAI's range for a chat completion's temperature; an OpenAI-compatible server takes the same.
TeacherTemperature = restricted_number_type(
    "TeacherTemperature", float, [(">=", 0), ("<=", 2)], docstring="float restricted to be ≥0 and ≤2"
)
UnprivilegedPort = restricted_number_type(
    "UnprivilegedPort", int, [(">=", 1024), ("<=", 65535)], docstring="int restricted to be ≥1024 and ≤65535"
)
RESTRICTED_TYPES = (PositiveInt, NonNegativeInt, PositiveFloat, NonNegativeFloat, ClosedUnitInterval,
                    OpenUnitInterval, HalfOpenUnitInterval, ResampleCount, TeacherTemperature, UnprivilegedPort)  # fmt: skip



def _finite(value: Any) -> Any:
    """``value`` unchanged unless it is a non-finite number: `inf` passes `v>0`, and a run with an infinite
    learning rate writes an adapter of NaNs (#29 item 5)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{value} is not a finite number")
    return value


for _kind in RESTRICTED_TYPES:
    # Parsed values come back as plain int / float (checked all the same): a `PositiveInt(4)` in a model's
    # hyperparameters would be pickled into checkpoints and written to hparams.yaml as a Python object tag.
    register_type(_kind, _kind._type, deserializer=lambda value, kind=_kind: kind._type(kind(_finite(value))))


def check_declared(owner: Callable[..., Any], values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise :class:`ConfigError` unless each of ``values`` fits the restricted type its parameter of ``owner`` (a
    function, or a dataclass) is declared with, ``Optional[...]`` and ``list[...]`` of one included.

    The command line checks these in the parser; this is the same check for a class built in Python (tests, scripts),
    read from the same annotation, so the type stays the one declaration. ``prefix`` makes a name the option
    (``data.``, ``--``); the message is worded as the parser's.
    """
    for name, hint in typing.get_type_hints(owner).items():
        if name in values:
            check_value(f"{prefix}{name}", values[name], hint)


def check_value(option: str, value: Any, hint: Any) -> None:
    """Raise :class:`ConfigError` naming ``option`` unless ``value`` fits ``hint`` (a restricted type, or an
    ``Optional`` or ``list`` of one; other hints pass)."""
    args = typing.get_args(hint)
    if hint in RESTRICTED_TYPES:
        try:
            hint(_finite(value))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{option}: Not of type {hint.__name__}: {e}") from None
    elif typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        if value is not None:
            check_value(option, value, next(a for a in args if a is not type(None)))
    elif typing.get_origin(hint) in (list, tuple, collections.abc.Sequence) and isinstance(value, (list, tuple)):
        for item in value:
            check_value(option, item, args[0] if args else Any)


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
        from healthai.hub import missing_model

        raise missing_model(name, option, "")


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


def _resolved(option: str, path: Path) -> Path:
    """``path`` with its links resolved; a loop of symbolic links (Python 3.11 raises RuntimeError, later ones
    OSError) is an :class:`InputError` naming ``option`` (#29 item 9: it was a traceback in label and evaluate)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise
        raise InputError(f"{option} {path}: a loop of symbolic links, not a file") from None


def _same(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file or folder: the same path once links are resolved, or the same inode (a hard
    link, another mount of the same disk). Both must resolve (:func:`_resolved` was called on each)."""
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
    target = _resolved(option, out)
    for input_option, value in inputs.items():
        if value is None:
            continue
        given = Path(value)
        inside = folder and target in _resolved(input_option, given).parents
        if not folder:
            _resolved(input_option, given)  # a link loop is named before _same meets it
        if inside or _same(out, given):
            kind = "folder" if folder else "path"
            raise InputError(f"{option} {path} would overwrite {input_option} {value}; choose another {kind}")
    if folder and out.exists() and not out.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder")
    if not folder and out.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file path")


OPTIONAL_RANGE_ERROR = re.compile(
    r"Does not validate against any of the Union subtypes Subtypes: \[[^\]]*\] Errors: - Not of type (\w+): "
    r"(?:\S+ )?does not conform to (restriction .+?) - Expected a <class 'NoneType'> Given value type: <class '\w+'> "
    r"Given value: (.+)$"
)
"""jsonargparse's message for an ``Optional[<restricted type>]`` option out of its range: both members' errors."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (jsonargparse's and some refusals' messages span several); an out-of-range
    ``Optional`` option reads as a plain one does (``Not of type PositiveInt: 0 does not conform to ...``)."""
    text = re.sub(r"\s*\n\s*", " ", str(error)).strip() or type(error).__name__
    return OPTIONAL_RANGE_ERROR.sub(r"Not of type \1: \3 does not conform to \2", text)
