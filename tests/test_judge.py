"""``evaluate --judge_base_url``: the judge's second opinion (`healthai.judge`) against the local scripted
OpenAI-compatible server (tests/fake_openai_server.py), with hand-computed answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fake server lives next to this file

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from healthai.__main__ import main  # noqa: E402
from healthai.evaluate import evaluate  # noqa: E402
from healthai.jsonl import BadRecordError  # noqa: E402
from healthai.judge import parse_judge_reply  # noqa: E402
from healthai.judge_report import check_judged  # noqa: E402
from healthai.report import SystemResult, judge_rows  # noqa: E402

KEY = "sk-healthai-JUDGELEAK-51e27f3a9c"
HYPERTENSION = frozenset({"高血压", "高血压病", "原发性高血压"})

REFERENCES = [
    {"id": 1, "diseases": "原发性高血压；糖尿病"},
    {"id": 2, "diseases": "肺癌"},
    {"id": 3, "diseases": "慢性肾脏病"},
    {"id": 4, "diseases": "上呼吸道感染"},
    {"id": 5, "diseases": "高血压"},
]
PREDICTIONS = [
    {"id": 1, "diseases": "高血压病；糖尿病"},  # 糖尿病 exact; 高血压病 = 原发性高血压 in both orders
    {"id": 2, "diseases": "肺炎"},  # the judge keeps 肺炎 / 肺癌 apart
    {"id": 3, "diseases": "慢性肾病"},  # named in one order only: not a match
    {"id": 4, "diseases": ""},  # nothing to ask
    {"id": 5, "diseases": "高血压病；原发性高血压"},  # both name 高血压: one to one, one wins
]
# Judge: tp = 2 (id 1) + 1 (id 5) = 3; fp = 0 + 1 + 1 + 0 + 1 = 3; fn = 0 + 1 + 1 + 1 + 0 = 3 → P = R = F1 = 0.5.
# Name pairs asked: 1 + 1 + 1 + 2 = 5; same verdict in both orders on all but id 3's → agreement 4/5.
# Exact (the headline): tp 1, fp 5, fn 5 → F1 2/12.


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HEALTHAI_API_KEY", KEY)


@pytest.fixture
def server():
    with FakeOpenAIServer(judge_same=[HYPERTENSION], judge_one_way={("慢性肾病", "慢性肾脏病")}) as srv:
        yield srv


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_evaluate(tmp_path: Path, server: FakeOpenAIServer, predictions: list[dict], **options) -> dict:
    preds = write_jsonl(tmp_path / "preds.jsonl", predictions)
    refs = write_jsonl(tmp_path / "refs.jsonl", REFERENCES)
    return evaluate(preds, refs, report=tmp_path / "out" / "report.json", judge_base_url=server.base_url,
                    judge_model="judge-72b", judge_max_retries=0, judge_timeout=5.0, **options)  # fmt: skip


def test_judge_both_orders_one_to_one_and_cache(tmp_path: Path, server: FakeOpenAIServer, capsys) -> None:
    result = run_evaluate(tmp_path, server, PREDICTIONS)
    judge = result["disease_judge"]
    assert result["disease_f1"] == pytest.approx(2 / 12)  # the headline stays exact
    assert (judge["tp"], judge["fp"], judge["fn"]) == (3, 3, 3)
    assert (judge["precision"], judge["recall"], judge["f1"]) == (0.5, 0.5, 0.5)
    assert judge["agreement"] == pytest.approx(4 / 5) and judge["pairs_judged"] == 5
    assert (judge["pairs_matched_both_orders"], judge["pairs_matched_one_order_only"]) == (3, 1)
    assert judge["matches"] == [{"id": 1, "predicted": "高血压病", "reference": "原发性高血压"},
                                {"id": 5, "predicted": "高血压病", "reference": "高血压"}]  # fmt: skip
    assert (judge["questions"], judge["cached"], judge["asked"], judge["failed"]) == (8, 0, 8, [])
    assert len(server.requests) == 8  # two orders of ids 1, 2, 3, 5; id 4 has no predicted name
    swapped = {r.user_text for r in server.requests if "A1. 原发性高血压" in r.user_text}
    assert swapped == {"列表A：\nA1. 原发性高血压\n列表B：\nB1. 高血压病"}
    out = capsys.readouterr().out
    assert "disease, judged by judge-72b (a second opinion, not the headline)" in out
    assert "agreement of the two orders: 0.8000 over 5 name pairs" in out
    saved = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert saved["disease_judge"] == judge
    rows = judge_rows([SystemResult("preds", "preds.jsonl", result, [])])
    assert rows[0] == ["disease f1 (judge judge-72b, second opinion)", "0.5000"]
    assert rows[3] == ["judge agreement of the two orders (judge-72b)", "0.8000"]

    again = run_evaluate(tmp_path, server, PREDICTIONS)  # the rerun asks nothing twice
    assert len(server.requests) == 8
    assert (again["disease_judge"]["cached"], again["disease_judge"]["asked"]) == (8, 0)
    assert {k: v for k, v in again["disease_judge"].items() if k not in ("cached", "asked")} == {
        k: v for k, v in judge.items() if k not in ("cached", "asked")}
    cache = (tmp_path / "out" / "report.judge.jsonl").read_text(encoding="utf-8")
    assert len(cache.splitlines()) == 8 and KEY not in cache


def test_unusable_answer_is_retried_then_failed_never_a_match(tmp_path: Path, server: FakeOpenAIServer,
                                                              capsys) -> None:  # fmt: skip
    predictions = [{"id": 1, "diseases": "高血压病；糖尿病"}, {"id": 2, "diseases": "肺炎[[fault:invalid]]"}]
    with pytest.raises(SystemExit) as info:
        run_evaluate(tmp_path, server, predictions)
    assert info.value.code == 1
    assert len(server.attempts_for("invalid")) == 4  # both orders, each asked once more
    judge = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["disease_judge"]
    assert judge["failed"] == [{"id": 2, "reason": "unusable judge reply: not valid JSON (Expecting value, column 1)",
                                "raw": "对不起，根据现有信息我无法给出诊断。"}]  # fmt: skip
    assert (judge["tp"], judge["fp"], judge["fn"]) == (2, 1, 4)  # id 2 counts by its exact matches (none)
    captured = capsys.readouterr()
    assert "failed, record 2: unusable judge reply" in captured.out
    assert "judge: 1 record(s) could not be judged" in captured.err

    server.healed = True  # fixed upstream: the rerun asks only the failed record's two questions
    judge = run_evaluate(tmp_path, server, predictions)["disease_judge"]
    assert (judge["cached"], judge["asked"], judge["failed"]) == (2, 2, [])
    assert len(server.requests) == 8


def test_fatal_answer_stops_the_judge_and_the_key_stays_out(tmp_path: Path, server: FakeOpenAIServer,
                                                             capsys) -> None:  # fmt: skip
    predictions = [{"id": 1, "diseases": "高血压病[[fault:auth_echo]]"}, {"id": 2, "diseases": "肺炎[[fault:auth_echo]]"}]
    with pytest.raises(SystemExit) as info:
        run_evaluate(tmp_path, server, predictions, judge_concurrency=1)
    assert info.value.code == 1
    judge = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["disease_judge"]
    assert [f["id"] for f in judge["failed"]] == [1, 2] and judge["asked"] == 1  # stopped at the first 401
    assert judge["failed"][1]["reason"] == "not asked: " + judge["stopped"]
    assert judge["stopped"].startswith("HTTP 401: Incorrect API key provided: ***.")
    assert judge["stopped"].endswith("(check --judge_base_url, --judge_model and the API key)")
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, *(p.read_text(encoding="utf-8") for p in tmp_path.rglob("*.json*"))):
        assert KEY not in text


def test_bad_cache_line_stops_naming_it(tmp_path: Path, server: FakeOpenAIServer) -> None:
    (tmp_path / "out").mkdir()
    rows = ['{"key": "k1", "a": ["x"], "b": ["y"], "pairs": [[0, 5]]}', '{"key": "k2", "a": [], "b": [], "pairs": []}']
    (tmp_path / "out" / "report.judge.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"report\.judge\.jsonl:1: not a judge cache row"):
        run_evaluate(tmp_path, server, PREDICTIONS)
    assert server.requests == []


@pytest.mark.parametrize("signal, status", [(None, 1), (15, 143), (2, 130)])
def test_incomplete_judgement_exit_status(signal, status) -> None:
    check_judged({"failed": [], "signal": None})  # nothing failed: no exit
    with pytest.raises(SystemExit) as info:
        check_judged({"failed": [{"id": 1, "reason": "not asked: interrupted"}], "signal": signal})
    assert info.value.code == status


def test_parse_judge_reply() -> None:
    assert parse_judge_reply('```json\n{"pairs": [["A2", "B1"], ["B3", "A1"]]}\n```', 2, 3) == {(1, 0), (0, 2)}
    assert parse_judge_reply('{"pairs": []}', 1, 1) == frozenset()
    for bad, why in [('{"pairs": [["A3", "B1"]]}', "'A3' is not one of A1..A2"),
                     ('{"pairs": [["A1", "A2"]]}', "'A2' is not one of B1..B3"),
                     ('{"pairs": [["A1", "B1"]', "not valid JSON"),  # never repaired into a match
                     ('{"matches": []}', '"pairs" list'), ("", "empty reply")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_judge_reply(bad, 2, 3)


@pytest.mark.parametrize("args, env_key, message", [
    (["--judge_base_url", "http://127.0.0.1:9/v1"], KEY, "--judge_base_url needs --judge_model too"),
    (["--judge_model", "m", "--judge_base_url", "127.0.0.1:9/v1"], KEY,
     "--judge_base_url 127.0.0.1:9/v1: not an http:// or https:// URL"),
    (["--judge_model", "m", "--judge_base_url", "http://127.0.0.1:9/v1", "--report", "-"], None, "no API key"),
    (["--judge_model", "m", "--judge_base_url", "http://127.0.0.1:9/v1", "--report", "-"], "short", "7 characters"),
])  # fmt: skip
def test_bad_judge_options_exit_2_in_one_line(tmp_path, monkeypatch, capsys, args, env_key, message) -> None:
    if env_key is None:
        monkeypatch.delenv("HEALTHAI_API_KEY")
    else:
        monkeypatch.setenv("HEALTHAI_API_KEY", env_key if env_key != "short" else "abcdefg")
    args = [a if a != "-" else str(tmp_path / "report.json") for a in args]
    preds, refs = write_jsonl(tmp_path / "p.jsonl", PREDICTIONS), write_jsonl(tmp_path / "r.jsonl", REFERENCES)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--predictions", str(preds), "--references", str(refs), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "report.judge.jsonl").exists()


def test_judge_needs_report(tmp_path, capsys) -> None:
    preds, refs = write_jsonl(tmp_path / "p.jsonl", PREDICTIONS), write_jsonl(tmp_path / "r.jsonl", REFERENCES)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--predictions", str(preds), "--references", str(refs), "--judge_model", "m",
              "--judge_base_url", "http://127.0.0.1:9/v1"])  # fmt: skip
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == ("healthai evaluate: error: --judge_base_url needs --report: the judge's "
                                               "answers are cached beside the report, so a rerun asks nothing twice")
