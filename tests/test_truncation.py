"""Issue 17.1: answers cut at the schema's length caps are reported (``parse_status`` ``truncated``) and counted, and
fit refuses labels that the capped constraint could not write back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, labelled_records, write_jsonl
from healthai.cli import cli_main
from healthai.decoding import CAPPED_UNWRITABLE, answer_schema, parse_answer
from healthai.encoding import EncodedDataset, check_answer_caps
from healthai.errors import UserError
from healthai.evaluate import evaluate
from healthai.metrics import JsonValidRate, TruncatedRate
from healthai.writer import status_summary


@pytest.mark.parametrize(
    "text, caps, status",
    [
        ('{"diseases": "2型糖尿病；", "reason": ""}', (6, 400), "truncated"),  # diseases at its cap: cut there
        ('{"diseases": "2型糖尿病", "reason": "血糖高"}', (6, 3), "truncated"),  # reason at its cap
        ('{"diseases": "2型糖尿病", "reason": "血糖高"}', (6, 4), "ok"),  # both below their caps
        ('{"diseases": "2型糖尿病；", "reason": ""}', (None, None), "ok"),  # uncapped: nothing can be cut
        ('{"diseases": "2型糖尿病；", "reason": "x', (6, 400), "truncated"),  # repaired and at the cap: truncated
        ('{"diseases": "2型糖尿病", "reason": "x', (6, 400), "repaired"),
        ("not json", (1, 1), "failed"),
    ],
)
def test_a_field_that_reaches_its_cap_is_truncated(text, caps, status):
    answer = parse_answer(text, *caps)
    assert answer.status == status
    assert answer.row_fields()["parse_status"] == status
    if status == "truncated":
        assert "reached its cap" in answer.error


def test_capped_unwritable_characters_are_those_xgrammar_refuses(tokenizer):
    """The characters fit refuses in labels are exactly those the capped schema cannot emit in json.dumps form."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(answer_schema(20, 20)), any_whitespace=False, separators=(", ", ": ")
    )
    for ch in ['"', "\\", "\n", "\r", "\t", "\x01", "\x1f", " ", "a", "；", "病", "/", "\u3400", "😀"]:
        text = json.dumps({"diseases": f"a{ch}b", "reason": ""}, ensure_ascii=False)
        writable = xgr.GrammarMatcher(compiled).accept_string(text)
        assert writable == (CAPPED_UNWRITABLE.search(ch) is None), repr(ch)


def _dataset(*labels: tuple[str, str]) -> EncodedDataset:
    return EncodedDataset([{"id": i, "diseases": d, "reason": r} for i, (d, r) in enumerate(labels, start=1)])


def test_label_check_names_the_count_and_the_longest():
    train = _dataset(("胃炎", "上腹痛"), ("高血压；糖尿病", "x" * 10), ("胃炎", "y" * 12), ("胃炎", "第一行\n第二行"))
    with pytest.raises(UserError) as err:
        check_answer_caps({"training": train, "validation": None}, 8, 10)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("3 of 4 training label(s) cannot be written under the answer caps: "
                              "2 with reason of 10+ characters (model.generation.max_reason_chars 10; longest 12, id 3),"
                              " 1 field(s) holding a quote, backslash, newline or other control character")  # fmt: skip
    assert "e.g. id 4, reason" in message and "raise the caps" in message
    check_answer_caps({"training": _dataset(("胃炎", "上腹痛"))}, 3, 4)  # both below their caps: accepted
    check_answer_caps({"training": train}, None, None)  # uncapped strings: anything can be written


def fit_args(tmp_path: Path, model: Path, train: Path, val: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(model),
        "--data.train_file", str(train), "--data.val_file", str(val), "--data.max_length", "256",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks.dirpath", str(tmp_path / "runs" / "ckpt"), "--trainer.enable_progress_bar", "false",
        "--model.generate_every_n_epochs", "0", "--trainer.max_steps", "1", *extra,
    ]  # fmt: skip


class BaseLoading(Exception):
    """Raised by a stubbed base loader: fit got past its start-up checks."""


def _stub_base_loader(monkeypatch, calls: list) -> None:
    def load(self):
        calls.append(1)
        raise BaseLoading

    monkeypatch.setattr("healthai.model.DiagnosisLoRA._load_base", load)


def test_fit_refuses_labels_over_the_caps_before_loading_the_base(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    val_rows = labelled_records(2)
    val_rows[1]["diseases"] = "慢性乙型病毒性肝炎；肝硬化；" * 3  # 42 characters, over the tiny config's cap of 32
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    loaded: list = []
    _stub_base_loader(monkeypatch, loaded)
    with pytest.raises(UserError, match=r"^1 of 2 validation label\(s\) cannot be written under the answer caps: 1 "
                                        r"with diseases of 32\+ characters .*longest 42, id "):  # fmt: skip
        cli_main(fit_args(tmp_path, tiny_model_dir, train, val))
    assert not loaded  # refused at fit start, before the base was loaded
    assert not (tmp_path / "runs" / "ckpt").exists()
    # Within the caps (the training labels are short), fit starts: the check does not refuse good data.
    with pytest.raises(BaseLoading):
        cli_main(fit_args(tmp_path, tiny_model_dir, train, train))
    assert loaded


def test_fit_accepts_over_long_labels_when_decoding_is_unconstrained(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    rows = [dict(r, reason="很长的理由" * 20) for r in labelled_records(4)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    _stub_base_loader(monkeypatch, [])
    with pytest.raises(BaseLoading):  # past the check: unconstrained strings have no cap
        cli_main(fit_args(tmp_path, tiny_model_dir, train, train, "--model.generation.constrained", "false"))


def test_truncated_is_counted_by_evaluate_and_not_valid_json(tmp_path):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": i, "diseases": "胃炎；肝炎", "reason": "r"} for i in range(4)])
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": 0, "diseases": "胃炎；肝炎", "reason": "r", "parse_status": "ok"},
        {"id": 1, "diseases": "胃炎；", "reason": "r", "parse_status": "truncated"},
        {"id": 2, "diseases": "胃炎；", "reason": "r", "parse_status": "truncated"},
        {"id": 3, "diseases": "胃炎；肝炎", "reason": "r", "parse_status": "repaired"},
    ])  # fmt: skip
    report = evaluate(preds, refs, report=tmp_path / "report.json")
    assert report["parse_status"] == {"ok": 1, "repaired": 1, "truncated": 2, "failed": 0}
    assert report["json_valid_rate"] == pytest.approx(0.25)
    assert report["fn"] == 2  # the truncated rows are scored as they are: each lost a diagnosis
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["parse_status"]["truncated"] == 2


def test_validation_metrics_and_the_predict_summary_count_truncated(tmp_path):
    truncated, valid = TruncatedRate(), JsonValidRate()
    for metric in (truncated, valid):
        metric.update(["ok", "truncated", "truncated", "failed"])
    assert truncated.compute().item() == pytest.approx(0.5) and valid.compute().item() == pytest.approx(0.25)
    out = write_jsonl(tmp_path / "pred.jsonl", [{"id": i, "parse_status": s} for i, s in
                                                enumerate(["ok", "truncated", "ok", "failed"])])  # fmt: skip
    summary = status_summary(out)
    assert summary.startswith(" (ok 2, repaired 0, truncated 1, failed 1)\nwarning: 1 answer(s) reached a length cap")


def test_the_demo_config_holds_its_sample_labels(tmp_path, tiny_model_dir, monkeypatch):
    """configs/tiny.yaml's caps are above the longest sample label, so the demo's fit passes the check."""
    monkeypatch.chdir(REPO)
    _stub_base_loader(monkeypatch, [])
    with pytest.raises(BaseLoading):
        cli_main(fit_args(tmp_path, tiny_model_dir, REPO / "data" / "sample_train.jsonl",
                          REPO / "data" / "sample_val.jsonl", "--data.max_length", "768"))  # fmt: skip
