"""Normalised diagnosis matching (#31): synonym table, qualifier rules, one-to-one, exact always counts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from healthai.errors import InputError
from healthai.metrics import DiseaseF1, match_diseases, normalize_diseases
from healthai.synonyms import DEFAULT_RULES, Normalizer, load_synonyms, match_normalized

KEPT_APART = [("1型糖尿病", "2型糖尿病"), ("甲状腺功能亢进症", "甲状腺功能减退症"), ("肺炎", "肺癌"),
              ("高血压", "低血压"), ("糖尿病", "糖尿病肾病"), ("高血压病", "低血压")]


@pytest.mark.parametrize("a,b", KEPT_APART)
def test_default_rules_keep_other_diseases_apart(a: str, b: str) -> None:
    n = Normalizer()
    assert n.canonical(a) != n.canonical(b)
    assert match_normalized([a], [b], n).matched == []


@pytest.mark.parametrize("rule", DEFAULT_RULES, ids=lambda r: r.name)
def test_each_default_rule_does_its_documented_example(rule) -> None:
    before, after = rule.example.split(" -> ")
    assert Normalizer(rules=[rule]).canonical(before) == after
    assert Normalizer().canonical(before) == Normalizer().canonical(after)


def test_synonym_hit_one_to_one_and_glued_lists(tmp_path: Path) -> None:
    path = tmp_path / "syn.tsv"
    path.write_text("# table\n慢性肾脏病\t慢性肾病\n\n", encoding="utf-8")
    n = Normalizer(load_synonyms(path))
    pred = normalize_diseases("慢性肾病；原发性高血压；高血压(2级)；2型糖尿病伴血糖控制不佳")
    ref = normalize_diseases("1、慢性肾脏病2、2型糖尿病3、高血压")
    m = match_normalized(pred, ref, n)
    # Two predicted names for one 高血压: the first takes it, the second is extra.
    assert m.normalized_pairs == [("慢性肾病", "慢性肾脏病"), ("原发性高血压", "高血压"),
                                  ("2型糖尿病伴血糖控制不佳", "2型糖尿病")]
    assert m.extra == ["高血压(2级)"] and m.missed == []
    assert match_normalized([], ref, n).missed == ref and match_normalized(pred, [], n).extra == pred
    assert n.fingerprint() != Normalizer().fingerprint()


def test_normalized_f1_never_below_exact_on_random_inputs() -> None:
    names = ["高血压", "高血压病", "原发性高血压", "低血压", "2型糖尿病", "1型糖尿病", "糖尿病", "糖尿病肾病",
             "肺炎", "肺癌", "慢性肾病", "慢性肾脏病", "高血压(2级)"]
    rng = random.Random(0)
    preds = ["；".join(rng.sample(names, rng.randint(0, 5))) for _ in range(200)]
    refs = ["；".join(rng.sample(names, rng.randint(0, 5))) for _ in range(200)]
    exact, norm = DiseaseF1(), DiseaseF1(normalizer=Normalizer({"慢性肾病": "慢性肾脏病"}))
    for p, r in zip(preds, refs):
        exact.update([p], [r])
        norm.update([p], [r])
        assert len(match_normalized(normalize_diseases(p), normalize_diseases(r), norm.normalizer).matched) >= len(
            match_diseases(p, r).matched)
    assert norm.compute()["f1"] > exact.compute()["f1"]


@pytest.mark.parametrize("name,text,needle", [
    ("bad.tsv", "高血压\n", "bad.tsv:1"),
    ("two.tsv", "高血压\t高血压病\n低血压\t高血压病\n", "two.tsv:2"),
    ("bad.json", '{"高血压": "高血压病"}', "bad.json"),
    ("syntax.json", '{"高血压": [', "syntax.json:1"),
])
def test_bad_synonym_file_is_refused_in_one_line(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_synonyms(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_json_table(tmp_path: Path) -> None:
    path = tmp_path / "syn.json"
    path.write_text('{"慢性肾脏病": ["慢性肾病", "CKD"]}', encoding="utf-8")
    assert load_synonyms(path) == {"慢性肾脏病": "慢性肾脏病", "慢性肾病": "慢性肾脏病", "CKD": "慢性肾脏病"}


def test_evaluate_reports_exact_and_normalised_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from healthai.evaluate import evaluate
    from tests.test_evaluate import write_jsonl

    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "diseases": "慢性肾病；高血压病", "reason": "", "parse_status": "ok"},
                                               {"id": 2, "diseases": "肺癌", "reason": "", "parse_status": "ok"}])
    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": 1, "diseases": "慢性肾脏病、高血压"}, {"id": 2, "diseases": "肺炎"}])
    table = tmp_path / "syn.tsv"
    table.write_text("慢性肾脏病\t慢性肾病\n", encoding="utf-8")
    result = evaluate(preds, refs, synonyms=table)
    section = result["disease_normalized"]
    assert result["disease_f1"] == section["exact"]["f1"] == 0.0
    assert section["normalized"]["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 肺癌 is not 肺炎
    assert [(m["id"], m["predicted"], m["reference"]) for m in section["normalized_matches"]] == [
        (1, "慢性肾病", "慢性肾脏病"), (1, "高血压病", "高血压")]
    assert section["per_diagnosis"][0] == {"diagnosis": "慢性肾脏病", "support": 1, "exact_recall": 0.0,
                                           "normalized_recall": 1.0}
    assert section["fingerprint"] == Normalizer(load_synonyms(table)).fingerprint()
    assert "normalised match, record 1: 慢性肾病 = 慢性肾脏病" in capsys.readouterr().out
    table.write_text("慢性肾脏病 慢性肾病\n", encoding="utf-8")
    with pytest.raises(InputError, match="syn.tsv:1"):
        evaluate(preds, refs, synonyms=table)


def test_answer_metrics_logs_the_normalised_f1_beside_the_exact_one() -> None:
    from healthai.metrics import answer_metrics
    from types import SimpleNamespace

    collection = answer_metrics(Normalizer())
    answer = SimpleNamespace(diseases="原发性高血压；肺癌", reason="", status="ok")
    collection.update([answer], [{"diseases": "高血压；肺炎", "reason": None}])
    got = {k: float(v) for k, v in collection.compute().items()}
    assert got["disease_f1"] == 0.0 and got["disease_f1_normalized"] == pytest.approx(0.5)
    assert list(got) == collection.names() and "disease_f1_normalized" not in answer_metrics().names()


def test_synonyms_suggest_ranks_unmatched_pairs_and_skips_matched_ones(tmp_path: Path, capsys) -> None:
    from healthai.suggest import Synonyms
    from tests.test_evaluate import write_jsonl

    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "diseases": "慢性肾病；2型糖尿病；原发性高血压", "reason": ""}])
    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": 1, "diseases": "慢性肾脏病、1型糖尿病、高血压"}])
    rows = Synonyms().suggest(preds, refs, limit=2)
    assert [(p, r) for _, p, r, _ in rows] == [("慢性肾病", "慢性肾脏病"), ("2型糖尿病", "1型糖尿病")]
    assert "慢性肾病\t慢性肾脏病\t1" in capsys.readouterr().out


def test_compare_bootstraps_the_normalised_difference_too(tmp_path: Path) -> None:
    from healthai.compare import compare
    from tests.test_evaluate import write_jsonl

    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": i, "diseases": "高血压、肺炎"} for i in range(4)])
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "diseases": "高血压；肺炎", "reason": ""} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "diseases": "高血压病；肺炎", "reason": ""} for i in range(4)])
    result = compare([f"a={a}", f"b={b}"], refs, resamples=100)
    (pair,) = result["pairs"]
    assert pair["difference"] == pytest.approx(-0.5)  # exact: 高血压病 is not 高血压
    assert pair["normalized"] == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}  # the same disease
    assert result["systems"]["b"]["disease_normalized"]["normalized"]["f1"] == 1.0


def test_html_summary_shows_the_normalised_rows_beside_the_exact_ones() -> None:
    from healthai.report import SystemResult, normalized_rows

    section = {"fingerprint": "abc", "normalized": {"f1": 0.75, "precision": 1.0, "recall": 0.5}}
    rows = normalized_rows([SystemResult("a", "a.jsonl", {"disease_normalized": section}, [])])
    assert rows[0][0] == "disease f1 (normalised, synonyms abc)" and "0.75" in rows[0][1]
    assert normalized_rows([SystemResult("a", "a.jsonl", {}, [])]) == []
