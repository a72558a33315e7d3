"""Reading and validating case records: one set of rules for every stage (fit, predict, label, evaluate).

Light on purpose (no torch): the label command reads its input through it too.

Ids: an ``id`` is a JSON integer or string, and records are matched by the id's text — ``5`` and ``"5"`` are the same
record in every stage (:func:`id_key`). So a file holding both is a duplicate-id error, a label output resumed with
the other form counts the record as done, and evaluate joins prediction ``"5"`` to reference ``5``. An id is written
back exactly as it was read. (Predict resumes only an output written from the same input, so its ids match as read.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from healthai.jsonl import BadRecordError, OnBadRecord, Rejects, iter_jsonl, rejects_path_for
from healthai.prompts import join_diseases

log = logging.getLogger(__name__)


def id_key(record_id: int | str) -> str:
    """The form ids are compared in: ``5`` and ``"5"`` are the same record (see the module docstring)."""
    return str(record_id)


def check_record(obj: dict, labelled: bool) -> str | None:
    """Return why ``obj`` is not a usable record, or ``None`` if it is."""
    rid = obj.get("id")
    if rid is None:
        return "missing field 'id'"
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return f"field 'id' must be an integer or a string, got {type(rid).__name__}"
    text = obj.get("feature_content")
    if text is None:
        return "missing field 'feature_content'"
    if not isinstance(text, str):
        return f"field 'feature_content' must be a string, got {type(text).__name__}"
    if not text.strip():
        return "field 'feature_content' is empty"
    if not labelled:
        return None
    diseases = obj.get("diseases")
    if diseases is None:
        return "missing field 'diseases'"
    if isinstance(diseases, list):
        if not all(isinstance(d, str) for d in diseases):
            return "field 'diseases' must be a string or a list of strings"
        diseases = join_diseases(diseases)
    if not isinstance(diseases, str):
        return f"field 'diseases' must be a string or a list of strings, got {type(diseases).__name__}"
    if not diseases.strip():
        return "field 'diseases' is empty"
    reason = obj.get("reason")
    if reason is None:
        return "missing field 'reason'"
    if not isinstance(reason, str):
        return f"field 'reason' must be a string, got {type(reason).__name__}"
    return None


def read_records(
    path: str | Path,
    labelled: bool,
    on_bad_record: OnBadRecord = "error",
    rejects: Optional[Rejects] = None,
) -> list[dict]:
    """Read and validate a JSONL file of records, in file order.

    A bad line (malformed JSON, non-UTF-8 bytes, a missing/wrong-typed field, empty text) raises
    :class:`BadRecordError` naming ``file:line``; with ``on_bad_record="skip"`` it goes to ``rejects`` instead. A
    repeated id (``5`` and ``"5"`` included, see :func:`id_key`) is always an error.
    Each returned record carries ``_file`` and ``_line`` (its source) for later messages.
    """
    path = Path(path)
    if on_bad_record == "skip" and rejects is None:
        rejects = Rejects(rejects_path_for(path))
    records: list[dict] = []
    seen: dict[str, int] = {}  # id_key -> line
    for line_no, obj, error in iter_jsonl(path):
        if error is None:
            error = check_record(obj, labelled)
        if error is None and id_key(obj["id"]) in seen:
            # Always an error, also when skipping: which of the two is meant only the user can say, and every
            # output (labels, predictions) is keyed by id.
            first = seen[id_key(obj["id"])]
            raise BadRecordError(path, line_no, f"duplicate id {obj['id']!r} (first at line {first})")
        if error is not None:
            if on_bad_record != "skip":
                raise BadRecordError(path, line_no, error + " (set on_bad_record: skip to write it to a rejects file)")
            rejects.add(path, line_no, error, obj)
            continue
        seen[id_key(obj["id"])] = line_no
        record = dict(obj, _file=str(path), _line=line_no)
        if labelled:
            record["diseases"] = join_diseases(record["diseases"])
        records.append(record)
    if rejects is not None and rejects.count:
        log.warning("%s: %d bad record(s) skipped, written to %s", path, rejects.count, rejects.path)
    return records
