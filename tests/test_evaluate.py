"""``healthai.evaluate``: joining by id, missing / duplicate / unknown ids, bad lines, report and per-record files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLE_OUTPUT
from healthai.evaluate import evaluate
from healthai.errors import UserError
from healthai.jsonl import BadRecordError

REPO = Path(__file__).resolve().parents[1]

REPORT_KEYS = {
    "n", "missing", "disease_precision", "disease_recall", "disease_f1", "json_valid_rate", "reason_rougeL",
    "unknown",
}  # fmt: skip


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows are dicts (dumped) or raw strings (written as they are, to make bad lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


REFERENCES = [
    {"id": 1, "diseases": "高血压；冠心病", "reason": "患者咳嗽发热"},
    {"id": 2, "diseases": "肺炎"},  # no reason: not part of ROUGE-L
    {"id": 3, "diseases": "支气管炎", "reason": "咳嗽"},  # no prediction at all
    {"id": 4, "diseases": ["胃炎", "肠炎"], "reason": "abcd"},  # list-valued diseases
]
PREDICTIONS = [
    {"id": 1, "diseases": "1、高血压2、糖尿病", "reason": "患者发热三天", "parse_status": "ok"},
    {"id": 2, "diseases": "肺炎", "reason": "", "parse_status": "repaired"},
    {"id": 99, "diseases": "x", "reason": "", "parse_status": "ok"},  # unknown id
    {"id": "4", "diseases": "胃炎", "reason": "ab", "parse_status": "failed"},  # "4" joins with 4
]
# Diseases (TP, FP, FN): id1 (1, 1, 1), id2 (1, 0, 0), id3 (0, 0, 1), id4 (1, 0, 1) → TP 3, FP 1, FN 3:
# P = 3/4, R = 3/6, F1 = 2·3 / (2·3 + 1 + 3) = 0.6.
# JSON validity over the scored rows (ids 1, 2, 4): ok, repaired, failed → 1/3.
# ROUGE-L over references with a reason: id1 LCS 4 of 6/6 → 2/3; id3 missing → 0; id4 "ab" vs "abcd" → 2/3.


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "preds.jsonl", PREDICTIONS), write_jsonl(tmp_path / "refs.jsonl", REFERENCES)


def test_report_hand_computed(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds, refs = files
    report_path = tmp_path / "out" / "report.json"
    result = evaluate(preds, refs, report=report_path)

    assert result["n"] == 4 and result["n_predictions"] == 3 and result["n_reasons"] == 3
    assert (result["tp"], result["fp"], result["fn"]) == (3, 1, 3)
    assert result["disease_precision"] == pytest.approx(0.75)
    assert result["disease_recall"] == pytest.approx(0.5)
    assert result["disease_f1"] == pytest.approx(0.6)
    assert result["json_valid_rate"] == pytest.approx(1 / 3)
    assert result["reason_rougeL"] == pytest.approx(4 / 9)
    assert result["missing"] == [3]
    assert "duplicates" not in result  # a repeated id is an error now, never a list of ids that were skipped
    assert result["unknown"] == [99]

    written = json.loads(report_path.read_text(encoding="utf-8"))
    assert REPORT_KEYS <= set(written)
    assert written == result

    out = capsys.readouterr().out
    assert "disease_f1" in out and "0.6000" in out
    assert "missing ids: 3" in out and "unknown ids: 99" in out


def test_per_record_file(files: tuple[Path, Path], tmp_path: Path) -> None:
    preds, refs = files
    out = tmp_path / "per_record.jsonl"
    evaluate(preds, refs, per_record=out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3, 4]  # reference order, reference ids
    by_id = {r["id"]: r for r in rows}
    assert by_id[1]["matched"] == ["高血压"] and by_id[1]["missed"] == ["冠心病"] and by_id[1]["extra"] == ["糖尿病"]
    assert by_id[1]["reason_rougeL"] == pytest.approx(2 / 3)
    assert by_id[2]["matched"] == ["肺炎"] and by_id[2]["reason_rougeL"] is None
    assert by_id[3] == {
        "id": 3, "missing": True, "parse_status": None, "matched": [], "missed": ["支气管炎"], "extra": [],
        "reason_rougeL": 0.0,
    }  # fmt: skip
    assert by_id[4]["missed"] == ["肠炎"] and by_id[4]["parse_status"] == "failed"


def test_no_reference_reasons_gives_null_rouge(tmp_path: Path) -> None:
    refs = write_jsonl(
        tmp_path / "refs.jsonl", [{"id": 1, "diseases": "肺炎"}, {"id": 2, "diseases": "胃炎", "reason": None}]
    )
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": 1, "diseases": "肺炎", "reason": "x", "parse_status": "ok"}])
    result = evaluate(preds, refs)
    assert result["reason_rougeL"] is None and result["n_reasons"] == 0
    assert result["missing"] == [2] and result["disease_recall"] == pytest.approx(0.5)


def test_files_with_no_id_in_common_are_an_error(tmp_path: Path) -> None:
    # Once an F1 of 0 with exit 0: the wrong --references passed for a result (#29 item 11).
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": 1, "diseases": "肺炎"}, {"id": 2, "diseases": "胃炎"}])
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": 7, "diseases": "肺炎", "parse_status": "ok"}])
    with pytest.raises(UserError) as info:
        evaluate(preds, refs)
    assert str(info.value) == (f"{preds} and {refs} have no id in common (1 prediction id(s), e.g. 7; 2 reference "
                               "id(s), e.g. 1): are these the right references?")  # fmt: skip
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match=r"empty\.jsonl: no prediction rows; nothing to score$"):
        evaluate(empty, refs)


@pytest.mark.parametrize("first, second", [(1001, 1001), (5, "5")])
def test_repeated_prediction_id_names_both_lines(tmp_path: Path, first, second) -> None:
    # Once "the first row is used", exit 0 (#29 item 11): which row was meant is not evaluate's to guess.
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": 1001, "diseases": "肺炎"}, {"id": 5, "diseases": "胃炎"}])
    rows = [{"id": first, "diseases": "肺炎"}, {"id": 3, "diseases": "x"}, {"id": second, "diseases": "感冒"}]
    preds = write_jsonl(tmp_path / "preds.jsonl", rows)
    spelled = "" if first == second else f" as {first!r}"
    with pytest.raises(BadRecordError) as info:
        evaluate(preds, refs)
    assert str(info.value) == f"{preds}:3: duplicate prediction id {second!r} (first at {preds}:1{spelled})"


def test_empty_reference_diseases_is_an_error_unless_allowed(tmp_path: Path) -> None:
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": 1, "diseases": "肺炎"}, {"id": 2, "diseases": " "}])
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": 1, "diseases": "肺炎"}, {"id": 2, "diseases": "胃炎"}])
    with pytest.raises(BadRecordError) as info:
        evaluate(preds, refs)
    assert str(info.value) == (f"{refs}:2: reference id 2 has an empty 'diseases'; fill it in, or pass "
                               '--allow_empty_references true to score it as "no diagnosis"')  # fmt: skip
    # Allowed: "no diagnosis", so the predicted 胃炎 is a false positive (TP 1, FP 1, FN 0).
    result = evaluate(preds, refs, allow_empty_references=True)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["disease_precision"] == 0.5 and result["disease_recall"] == 1.0


def test_missing_parse_status_uses_diseases_type(tmp_path: Path) -> None:
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": 1, "diseases": "肺炎"}, {"id": 2, "diseases": "胃炎"}])
    # Official submission format (no parse_status): a string diseases is "ok", a null one is not.
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": 1, "diseases": "肺炎"}, {"id": 2, "diseases": None}])
    result = evaluate(preds, refs)
    assert result["json_valid_rate"] == pytest.approx(0.5)
    assert result["disease_f1"] == pytest.approx(2 / 3)  # TP 1, FN 1


@pytest.mark.parametrize(
    "which, bad_line, message",
    [
        ("preds", '{"id": 2, "diseases": ', r"preds\.jsonl:2: malformed JSON"),
        ("preds", "[1, 2]", r"preds\.jsonl:2: expected a JSON object"),
        ("preds", '{"diseases": "肺炎"}', r"preds\.jsonl:2: row has no 'id'"),
        ("preds", '{"id": 2, "diseases": "肺炎", "parse_status": "OK"}', r"preds\.jsonl:2: 'parse_status'"),
        ("refs", '{"id": 2}', r"refs\.jsonl:2: reference row has no 'diseases'"),
        ("refs", '{"id": 1, "diseases": "胃炎"}', r"refs\.jsonl:2: duplicate reference id 1 \(first at \S*refs\.jsonl:1\)"),
        ("refs", '{"id": 2.0, "diseases": "胃炎"}', r"refs\.jsonl:2: 'id' must be"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, which: str, bad_line: str, message: str) -> None:
    good = {"id": 1, "diseases": "肺炎", "reason": "r", "parse_status": "ok"}
    rows = {"preds": [good], "refs": [good]}
    rows[which] = [good, bad_line]
    preds = write_jsonl(tmp_path / "preds.jsonl", rows["preds"])
    refs = write_jsonl(tmp_path / "refs.jsonl", rows["refs"])
    with pytest.raises(BadRecordError, match=message):
        evaluate(preds, refs)


@pytest.fixture
def example_rows() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE_OUTPUT.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_official_example_format(example_rows: list[dict], tmp_path: Path) -> None:
    # All three official rows share id 10001: as predictions that is a duplicate, as references an error.
    assert [r["id"] for r in example_rows] == [10001] * 3
    with pytest.raises(BadRecordError, match=r":2: duplicate reference id 10001"):
        evaluate(EXAMPLE_OUTPUT, EXAMPLE_OUTPUT)
    refs = write_jsonl(tmp_path / "refs.jsonl", [{**example_rows[0], "id": 10001}])
    with pytest.raises(BadRecordError, match=r":2: duplicate prediction id 10001"):
        evaluate(EXAMPLE_OUTPUT, refs)

    # With distinct ids the file scores perfectly against itself, without any parse_status column.
    rows = [{**r, "id": 10001 + i} for i, r in enumerate(example_rows)]
    renumbered = write_jsonl(tmp_path / "renumbered.jsonl", rows)
    result = evaluate(renumbered, renumbered)
    assert result["n"] == 3 and result["tp"] == 6  # "1. 高尿酸血症；2. 皮炎；3. 失眠；4. 原发性高血压（1级）" is 4
    assert result["disease_f1"] == result["json_valid_rate"] == result["reason_rougeL"] == 1.0
    assert result["missing"] == result["unknown"] == []


def test_cli(files: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    from healthai.__main__ import main

    preds, refs = files
    report = tmp_path / "report.json"
    monkeypatch.chdir(REPO)
    main(["evaluate", "--predictions", str(preds), "--references", str(refs), "--report", str(report)])  # returns: 0
    assert "disease_f1" in capsys.readouterr().out
    written = json.loads(report.read_text(encoding="utf-8"))
    assert REPORT_KEYS <= set(written) and written["disease_f1"] == pytest.approx(0.6)
