"""Where a predictions file wins and loses: per-record disease counts, and the breakdowns ``evaluate`` and ``compare``
report — per reference diagnosis, per ``parse_status``, per case-length bucket.

Every count comes from :func:`healthai.metrics.match_diseases`, the normalisation ``val/disease_f1`` uses, and every
score is the same micro P/R/F1 as :class:`healthai.metrics.DiseaseF1` over a subset of the records (0 where its
denominator is 0). Each breakdown's groups add up to the whole file's counts, so a group's share of the errors can be
read straight off.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from healthai.metrics import PARSE_STATUSES, match_diseases, normalize_diseases

DEFAULT_TOP_DIAGNOSES = 20
DEFAULT_LENGTH_EDGES = (250, 500, 1000, 2000)
"""Case-length bucket edges in characters of ``feature_content``. A case text that does not fit ``data.max_length``
tokens is trimmed (:func:`healthai.encoding.fit_case_text`): the long buckets show what trimming costs."""

MISSING = "missing"
"""The ``parse_status`` group of reference records that have no prediction row."""


@dataclass
class RecordScore:
    """One reference record as one system answered it."""

    id: Any
    """The reference's id, as written there."""
    reference: str
    """The reference ``diseases`` string."""
    prediction: Optional[str]
    """The predicted ``diseases`` string; None when the record has no prediction row."""
    parse_status: str
    """The row's ``parse_status``, or :data:`MISSING`."""
    case_text: Optional[str]
    """The record's ``feature_content`` (the reference's, else the prediction row's); None when neither has one."""
    matched: list[str]
    missed: list[str]
    extra: list[str]

    @property
    def right(self) -> bool:
        """The predicted set of diagnoses is exactly the reference set (after normalisation)."""
        return not self.missed and not self.extra

    @property
    def length(self) -> Optional[int]:
        return None if self.case_text is None else len(self.case_text)


def score_record(
    rid: Any, reference: str, prediction: Optional[str], parse_status: Optional[str], case_text: Optional[str]
) -> RecordScore:
    """A :class:`RecordScore`; a missing prediction (``prediction`` and ``parse_status`` None) scores as an empty
    one, as in ``evaluate``."""
    m = match_diseases(prediction or "", reference)
    status = MISSING if parse_status is None else parse_status
    return RecordScore(rid, reference, prediction, status, case_text, m.matched, m.missed, m.extra)


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Micro precision, recall and F1 from counts; each is 0 when its denominator is 0 (as in DiseaseF1)."""
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
    }


def _group(records: Sequence[RecordScore]) -> dict[str, Any]:
    tp = sum(len(r.matched) for r in records)
    fp = sum(len(r.extra) for r in records)
    fn = sum(len(r.missed) for r in records)
    return {"n": len(records), "tp": tp, "fp": fp, "fn": fn, **prf(tp, fp, fn)}


def top_diagnoses(references: Sequence[str], n: int) -> list[str]:
    """The ``n`` normalised reference diagnoses found in most records; ties in order of first appearance."""
    support: Counter[str] = Counter()
    for ref in references:
        support.update(normalize_diseases(ref))  # normalize_diseases drops repeats: one count per record
    return [name for name, _ in support.most_common(n)]  # most_common keeps insertion order among equal counts


def per_diagnosis(records: Sequence[RecordScore], names: Sequence[str]) -> list[dict[str, Any]]:
    """For each name: ``support`` (reference records holding it), its TP/FP/FN over all records, P/R/F1."""
    rows = []
    for name in names:
        tp = sum(name in r.matched for r in records)
        fp = sum(name in r.extra for r in records)
        fn = sum(name in r.missed for r in records)
        rows.append({"diagnosis": name, "support": tp + fn, "tp": tp, "fp": fp, "fn": fn, **prf(tp, fp, fn)})
    return rows


def per_parse_status(records: Sequence[RecordScore]) -> dict[str, dict[str, Any]]:
    """Each ``parse_status`` (and :data:`MISSING`) that occurs: record count and disease P/R/F1 over those records."""
    out = {}
    for status in (*PARSE_STATUSES, MISSING):
        group = [r for r in records if r.parse_status == status]
        if group:
            out[status] = _group(group)
    return out


def length_label(low: Optional[int], high: Optional[int]) -> str:
    if low is None:
        return f"<{high}"
    return f">={low}" if high is None else f"{low}-{high - 1}"


def per_length(records: Sequence[RecordScore], edges: Sequence[int]) -> list[dict[str, Any]]:
    """Records by the character length of their case text in buckets cut at ``edges``; empty buckets are kept (a
    bucket with no records says so), records without a case text form an ``unknown`` bucket when there are any."""
    bounds = [None, *sorted(edges), None]
    rows = []
    for low, high in zip(bounds, bounds[1:]):
        group = [
            r
            for r in records
            if r.length is not None and (low is None or r.length >= low) and (high is None or r.length < high)
        ]
        rows.append({"bucket": length_label(low, high), "min_chars": low, "max_chars": high, **_group(group)})
    unknown = [r for r in records if r.length is None]
    if unknown:
        rows.append({"bucket": "unknown", "min_chars": None, "max_chars": None, **_group(unknown)})
    return rows


def breakdowns(records: Sequence[RecordScore], top_n: int, length_edges: Sequence[int]) -> dict[str, Any]:
    """The three breakdowns of one system's records, as they go into the JSON report."""
    return {
        "diagnoses": per_diagnosis(records, top_diagnoses([r.reference for r in records], top_n)),
        "parse_status": per_parse_status(records),
        "case_length_chars": per_length(records, length_edges),
    }


def format_value(value: Any) -> str:
    """A report value as printed everywhere (tables, the HTML report): ``n/a`` for none, floats with 4 decimals, a
    list of ids as its length."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return str(len(value))
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain-text columns (:func:`format_value`), the first column left-aligned and the others right."""
    table = [list(header)] + [[format_value(v) for v in row] for row in rows]
    # East Asian characters take two columns in a terminal.
    def width(text: str) -> int:
        return sum(2 if "\u2e80" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef" else 1 for ch in text)

    widths = [max(width(r[i]) for r in table) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0] + " " * (widths[0] - width(row[0]))]
        cells += [" " * (w - width(c)) + c for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    return "\n".join([line(table[0]), line(["-" * w for w in widths]), *(line(r) for r in table[1:])])


def breakdown_tables(b: dict[str, Any]) -> str:
    """The breakdowns of one report as readable tables."""
    d = [[r["diagnosis"], r["support"], r["precision"], r["recall"], r["f1"]] for r in b["diagnoses"]]
    s = [[k, v["n"], v["precision"], v["recall"], v["f1"]] for k, v in b["parse_status"].items()]
    n = [[r["bucket"], r["n"], r["precision"], r["recall"], r["f1"]] for r in b["case_length_chars"]]
    return "\n\n".join(
        [
            f"per diagnosis (the {len(d)} most frequent in the references)\n"
            + format_table(["diagnosis", "support", "precision", "recall", "f1"], d),
            "per parse_status\n" + format_table(["parse_status", "records", "precision", "recall", "f1"], s),
            "per case length (characters)\n" + format_table(["length", "records", "precision", "recall", "f1"], n),
        ]
    )
