"""This process's command line as a user can paste it again: what predict prints to resume after a signal, and what
fit prints to resume from its ``last.ckpt``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def command_without(option: str, argv: Optional[list[str]] = None) -> list[str]:
    """``argv`` (this process's by default) without ``option`` and its value (``--opt v`` or ``--opt=v``), and with
    ``python -m healthai`` in place of the path to ``healthai/__main__.py`` that ``sys.argv`` holds."""
    argv = list(sys.argv if argv is None else argv)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True  # and its value
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    if kept and Path(kept[0]).name == "__main__.py" and Path(kept[0]).parent.name == "healthai":
        kept = ["python", "-m", "healthai", *kept[1:]]
    return kept
