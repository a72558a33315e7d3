"""What the benchmark scripts (``bench_*.py``, ``gpu_check.py``) share: the repository's paths, the committed real
records and how a count of them is taken, JSONL writing, the model-folder rule, a counting wrapper around
``generate`` and the process figures they report. Not a script.

``python scripts/bench_x.py`` puts ``scripts/`` first on ``sys.path``, so a script imports this as a sibling
(``from benchlib import ...``); a module loaded by file path (the tests load ``gpu_check.py`` so) adds its own folder
first. Importing this puts the repository root on ``sys.path`` too, so the scripts use this checkout's ``healthai``
without an install.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED_RECORDS = REPO / "tests" / "fixtures" / "seed_records.jsonl"
"""Real case records committed with the tests (96, spanning the length range); pass a larger file for real figures."""

TINY_MODEL = "models/tiny-qwen2.5"
"""The small offline model (scripts/make_tiny_model.py), relative to the repository root."""


# -- options -----------------------------------------------------------------------------------------------------------


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=TINY_MODEL, help="model folder (default: %(default)s)")


def add_records_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=Path, default=SEED_RECORDS,
                        help="JSONL of real case records (id, feature_content) (default: the committed fixture)")


def resolve_path(path: Optional[str]) -> Optional[str]:
    """A model (or adapter) path as given: made absolute where it exists from the current folder, else taken from
    the repository root where it exists there (the defaults name repository folders), else unchanged (a hub id).
    Absolute, because a server or a child process may run in another folder."""
    if not path:
        return path
    p = Path(path)
    if p.exists():
        return str(p.resolve())
    if (REPO / p).exists():
        return str(REPO / p)
    return path


# -- records -----------------------------------------------------------------------------------------------------------


def read_case_records(path: Path, n: int, offset: int = 0, warm: int = 0, option: str = "--n_records") -> list[dict]:
    """The ``id`` and ``feature_content`` of the first ``n`` + ``warm`` records of ``path`` after line ``offset``;
    exits with one line (naming ``option``, the count's flag) when the file holds fewer. Only the lines needed are
    read."""
    if not path.is_file():
        raise SystemExit(f"--records {path}: no such file")
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if len(rows) == n + warm:
                break
            if i < offset or not line.strip():
                continue
            obj = json.loads(line)
            rows.append({"id": obj["id"], "feature_content": obj["feature_content"]})
    if len(rows) < n + warm:
        wanted = (f"{option} {n}" + (f" (+ {warm} for warm-up)" if warm else "")
                  + (f" from --offset {offset}" if offset else ""))  # fmt: skip
        raise SystemExit(f"{wanted}: {path} holds only {offset + len(rows)} records")
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# -- generation --------------------------------------------------------------------------------------------------------


def new_token_counts(new, stop_ids: set[int]) -> list[int]:
    """Per row of ``new`` (2-D generated ids): tokens up to and including the first stop token (all if none)."""
    counts = []
    for row in new.tolist():
        counts.append(next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row)))
    return counts


class CountingGenerate:
    """Wraps a model's ``generate`` (set it as the model's instance attribute: only that object's calls are counted):
    each row's new tokens (:func:`new_token_counts`), the token positions computed (rows x decoding steps), the
    decoding steps of all calls and of the last one, and the seconds inside (host clock: no CUDA synchronisation)."""

    def __init__(self, generate, stop_ids: set[int]):
        self.generate, self.stop_ids = generate, stop_ids
        self.reset()

    def reset(self) -> None:
        self.new_tokens = self.positions = self.steps = self.last_steps = 0
        self.seconds = 0.0

    def __call__(self, *args, input_ids, **kwargs):
        t = time.perf_counter()
        out = self.generate(*args, input_ids=input_ids, **kwargs)
        self.seconds += time.perf_counter() - t
        new = out[:, input_ids.shape[1] :]
        self.new_tokens += sum(new_token_counts(new, self.stop_ids))
        self.last_steps = new.shape[1]
        self.steps += new.shape[1]
        self.positions += new.numel()
        return out


# -- the process -------------------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (``getrusage`` maxrss: model loading included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def torch_threads(n: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``n`` when given (``--threads``); returns the count in use."""
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
