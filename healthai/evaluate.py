"""``python -m healthai evaluate``: score a predictions file against references.

Numbers come from :func:`healthai.metrics.answer_metrics` — the collection validation logs — so offline evaluation
and training-time validation cannot disagree, and a metric added there is reported here. Records are joined by
``id``; nothing is dropped silently: missing, duplicate and unknown prediction ids are listed in the report, and a
malformed line stops the run naming ``file:line``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from healthai.breakdown import (
    DEFAULT_LENGTH_EDGES,
    DEFAULT_TOP_DIAGNOSES,
    RecordScore,
    breakdown_tables,
    breakdowns,
    format_value,
    score_record,
)
from healthai.atomic import atomic_open, write_text
from healthai.errors import ConfigError, NonNegativeInt, PositiveFloat, PositiveInt, check_declared, check_output
from healthai.errors import require_extra
from healthai.judge import judge_settings
from healthai.judge_report import check_judged, judge_section, judge_table
from healthai.metrics import PARSE_STATUSES, answer_metrics, match_diseases, rouge_l_char
from healthai.normalized_report import normalized_section, normalized_table
from healthai.paths import check_writable, naming
from healthai.scored_files import Prediction, Predictions, RecordId, Reference, check_overlap
from healthai.scored_files import read_predictions, read_references
from healthai.synonyms import normalizer_from


def _per_record_rows(refs: dict[str, Reference], preds: dict[str, Prediction]) -> list[dict[str, Any]]:
    """One row per reference record: matched / missed / extra names and the reason's ROUGE-L (null without one)."""
    out = []
    for key, ref in refs.items():
        pred = preds.get(key)
        m = match_diseases(pred.diseases if pred else "", ref.diseases)
        has_reason = ref.reason is not None and bool(ref.reason.strip())
        out.append(
            {
                "id": ref.id,
                "missing": pred is None,
                "parse_status": pred.parse_status if pred else None,
                "matched": m.matched,
                "missed": m.missed,
                "extra": m.extra,
                "reason_rougeL": rouge_l_char(pred.reason if pred else None, ref.reason) if has_reason else None,
            }
        )
    return out


def _table(report: dict[str, Any]) -> str:
    """The report as two aligned plain-text columns."""
    keys = [*metric_keys(), "n", "n_predictions", "n_reasons", "missing", "unknown"]
    rows = [(k, report[k]) for k in keys] + [(f"parse_status {s}", n) for s, n in report["parse_status"].items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{k.ljust(width)}  {format_value(v)}" for k, v in rows]
    return "\n".join(lines)


def _preview(ids: list[RecordId], limit: int = 10) -> str:
    """The first few ids of a list, for a one-line notice."""
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


def record_scores(refs: dict[str, Reference], preds: dict[str, Prediction]) -> list[RecordScore]:
    """One :class:`~healthai.breakdown.RecordScore` per reference record, in reference order."""
    out = []
    for key, ref in refs.items():
        pred = preds.get(key)
        case_text = ref.case_text if ref.case_text is not None else (pred.case_text if pred else None)
        out.append(
            score_record(ref.id, ref.diseases, pred.diseases if pred else None, pred.parse_status if pred else None,
                         case_text)  # fmt: skip
        )
    return out


REPORT_NAMES = {"json_valid": "json_valid_rate", "truncated": "truncated_rate"}
"""Report keys that differ from the metric's name in :func:`healthai.metrics.answer_metrics` (validation logs
``val/json_valid``; the report has said ``json_valid_rate`` since before); any other metric is reported by its name."""


def metric_keys() -> list[str]:
    """The report's metric keys, in the collection's order (the table rows of ``evaluate`` and ``compare``)."""
    return [REPORT_NAMES.get(name, name) for name in answer_metrics().names()]


@dataclass
class Scored:
    """One predictions file scored against the references."""

    report: dict[str, Any]
    """What ``evaluate`` returns and writes with ``--report``."""
    records: list[RecordScore]
    """Each reference record's score, in reference order."""
    refs: dict[str, Reference]
    preds: Predictions


def check_breakdown_options(top_diagnoses: int, length_edges: Sequence[int]) -> None:
    """Raise :class:`ConfigError` for a breakdown option that cannot work. (Each edge's range is its declared
    type, :func:`evaluate`'s and :func:`~healthai.compare.compare`'s; their order is not a type's to say.)"""
    if list(length_edges) != sorted(set(length_edges)):
        raise ConfigError(f"length_edges must be increasing, got {list(length_edges)}")


def evaluate(
    predictions: Path,
    references: Path,
    report: Optional[Path] = None,
    per_record: Optional[Path] = None,
    html: Optional[Path] = None,
    top_diagnoses: PositiveInt = DEFAULT_TOP_DIAGNOSES,
    length_edges: list[PositiveInt] = list(DEFAULT_LENGTH_EDGES),
    examples: NonNegativeInt = 20,
    synonyms: Optional[Path] = None,
    judge_base_url: Optional[str] = None,
    judge_model: Optional[str] = None,
    judge_concurrency: PositiveInt = 8,
    judge_max_retries: NonNegativeInt = 5,
    judge_timeout: PositiveFloat = 120.0,
    allow_empty_references: bool = False,
) -> dict[str, Any]:
    """Score predictions against references with the metrics validation logs: disease P/R/F1, JSON validity rate,
    truncated rate and reason ROUGE-L.

    The metrics are :func:`healthai.metrics.answer_metrics`. Records are joined by ``id`` (``10001`` and
    ``"10001"`` match). Every reference record is scored; one without a prediction counts as an empty prediction
    (false negatives only) and is listed in ``missing``; prediction ids absent from the
    references are listed in ``unknown`` and not scored. ``json_valid_rate`` and ``truncated_rate`` are over the
    prediction rows scored (so a missing record does not lower them; null when no row is scored); a row without
    ``parse_status`` (the official submission format) counts as valid when its ``diseases`` is a string.
    ``reason_rougeL`` averages over references that have a reason and is null when none has. ``parse_status`` counts
    the scored rows by status: ``truncated`` rows (the token budget closed the answer, diagnoses may be missing) are
    scored as they are, and are not valid JSON for ``json_valid_rate``. A malformed line, a bad field, a repeated
    id in either file (naming both lines) or an empty reference ``diseases`` stops with ``file:line``; a references
    file without records, two files with no id in common, and an output that is a folder or would replace an input
    (``--report`` equal to ``--predictions``, say) are errors too.

    The report also breaks disease P/R/F1 down (``breakdown``): per diagnosis for the ``top_diagnoses`` reference
    diagnoses found in most records (support, P/R/F1), per ``parse_status`` (records without a prediction are
    ``missing``), and per character length of the case text (``feature_content`` of the reference, else of the
    prediction row) in buckets cut at ``length_edges``: case texts that do not fit ``data.max_length`` are trimmed,
    and the long buckets show what that costs. The same normalisation as everywhere
    (:func:`healthai.metrics.match_diseases`).

    Args:
        predictions: JSONL of prediction rows ``{"id", "diseases", "reason", "parse_status"?, ...}``.
        references: JSONL of reference rows ``{"id", "diseases", "reason"?, ...}``; ``diseases`` may be a list.
        report: Write the report (the returned dict) here as JSON.
        per_record: Write one JSONL row per reference record here: id, matched / missed / extra disease names and
            the reason's ROUGE-L.
        html: Write a self-contained HTML report here (tables, a per-diagnosis F1 chart, example records); needs the
            ``report`` extra (matplotlib).
        top_diagnoses: How many of the most frequent reference diagnoses the per-diagnosis breakdown lists.
        length_edges: Case-length bucket edges, in characters, increasing.
        examples: How many example records the HTML report shows (wrong answers first).
        synonyms: A synonym table (TSV ``canonical<TAB>alias`` or JSON ``{canonical: [aliases]}``, docs/evaluate.md):
            the report adds ``disease_normalized`` (exact and normalised P/R/F1, the table's fingerprint, every match
            only the normalisation made). Without it, the default qualifier rules alone.
        judge_base_url: OpenAI-compatible endpoint of a large model asked, per record and in both orders, which
            predicted names name the same disease as which reference names (docs/evaluate.md): the report adds
            ``disease_judge`` (judge P/R/F1, the agreement of the two orders), a second opinion beside the headline.
            Needs ``judge_model`` and ``report`` (answers are cached beside it); the API key is read from
            $HEALTHAI_API_KEY or $OPENAI_API_KEY, as ``label`` reads it. Exits with status 1 when a record could not
            be judged.
        judge_model: The judge model's name, e.g. qwen2.5-72b-instruct.
        judge_concurrency: Judge requests kept in flight at once.
        judge_max_retries: Retries per judge request after 408, 409, 429, 5xx, a timeout or a dropped connection.
        judge_timeout: Seconds allowed for one judge request.
        allow_empty_references: Score a reference whose ``diseases`` is empty as "no diagnosis" (every predicted
            name a false positive) instead of stopping at its line.

    Returns:
        The report: ``n``, ``n_predictions``, ``n_reasons``, ``disease_precision``, ``disease_recall``,
        ``disease_f1``, ``json_valid_rate``, ``reason_rougeL``, ``truncated_rate`` (every metric of
        :func:`~healthai.metrics.answer_metrics`), ``parse_status`` (rows scored per status, every one
        of :data:`~healthai.metrics.PARSE_STATUSES`), ``missing``, ``unknown``, ``tp``, ``fp``, ``fn``,
        ``breakdown``, ``disease_normalized``, ``disease_judge`` (with a judge) and the two input paths.
    """
    # Options and output paths are checked before any scoring work, so a mistake costs nothing.
    _check_outputs(predictions, references, report, per_record, html)
    check_declared(evaluate, locals())  # the CLI checks these too; this is for Python callers
    check_breakdown_options(top_diagnoses, length_edges)
    if html is not None:
        require_extra("matplotlib", extra="report", needed_by="--html")
    normalizer = normalizer_from(synonyms)  # a bad table stops before any scoring
    judge = judge_settings(judge_base_url, judge_model, report, {"--predictions": predictions, "--references":
                           references, "--per_record": per_record, "--html": html}, judge_concurrency,
                           judge_max_retries, judge_timeout)  # fmt: skip
    refs = read_references(Path(references), allow_empty=allow_empty_references)
    scored = score(predictions, references, refs, top_diagnoses=top_diagnoses, length_edges=length_edges)
    result = scored.report
    result["disease_normalized"] = normalized_section(scored.refs, scored.preds.rows, normalizer)
    if judge is not None:
        result["disease_judge"] = judge_section(scored.refs, scored.preds.rows, judge)

    print(_table(result))
    print()
    print(breakdown_tables(result["breakdown"]))
    print(normalized_table(result["disease_normalized"]))
    if judge is not None:
        print(judge_table(result["disease_judge"]))
    for name in ("missing", "unknown"):
        if result[name]:
            print(f"{name} ids: {_preview(result[name])}")
    truncated = [p.id for k, p in scored.preds.rows.items() if k in scored.refs and p.parse_status == "truncated"]
    if truncated:
        print(f"truncated ids (the token budget closed the answer; diagnoses may be missing): {_preview(truncated)}")
    if report is not None:
        with naming(report):  # a full disk says which file (#29 item 8)
            write_json(Path(report), result)
    if per_record is not None:
        with naming(per_record):
            _write_jsonl(Path(per_record), _per_record_rows(scored.refs, scored.preds.rows))
    if html is not None:
        from healthai.report import SystemResult, write_html

        system = SystemResult(Path(predictions).stem, str(predictions), result, scored.records)
        with naming(html):
            write_html(Path(html), [system], [], str(references), examples)
        print(f"html report: {html}")
    check_judged(result.get("disease_judge"))
    return result


def score(
    predictions: Path,
    references: Path,
    refs: Optional[dict[str, Reference]] = None,
    top_diagnoses: int = DEFAULT_TOP_DIAGNOSES,
    length_edges: Sequence[int] = DEFAULT_LENGTH_EDGES,
) -> Scored:
    """Score one predictions file (see :func:`evaluate` for the rules); nothing is printed or written. ``refs``:
    the references already read from ``references`` (compare reads them once for every system)."""
    refs = read_references(Path(references)) if refs is None else refs
    preds = read_predictions(Path(predictions))
    check_overlap(Path(predictions), Path(references), preds, refs)
    scored = {key: preds.rows[key] for key in refs if key in preds.rows}
    missing = [ref.id for key, ref in refs.items() if key not in preds.rows]
    unknown = [p.id for key, p in preds.rows.items() if key not in refs]

    keys = list(refs)
    metrics = answer_metrics()
    # A record without a prediction is an answer of None: an empty one for F1 and ROUGE-L, no row for the rates.
    metrics.update([scored.get(k) for k in keys], [{"diseases": refs[k].diseases, "reason": refs[k].reason}
                                                   for k in keys])  # fmt: skip
    defined = metrics.defined()
    disease, rouge = metrics["disease"], metrics["reason_rougeL"]

    result: dict[str, Any] = {
        "predictions": str(predictions),
        "references": str(references),
        "n": len(refs),
        "n_predictions": len(scored),
        "n_reasons": int(rouge.count),
        # A metric with nothing to measure (no row scored, no reference reason) is null, not 0.
        **{REPORT_NAMES.get(k, k): float(v) if defined[k] else None for k, v in metrics.compute().items()},
        "parse_status": {s: sum(p.parse_status == s for p in scored.values()) for s in PARSE_STATUSES},
        "tp": int(disease.tp),
        "fp": int(disease.fp),
        "fn": int(disease.fn),
        "missing": missing,
        "unknown": unknown,
    }
    records = record_scores(refs, preds.rows)
    result["breakdown"] = breakdowns(records, top_diagnoses, length_edges)
    return Scored(result, records, refs, preds)


def _check_outputs(predictions: Path, references: Path, report: Optional[Path], per_record: Optional[Path],
                   html: Optional[Path]) -> None:
    """Before anything is read: no output may replace an input or an earlier output, nor be a folder, nor be where
    the system refuses to write (read-only, permission denied: #29 item 8)."""
    earlier: dict[str, Any] = {"--predictions": predictions, "--references": references}
    for option, out in (("--report", report), ("--per_record", per_record), ("--html", html)):
        if out is not None:
            check_output(option, out, earlier)
            check_writable(option, out)
            earlier[option] = out


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically: a full disk leaves the previous report, not a torn one."""
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
