"""The validation sample table on TensorBoard's text tab (``val/samples``): the first validation records, their
reference and predicted diseases, the matched / missed / extra names and the answer's reason, epoch by epoch.

:class:`healthai.model.DiagnosisLoRA` collects a :func:`sample_row` per generated record and calls
:func:`log_samples` at the end of each validation that generates.
"""

from __future__ import annotations

from typing import Any

import torch

from healthai.decoding import ParsedAnswer
from healthai.prompts import DISEASE_SEPARATOR, join_diseases

CASE_PREVIEW_CHARS = 200
"""Characters of the case text shown per sample row (records run to thousands)."""

SAMPLE_COLUMNS = ("id", "case", "reference", "predicted", "matched", "missed", "extra", "parse", "reason")
"""Columns of the validation sample table, in order."""


def sample_row(record_id: str, case_text: str, reference: dict[str, Any], answer: ParsedAnswer) -> dict[str, str]:
    """One validation record and the model's answer as table cells (plain text; :func:`samples_markdown` escapes).

    Matched / missed / extra come from :func:`healthai.metrics.match_diseases`, the comparison ``val/disease_f1``
    counts, so the table explains the score. A ``failed`` answer has no reason: its raw output is shown instead.
    """
    from healthai.metrics import match_diseases

    match = match_diseases(answer.diseases, reference["diseases"])
    case = case_text if len(case_text) <= CASE_PREVIEW_CHARS else case_text[:CASE_PREVIEW_CHARS] + "…"
    reason = answer.reason if answer.reason is not None else f"(raw output) {answer.raw or ''}"
    return {
        "id": str(record_id), "case": case, "reference": join_diseases(reference["diseases"]),
        "predicted": answer.diseases or "", "matched": DISEASE_SEPARATOR.join(match.matched),
        "missed": DISEASE_SEPARATOR.join(match.missed), "extra": DISEASE_SEPARATOR.join(match.extra),
        "parse": answer.status, "reason": reason,
    }  # fmt: skip


def merge_rank_samples(shards: list[list[dict[str, str]]], limit: int) -> list[dict[str, str]]:
    """The first ``limit`` records of the validation set from each rank's first rows, in dataset order.

    Lightning gives each rank a non-shuffled ``DistributedSampler`` shard: rank ``r`` holds records ``r, r + W,
    r + 2W, ...``, so taking the k-th row of every rank in rank order, for k = 0, 1, ..., restores the dataset order.
    The sampler pads the last round with repeated records; a repeated id is dropped.
    """
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for k in range(max((len(s) for s in shards), default=0)):
        for shard in shards:
            if k < len(shard) and shard[k]["id"] not in seen and len(rows) < limit:
                seen.add(shard[k]["id"])
                rows.append(shard[k])
    return rows


def _markdown_cell(text: str) -> str:
    """``text`` as one markdown table cell: markup characters and HTML escaped, line breaks as ``<br>``."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|":  # backslash first, so the escapes added after it are not escaped again
        text = text.replace(ch, "\\" + ch)
    return "<br>".join(text.splitlines())


def samples_markdown(rows: list[dict[str, str]], title: str) -> str:
    """``title`` and a markdown table of ``rows`` (:data:`SAMPLE_COLUMNS`), one record per line."""
    lines = [title, "", "| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(_markdown_cell(row[c]) for c in SAMPLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def log_samples(trainer, rows: list[dict[str, str]], limit: int) -> None:
    """Log the first ``limit`` validation records of ``rows`` (this rank's :func:`sample_row` rows) as one markdown
    table to every TensorBoard logger of ``trainer``, from rank zero (0 = off; other loggers get nothing).

    Under DDP every rank generates its own shard, so the rows are gathered (a few short strings per rank) and rank
    zero logs the first ``limit`` records of the whole validation set, the same records as on one device.
    Collective: every rank must call it.
    """
    if limit <= 0:
        return
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        shards: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(shards, rows)
        rows = merge_rank_samples(shards, limit)
    if not trainer.is_global_zero or not rows:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    step = trainer.global_step
    title = f"epoch {trainer.current_epoch}, step {step}: the first {len(rows)} validation records"
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("val/samples", samples_markdown(rows, title), global_step=step)
