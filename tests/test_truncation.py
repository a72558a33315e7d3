"""Issue 28 (was 17.1): answers the token budget closed are reported (``parse_status`` ``truncated``) and counted;
fit refuses labels longer than the budget, and the default configs take the task's own answers unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, labelled_records, seed_records, write_jsonl
from healthai.cli import cli_main
from healthai.decoding import parse_answer
from healthai.encoding import EncodedDataset
from healthai.errors import UserError
from healthai.evaluate import evaluate
from healthai.generation import AnswerBudget, GenerationSettings, check_label_budget, resolve_budget
from healthai.metrics import JsonValidRate, TruncatedRate
from healthai.writer import status_summary

EXAMPLES = REPO / "tests" / "fixtures" / "example_output.jsonl"
DOCTORS_LIST = ("1、慢性肾脏病2、2型糖尿病3、高血压病4、冠状动脉粥样硬化性心脏病5、高脂血症6、贫血7、骨质疏松8、脑梗死后遗症9、"
                "痛风10、甲状腺结节11、前列腺增生12、反流性食管炎")  # fmt: skip
"""A doctor's diagnosis list of 88 characters."""
NUMBERED = "1. 血肌酐升高，提示肾功能不全；\n2. 既往\"糖尿病\"病史10年；\n3. 血压160/95mmHg。"
"""A teacher's numbered reason, one finding per line."""


def test_truncated_comes_from_the_decoder_not_from_a_length():
    text = '{"diseases": "2型糖尿病；", "reason": ""}'
    assert parse_answer(text).status == "ok"  # however short or long: only the decoder knows
    answer = parse_answer(text, truncated=True)
    assert answer.status == "truncated" and answer.diseases == "2型糖尿病；" and "budget" in answer.error
    assert answer.row_fields()["parse_status"] == "truncated"
    assert parse_answer('{"diseases": "2型糖尿病", "reason": "x', truncated=False).status == "repaired"
    assert parse_answer("not json", truncated=True).status == "failed"


@pytest.mark.parametrize("truncated", [False, True])
def test_an_answer_that_needed_repair_is_repaired_whether_or_not_the_budget_closed_it(truncated):
    """Repair is checked before the budget's flag: ``ok`` and ``truncated`` both promise strict JSON, so text that
    needed json-repair (the closing brace lost after decoding, say) is ``repaired``, never hidden as ``truncated``."""
    for text in ('{"diseases": "2型糖尿病", "reason": "x"', '{"diseases": "2型糖尿病", "reason": "x',
                 '{"diseases": "2型糖尿病", "reason": "x",}'):  # fmt: skip
        answer = parse_answer(text, truncated=truncated)
        assert (answer.status, answer.diseases, answer.reason) == ("repaired", "2型糖尿病", "x"), text
        assert ("budget" in (answer.error or "")) == truncated
    strict = '{"diseases": "2型糖尿病", "reason": "x"}'
    assert parse_answer(strict, truncated=truncated).status == ("truncated" if truncated else "ok")


def _dataset(*answer_tokens: int) -> EncodedDataset:
    """Examples whose answers (end-of-turn included) take the given numbers of tokens after a 10-token prompt."""
    return EncodedDataset([{"id": i, "input_ids": [0] * (10 + n), "prompt_len": 10}
                           for i, n in enumerate(answer_tokens, start=1)])  # fmt: skip


def test_label_check_names_the_count_the_longest_and_an_id():
    train = _dataset(30, 41, 52, 12)
    with pytest.raises(UserError) as err:
        check_label_budget({"training": train, "validation": _dataset(45), "test": None}, 40)
    message = str(err.value)
    assert "\n" not in message
    assert message == ("2 of 4 training label(s) need more than model.generation.max_new_tokens=40 tokens (longest 52, "
                       "id 3); 1 of 1 validation label(s) need more than model.generation.max_new_tokens=40 tokens "
                       "(longest 45, id 1): the model would learn answers the budget closes before they end; raise "
                       "model.generation.max_new_tokens to at least 52 or shorten those labels")  # fmt: skip
    # Within the budget (an answer may take all of it): the record fit saves with the adapter.
    assert check_label_budget({"training": train}, 52) == AnswerBudget(52, 52, 3)
    assert check_label_budget({"training": None}, 52) is None


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


def test_fit_refuses_labels_over_the_budget_before_loading_the_base(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    val_rows = labelled_records(2, offset=4)  # other records than training's (#29 item 7)
    val_rows[1]["reason"] = "；\n".join(f"{i}. 血压升高" for i in range(1, 25))  # ~240 tokens
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    loaded: list = []
    _stub_base_loader(monkeypatch, loaded)
    with pytest.raises(UserError, match=r"^1 of 2 validation label\(s\) need more than model\.generation\.max_new_tokens"
                                        rf"=192 tokens \(longest \d+, id {val_rows[1]['id']!r}\)"):  # fmt: skip
        cli_main(fit_args(tmp_path, tiny_model_dir, train, val, "--data.max_length", "512"))
    assert not loaded  # refused at fit start, before the base was loaded
    assert not (tmp_path / "runs" / "ckpt").exists()
    # Within the budget (the training labels are short), fit starts: the check does not refuse good data.
    with pytest.raises(BaseLoading):
        cli_main(fit_args(tmp_path, tiny_model_dir, train, train, "--data.val_overlap", "keep"))
    assert loaded


def task_answers() -> list[dict]:
    """The official example rows (numbered reasons with \\n, full-width punctuation), a doctor's 88-character
    diagnosis list and a teacher's numbered reason with real newlines and quotes, on real case records."""
    # The official file gives all three rows the id 10001, which fit refuses as duplicates (outputs are keyed by id).
    rows = [{**json.loads(line), "id": f"example-{i}"}
            for i, line in enumerate(EXAMPLES.read_text(encoding="utf-8").splitlines())]  # fmt: skip
    records = seed_records(2, offset=40)
    rows.append({**records[0], "diseases": DOCTORS_LIST, "reason": NUMBERED})
    rows.append({**records[1], "diseases": "2型糖尿病；高血压", "reason": "1. 口干多饮；\n2. 血压高\t（160/95）"})
    return rows


FIT_CONFIGS = ["configs/qwen_lora.yaml", "configs/tiny.yaml",
               *sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/qwen2.5-*/*.yaml"))]  # fmt: skip


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_every_fit_config_takes_the_tasks_own_answers_unchanged(config, tmp_path, tiny_model_dir, monkeypatch):
    """No option about the answer changed: only where the model, the data and the run go (this machine has no GPU),
    and the base loader stubbed — fit gets past every start-up check, the label budget's included."""
    monkeypatch.chdir(REPO)
    data = write_jsonl(tmp_path / "task.jsonl", task_answers())
    # Enough rows for any config's batch size: the same answers four times over.
    train_rows = [{**r, "id": f"{r['id']}-{k}"} for k in range(4) for r in task_answers()]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    runs = str(tmp_path / "runs")
    _stub_base_loader(monkeypatch, [])
    args = ["fit", "--config", config, "--model.model_name_or_path", str(tiny_model_dir),
            "--data.train_file", str(train), "--data.val_file", str(data), "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.devices", "1", "--trainer.default_root_dir", runs,
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--model.quantization", "null"]  # fmt: skip
    with pytest.raises(BaseLoading):
        cli_main(args)


@pytest.mark.parametrize("config", ["configs/predict.yaml", "configs/predict_tiny.yaml", "configs/baseline.yaml"])
def test_every_predict_config_has_room_for_the_tasks_answers(config, tokenizer):
    from healthai.prompts import answer_text

    settings = GenerationSettings(**yaml.safe_load((REPO / config).read_text(encoding="utf-8"))["model"]["generation"])
    longest = max(len(tokenizer.encode(answer_text(r["diseases"], r["reason"]))) + 1 for r in task_answers())
    assert resolve_budget(settings, None).budget >= longest  # zero-shot; with an adapter (null) the adapter's own


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
    assert summary.startswith(" (ok 2, repaired 0, truncated 1, failed 1)\nwarning: 1 answer(s) were closed by the token "
                              "budget")  # fmt: skip


def test_the_demo_config_holds_its_sample_labels(tmp_path, tiny_model_dir, monkeypatch):
    """configs/tiny.yaml's budget is above the longest sample label, so the demo's fit passes the check."""
    monkeypatch.chdir(REPO)
    _stub_base_loader(monkeypatch, [])
    with pytest.raises(BaseLoading):
        cli_main(fit_args(tmp_path, tiny_model_dir, REPO / "data" / "sample_train.jsonl",
                          REPO / "data" / "sample_val.jsonl", "--data.max_length", "768"))  # fmt: skip
