"""Reading the two files ``evaluate`` and ``compare`` score: references and predictions, by the one id rule.

Nothing is guessed (#29 item 11): a repeated id in either file is an error naming both lines (``5`` and ``"5"`` are
one record, :func:`healthai.records.id_key`), two files with no id in common are an error (the wrong
``--references``, not an F1 of 0 with an interval), and a reference whose ``diseases`` is empty is an error naming
its line unless the caller asks for such records to be scored as "no diagnosis" (``--allow_empty_references``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from healthai.errors import UserError
from healthai.jsonl import BadRecordError, iter_jsonl
from healthai.metrics import PARSE_STATUSES
from healthai.prompts import join_diseases
from healthai.records import id_key

RecordId = Union[int, str]


@dataclass
class Reference:
    """One reference record: its id, ``diseases`` (a list already joined with ``；``) and optional reason."""

    id: RecordId
    diseases: str
    reason: Optional[str]
    case_text: Optional[str] = None
    """``feature_content`` when the row has one (labelled files do): the case-length breakdown and the report's
    examples read it."""


@dataclass
class Prediction:
    """One prediction row, reduced to what scoring needs."""

    id: RecordId
    diseases: str
    reason: Optional[str]
    parse_status: str
    case_text: Optional[str] = None
    """``feature_content`` when the row has one (predict writes it)."""

    @property
    def status(self) -> str:
        """``parse_status``, under the name the metrics read (:class:`healthai.metrics.Answer`)."""
        return self.parse_status


@dataclass
class Predictions:
    """The prediction rows by id key, in file order."""

    rows: dict[str, Prediction]


def _key(path: Path, line_no: int, row: dict) -> tuple[RecordId, str]:
    """The row's ``id`` and the key it is joined on: ``10001`` and ``"10001"`` are the same record, as in every stage
    (:func:`healthai.records.id_key`)."""
    if "id" not in row:
        raise BadRecordError(path, line_no, "row has no 'id'")
    rid = row["id"]
    # bool is an int subclass, and a float id (1.0 vs 1) would join unpredictably: accept only int and str.
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise BadRecordError(path, line_no, f"'id' must be an integer or a string, got {rid!r}")
    return rid, id_key(rid)


class _SeenIds:
    """The ids of one file read so far, to refuse a repeated one naming both lines."""

    def __init__(self, path: Path, what: str):
        """
        Args:
            path: The file being read (named in the error).
            what: ``"reference"`` or ``"prediction"``, as the error says it.
        """
        self.path, self.what = path, what
        self.first: dict[str, tuple[int, RecordId]] = {}

    def add(self, line_no: int, rid: RecordId, key: str) -> None:
        """Note ``rid`` at ``line_no``; raise :class:`BadRecordError` when its key was seen before. Two rows for one
        record cannot both be scored, and which one is meant is not ours to guess."""
        if key in self.first:
            first_line, first_id = self.first[key]
            spelled = "" if first_id == rid else f" as {first_id!r}"
            raise BadRecordError(self.path, line_no,
                                 f"duplicate {self.what} id {rid!r} (first at {self.path}:{first_line}{spelled})")
        self.first[key] = (line_no, rid)


def _keyed_rows(path: Path, what: str) -> Iterator[tuple[int, dict, RecordId, str]]:
    """``(line_no, row, id, id key)`` of each row of ``path``; a bad line or a repeated id raises
    :class:`BadRecordError` (``what``: ``"reference"`` or ``"prediction"``, as the error says it)."""
    seen = _SeenIds(path, what)
    for line_no, row, error in iter_jsonl(path):
        if error is not None:
            raise BadRecordError(path, line_no, error)
        rid, key = _key(path, line_no, row)
        seen.add(line_no, rid, key)
        yield line_no, row, rid, key


def _diseases(path: Path, line_no: int, value: Any) -> str:
    """A ``diseases`` value as one string; a list of names is joined with ``；``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return join_diseases(value)
    raise BadRecordError(path, line_no, f"'diseases' must be a string or a list of strings, got {value!r}")


def _reason(path: Path, line_no: int, value: Any) -> Optional[str]:
    """A ``reason`` value: a string, or ``None`` when absent or null."""
    if value is None or isinstance(value, str):
        return value
    raise BadRecordError(path, line_no, f"'reason' must be a string or null, got {value!r}")


def _case_text(row: dict) -> Optional[str]:
    """The row's ``feature_content`` if it is a string (evaluate only measures it; it is not scored)."""
    text = row.get("feature_content")
    return text if isinstance(text, str) else None


def read_references(path: Path, allow_empty: bool = False) -> dict[str, Reference]:
    """Reference records by id key, in file order; a bad line, a repeated id or (unless ``allow_empty``) an empty
    ``diseases`` raises :class:`BadRecordError`, a file without records :class:`~healthai.errors.UserError`.

    A list-valued ``diseases`` is joined with ``；``; ``reason`` may be absent or null. An empty reference is most
    often a labelling gap; scored, it would count every predicted name as a false positive, so it is scored as "no
    diagnosis" only when ``allow_empty`` says that is what it means.
    """
    refs: dict[str, Reference] = {}
    for line_no, row, rid, key in _keyed_rows(path, "reference"):
        if "diseases" not in row:
            raise BadRecordError(path, line_no, "reference row has no 'diseases'")
        diseases = _diseases(path, line_no, row["diseases"])
        if not diseases.strip() and not allow_empty:
            raise BadRecordError(path, line_no, f"reference id {rid!r} has an empty 'diseases'; fill it in, or pass "
                                                "--allow_empty_references true to score it as \"no diagnosis\"")  # fmt: skip
        refs[key] = Reference(rid, diseases, _reason(path, line_no, row.get("reason")), _case_text(row))
    if not refs:
        # Every score would be 0 or undefined; a wrong --references must not pass for a result.
        raise UserError(f"{path}: no reference records; nothing to score against")
    return refs


def _parse_status(path: Path, line_no: int, row: dict) -> str:
    """The row's ``parse_status``; rows without one (the official submission format) are ``ok`` iff ``diseases``
    is a string, as a string is what a well-formed answer holds."""
    if "parse_status" not in row:
        return "ok" if isinstance(row.get("diseases"), str) else "failed"
    status = row["parse_status"]
    if status not in PARSE_STATUSES:
        raise BadRecordError(path, line_no, f"'parse_status' must be one of {PARSE_STATUSES}, got {status!r}")
    return status


def read_predictions(path: Path) -> Predictions:
    """Prediction rows by id key; a bad line or a repeated id raises :class:`BadRecordError`.

    A missing or null ``diseases`` is an empty prediction (a failed parse may leave it so), not an error.
    """
    rows: dict[str, Prediction] = {}
    for line_no, row, rid, key in _keyed_rows(path, "prediction"):
        diseases = row.get("diseases")
        rows[key] = Prediction(
            rid,
            "" if diseases is None else _diseases(path, line_no, diseases),
            _reason(path, line_no, row.get("reason")),
            _parse_status(path, line_no, row),
            _case_text(row),
        )
    return Predictions(rows)


def check_overlap(predictions: Path, references: Path, preds: Predictions, refs: dict[str, Reference]) -> None:
    """Raise :class:`~healthai.errors.UserError` when no prediction id is a reference id: the files belong to
    different record sets (the wrong ``--references``), and an F1 of 0 with an interval would pass for a result."""
    if any(key in refs for key in preds.rows):
        return
    if not preds.rows:
        raise UserError(f"{predictions}: no prediction rows; nothing to score")
    pred_id, ref_id = next(iter(preds.rows.values())).id, next(iter(refs.values())).id
    raise UserError(f"{predictions} and {references} have no id in common ({len(preds.rows)} prediction id(s), e.g. "
                    f"{pred_id!r}; {len(refs)} reference id(s), e.g. {ref_id!r}): are these the right references?")  # fmt: skip
