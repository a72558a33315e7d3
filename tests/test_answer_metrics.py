"""One metric collection for validation and ``evaluate``: :func:`healthai.metrics.answer_metrics` gives the values
the metrics give alone, under the names validation logs and the report uses, and a metric added there in one line
reaches validation's logged values, ``evaluate``'s report and table and ``compare``'s table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import pytest
import torch

from conftest import labelled_records, write_jsonl
from healthai import metrics
from healthai.compare import compare
from healthai.data import DiagnosisDataModule
from healthai.decoding import ParsedAnswer
from healthai.generation import GenerationSettings
from healthai.evaluate import evaluate
from healthai.errors import UserError
from healthai.metrics import (
    AnswerMetric,
    DiseaseF1,
    JsonValidRate,
    ReasonRougeL,
    TruncatedRate,
    answer_metrics,
)
from healthai.model import DiagnosisLoRA

ANSWERS = [
    ParsedAnswer("1、高血压2、糖尿病", "患者发热三天", "ok"),
    ParsedAnswer("肺炎；", "咳", "truncated"),
    ParsedAnswer(None, None, "failed"),
    None,  # no prediction for this record
]
REFERENCES = [
    {"diseases": "高血压；冠心病", "reason": "患者咳嗽发热"},
    {"diseases": "肺炎；支气管炎", "reason": None},
    {"diseases": "胃炎", "reason": "胃痛"},
    {"diseases": "肠炎", "reason": "腹泻"},
]


def test_the_collection_gives_each_metrics_values_under_the_logged_names():
    collection = answer_metrics()
    collection.update(ANSWERS[:2], REFERENCES[:2])
    collection.update(ANSWERS[2:], REFERENCES[2:])
    got = {k: v.item() for k, v in collection.compute().items()}

    # The same records through each metric's own update.
    f1, valid, truncated, rouge = DiseaseF1(), JsonValidRate(), TruncatedRate(), ReasonRougeL()
    f1.update([a.diseases if a else "" for a in ANSWERS], [r["diseases"] for r in REFERENCES])
    valid.update(["ok", "truncated", "failed"])  # the record without a prediction is no row
    truncated.update(["ok", "truncated", "failed"])
    rouge.update([a.reason if a else None for a in ANSWERS], [r["reason"] for r in REFERENCES])
    prf = f1.compute()
    assert got == pytest.approx({
        "disease_precision": prf["precision"].item(), "disease_recall": prf["recall"].item(),
        "disease_f1": prf["f1"].item(), "json_valid": 1 / 3, "truncated": 1 / 3,
        "reason_rougeL": rouge.compute().item(),
    })  # fmt: skip
    # TP 高血压 肺炎, FP 糖尿病, FN 冠心病 支气管炎 胃炎 肠炎 (the unanswered records' names too): 2·2 / (2·2 + 1 + 4).
    assert prf["f1"].item() == pytest.approx(4 / 9)
    assert list(got) == collection.names()
    assert all(collection.defined().values())
    collection.reset()
    collection.update([None], [{"diseases": "肺炎", "reason": None}])
    assert collection.defined() == {**dict.fromkeys(collection.names(), True), "json_valid": False,
                                    "truncated": False, "reason_rougeL": False}  # fmt: skip
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        collection.update(ANSWERS[:2], REFERENCES[:1])


class AnsweredCount(AnswerMetric):
    """Records that have an answer: a metric written as a newcomer would, taking ``update(answers, references)``."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("answered", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Optional[ParsedAnswer]], references: Sequence[dict]) -> None:
        self.answered += sum(a is not None for a in answers)

    def compute(self) -> torch.Tensor:
        return self.answered


def test_a_metric_added_in_one_place_reaches_validation_evaluate_and_compare(tmp_path, tiny_model_dir, capsys,
                                                                            monkeypatch):  # fmt: skip
    monkeypatch.setitem(metrics.ANSWER_METRICS, "answered", AnsweredCount)

    # Validation on the small model: two records generated, each one an answer.
    val = write_jsonl(tmp_path / "val.jsonl", labelled_records(2))
    L.seed_everything(0)
    model = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=False, val_log_samples=0,
                          generation=GenerationSettings(max_new_tokens=16))  # fmt: skip
    data = DiagnosisDataModule(val_file=str(val), tokenizer_path=str(tiny_model_dir), max_length=400,
                               eval_batch_size=2)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    logged = trainer.validate(model, data, verbose=False)[0]
    assert logged["val/answered"] == 2.0
    assert {"val/disease_precision", "val/disease_recall", "val/disease_f1", "val/json_valid", "val/truncated",
            "val/reason_rougeL"} <= set(logged)  # fmt: skip

    # evaluate: two of the three references have a prediction row.
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": i, "diseases": "肺炎", "reason": "咳嗽"} for i in range(3)])
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": 0, "diseases": "肺炎", "reason": "咳嗽", "parse_status": "ok"},
        {"id": 2, "diseases": "胃炎", "reason": "咳", "parse_status": "truncated"},
    ])  # fmt: skip
    capsys.readouterr()
    report = evaluate(preds, refs, report=tmp_path / "report.json")
    assert report["answered"] == 2.0 and report["truncated_rate"] == 0.5 and report["json_valid_rate"] == 0.5
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["answered"] == 2.0
    assert any(line.split() == ["answered", "2.0000"] for line in capsys.readouterr().out.splitlines())

    compare([f"a={preds}", f"b={refs}"], refs, resamples=100)
    table = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["answered", "2.0000", "3.0000"] for line in table)
    assert any(line.split() == ["truncated_rate", "0.5000", "0.0000"] for line in table)


def test_evaluate_reports_the_truncated_rate_over_the_rows_scored(tmp_path: Path):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": i, "diseases": "肺炎"} for i in range(4)])
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": 0, "diseases": "肺炎", "parse_status": "truncated"},
        {"id": 1, "diseases": "肺炎", "parse_status": "ok"},
        {"id": 9, "diseases": "肺炎", "parse_status": "truncated"},  # unknown id: not scored
    ])  # fmt: skip
    report = evaluate(preds, refs)
    assert report["truncated_rate"] == 0.5  # of the 2 rows scored; the 2 missing records do not lower it
    # No row to score at all is no id in common with the references: an error, not rates of null (#29 item 11).
    with pytest.raises(UserError, match="have no id in common"):
        evaluate(write_jsonl(tmp_path / "none.jsonl", [{"id": 9, "diseases": "肺炎"}]), refs)


@pytest.mark.parametrize("monitor", ["val/truncated", "val/answered", "val/disease_recall"])
def test_monitoring_any_generated_metric_needs_generation_at_every_validation(monitor, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from healthai.errors import ConfigError
    from healthai.model import check_monitored_metrics

    monkeypatch.setitem(metrics.ANSWER_METRICS, "answered", AnsweredCount)
    callbacks = [ModelCheckpoint(monitor=monitor, mode="max")]
    with pytest.raises(ConfigError, match=f"ModelCheckpoint monitors {monitor}, which only validations that generate"):
        check_monitored_metrics(callbacks, generate_every_n_epochs=2)
    check_monitored_metrics(callbacks, generate_every_n_epochs=1)
    check_monitored_metrics([ModelCheckpoint(monitor="val/loss", mode="min")], generate_every_n_epochs=0)
