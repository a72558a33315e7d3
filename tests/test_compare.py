"""evaluate's breakdowns and ``healthai compare`` (paired bootstrap intervals, right/wrong records, missing records,
names, output checks) on hand-made files whose answers are known; the HTML report's content and self-containment."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from healthai.__main__ import gather_positionals, main
from healthai.compare import compare, parse_systems
from healthai.errors import ConfigError
from healthai.evaluate import evaluate

REFS = [
    {"id": 1, "diseases": "高血压；冠心病", "feature_content": "甲" * 100},
    {"id": 2, "diseases": "高血压", "feature_content": "乙" * 300},
    {"id": 3, "diseases": "肺炎", "feature_content": "丙" * 600},
    {"id": 4, "diseases": ["高血压", "肺炎"]},  # no case text here: the prediction row's is used
    {"id": 5, "diseases": "胃炎"},  # no case text anywhere, and no prediction
]
PREDS = [
    {"id": 1, "diseases": "高血压；糖尿病", "parse_status": "ok"},  # TP 1 FP 1 FN 1
    {"id": 2, "diseases": "高血压", "parse_status": "repaired"},  # TP 1
    {"id": 3, "diseases": "感冒", "parse_status": "failed"},  # FP 1 FN 1
    {"id": "4", "diseases": "1、高血压2、肺炎", "parse_status": "ok", "feature_content": "丁" * 2500},  # TP 2
]


def test_breakdowns_hand_computed(tmp_path: Path, capsys) -> None:
    refs, preds = write_jsonl(tmp_path / "refs.jsonl", REFS), write_jsonl(tmp_path / "preds.jsonl", PREDS)
    b = evaluate(preds, refs, top_diagnoses=3)["breakdown"]

    # Support: 高血压 3 records, 肺炎 2, then 冠心病 and 胃炎 1 each (冠心病 first in the file).
    assert [(d["diagnosis"], d["support"], d["tp"], d["fp"], d["fn"]) for d in b["diagnoses"]] == [
        ("高血压", 3, 3, 0, 0), ("肺炎", 2, 1, 0, 1), ("冠心病", 1, 0, 0, 1)]  # fmt: skip
    assert [(d["precision"], d["recall"]) for d in b["diagnoses"]] == [(1.0, 1.0), (1.0, 0.5), (0.0, 0.0)]
    assert b["diagnoses"][1]["f1"] == pytest.approx(2 / 3)

    status = {k: (v["n"], v["tp"], v["fp"], v["fn"], v["f1"]) for k, v in b["parse_status"].items()}
    assert status == {"ok": (2, 3, 1, 1, 0.75), "repaired": (1, 1, 0, 0, 1.0), "failed": (1, 0, 1, 1, 0.0),
                      "missing": (1, 0, 0, 1, 0.0)}  # fmt: skip

    length = {r["bucket"]: (r["n"], r["f1"]) for r in b["case_length_chars"]}
    assert length == {"<250": (1, 0.5), "250-499": (1, 1.0), "500-999": (1, 0.0), "1000-1999": (0, 0.0),
                      ">=2000": (1, 1.0), "unknown": (1, 0.0)}  # fmt: skip
    # Each breakdown's groups add up to the file's counts (TP 4, FP 2, FN 3).
    for groups in (list(b["parse_status"].values()), b["case_length_chars"]):
        assert [sum(g[c] for g in groups) for c in ("n", "tp", "fp", "fn")] == [5, 4, 2, 3]

    out = capsys.readouterr().out
    assert "per diagnosis (the 3 most frequent in the references)" in out and "高血压" in out
    assert "per parse_status" in out and "per case length (characters)" in out


def test_breakdown_options_are_checked(tmp_path: Path) -> None:
    refs, preds = write_jsonl(tmp_path / "refs.jsonl", REFS), write_jsonl(tmp_path / "preds.jsonl", PREDS)
    with pytest.raises(ConfigError, match="length_edges must be increasing"):
        evaluate(preds, refs, length_edges=[500, 250])
    with pytest.raises(ConfigError, match="top_diagnoses: Not of type PositiveInt: 0 does not conform"):
        evaluate(preds, refs, top_diagnoses=0)


def records(n: int) -> list[dict]:
    return [{"id": i, "diseases": f"病{i % 7}；症{i % 5}", "feature_content": "病历" * (20 + 10 * i)} for i in range(n)]


def answers(refs: list[dict], right: list[bool]) -> list[dict]:
    return [{"id": r["id"], "diseases": r["diseases"] if ok else "错", "parse_status": "ok"} for r, ok in zip(refs, right)]


def test_identical_files_differ_by_zero_with_an_interval_at_zero(tmp_path: Path) -> None:
    refs = records(40)
    ref_path = write_jsonl(tmp_path / "refs.jsonl", refs)
    rows = answers(refs, [i % 3 != 0 for i in range(40)])
    a, b = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows)
    (pair,) = compare([str(a), str(b)], ref_path, resamples=1000)["pairs"]
    assert (pair["a"], pair["b"]) == ("a", "b")
    assert pair["difference"] == 0.0 and pair["ci_low"] == pytest.approx(0.0) and pair["ci_high"] == pytest.approx(0.0)
    assert not pair["excludes_zero"] and pair["a_right_b_wrong"] == [] and pair["b_right_a_wrong"] == []


def test_all_right_against_all_wrong_is_far_from_zero(tmp_path: Path, capsys) -> None:
    refs = records(30)
    ref_path = write_jsonl(tmp_path / "refs.jsonl", refs)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", answers(refs, [False] * 30))
    right = write_jsonl(tmp_path / "right.jsonl", answers(refs, [True] * 30))
    result = compare([f"base={wrong}", f"tuned={right}"], ref_path, resamples=1000)
    (pair,) = result["pairs"]
    assert result["systems"]["base"]["disease_f1"] == 0.0 and result["systems"]["tuned"]["disease_f1"] == 1.0
    assert pair["difference"] == 1.0 and pair["ci_low"] == pytest.approx(1.0) and pair["excludes_zero"]
    assert pair["b_right_a_wrong"] == [r["id"] for r in refs] and pair["a_right_b_wrong"] == []
    assert "tuned is better beyond the noise" in capsys.readouterr().out


def test_interval_is_seeded_and_covers_the_difference(tmp_path: Path) -> None:
    refs = records(60)
    ref_path = write_jsonl(tmp_path / "refs.jsonl", refs)
    a = write_jsonl(tmp_path / "a.jsonl", answers(refs, [i % 2 == 0 for i in range(60)]))  # right on 30
    b = write_jsonl(tmp_path / "b.jsonl", answers(refs, [i % 3 != 0 for i in range(60)]))  # right on 40

    def pair(seed: int) -> dict:
        return compare([str(a), str(b)], ref_path, resamples=2000, seed=seed)["pairs"][0]

    p0, again, p1 = pair(0), pair(0), pair(1)
    assert (p0["ci_low"], p0["ci_high"]) == (again["ci_low"], again["ci_high"])
    assert (p0["ci_low"], p0["ci_high"]) != (p1["ci_low"], p1["ci_high"])
    assert p0["ci_low"] < p0["difference"] < p0["ci_high"] and p0["ci_high"] - p0["ci_low"] > 0.05
    # right in b only: records with i % 2 == 1 and i % 3 != 0; right in a only: i % 2 == 0 and i % 3 == 0
    assert p0["b_right_a_wrong"] == [i for i in range(60) if i % 2 == 1 and i % 3 != 0]
    assert p0["a_right_b_wrong"] == [i for i in range(60) if i % 6 == 0]


def test_missing_records_are_reported_and_count_as_wrong(tmp_path: Path, capsys) -> None:
    refs = records(10)
    ref_path = write_jsonl(tmp_path / "refs.jsonl", refs)
    full = write_jsonl(tmp_path / "full.jsonl", answers(refs, [True] * 10))
    partial = write_jsonl(tmp_path / "partial.jsonl", answers(refs, [True] * 10)[:8])
    result = compare([str(full), str(partial)], ref_path, resamples=500)
    assert result["systems"]["partial"]["missing"] == [8, 9] and result["systems"]["partial"]["n"] == 10
    assert result["systems"]["partial"]["breakdown"]["parse_status"]["missing"]["n"] == 2
    assert result["pairs"][0]["a_right_b_wrong"] == [8, 9] and result["pairs"][0]["difference"] < 0
    assert "partial: missing ids: 8, 9" in capsys.readouterr().out


def test_three_systems_give_every_pair_in_order(tmp_path: Path) -> None:
    refs = records(6)
    ref_path = write_jsonl(tmp_path / "refs.jsonl", refs)
    paths = [str(write_jsonl(tmp_path / f"{n}.jsonl", answers(refs, [True] * 6))) for n in ("x", "y", "z")]
    result = compare(paths, ref_path, resamples=100)
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("x", "y"), ("x", "z"), ("y", "z")]


def test_system_names() -> None:
    assert [(s.name, str(s.path)) for s in parse_systems(["runs/a.jsonl", "tuned=runs/b.jsonl"])] == [
        ("a", "runs/a.jsonl"), ("tuned", "runs/b.jsonl")]  # fmt: skip
    assert parse_systems(["runs/lr=2e-4/p.jsonl", "q.jsonl"])[0].name == "p"  # "=" inside a path is not a name
    with pytest.raises(ConfigError, match="two systems are named 'p'"):
        parse_systems(["x/p.jsonl", "y/p.jsonl"])
    with pytest.raises(ConfigError, match="compare needs two or more predictions files, got 1"):
        parse_systems(["a.jsonl"])
    with pytest.raises(ConfigError, match="is not PATH or NAME=PATH"):
        parse_systems(["=a.jsonl", "b.jsonl"])


def test_bare_words_are_the_systems() -> None:
    args = ["--references", "r.jsonl", "a.jsonl", "--seed=3", "t=b.jsonl", "--html", "x.html"]
    assert gather_positionals(args, "systems") == [
        "--references", "r.jsonl", "--seed=3", "--html", "x.html", '--systems=["a.jsonl", "t=b.jsonl"]']  # fmt: skip
    assert gather_positionals(["--print_config", "a.jsonl"], "systems") == ["--print_config", '--systems=["a.jsonl"]']


@pytest.fixture
def three_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    refs = records(8)
    return (write_jsonl(tmp_path / "refs.jsonl", refs), write_jsonl(tmp_path / "a.jsonl", answers(refs, [True] * 8)),
            write_jsonl(tmp_path / "b.jsonl", answers(refs, [False] * 8)))  # fmt: skip


def run_main(argv: list[str], capfd, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def test_command_line_writes_the_report(three_files, tmp_path: Path, capfd, monkeypatch) -> None:
    refs, a, b = three_files
    out = tmp_path / "out" / "compare.json"
    code, stdout, err = run_main(["compare", str(a), "--references", str(refs), str(b), "--report", str(out),
                                  "--resamples", "200"], capfd, monkeypatch)  # fmt: skip
    assert code == 0, err
    written = json.loads(out.read_text(encoding="utf-8"))
    assert list(written["systems"]) == ["a", "b"] and written["pairs"][0]["difference"] == -1.0
    assert re.search(r"metric\s+a\s+b", stdout) and "b - a: disease F1 -1.0000" in stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--report", "{refs}"], "--report {refs} would overwrite --references {refs}; choose another path"),
        (["--html", "{a}"], "--html {a} would overwrite system 'a' {a}; choose another path"),
        (["--report", "{tmp}/o.json", "--html", "{tmp}/o.json"], "--html {tmp}/o.json would overwrite --report {tmp}/o.json; choose another path"),
        (["--resamples", "10"], '--resamples: Not of type ResampleCount: 10 does not conform to restriction v>=100 and v<=1000000'),
        (["--resamples", "1000000000"], '--resamples: Not of type ResampleCount: 1000000000 does not conform to restriction v>=100 and v<=1000000'),
        (["--seed", "-1"], '--seed: Not of type NonNegativeInt: -1 does not conform to restriction v>=0'),
        (["--confidence", "1.5"], '--confidence: Not of type OpenUnitInterval: 1.5 does not conform to restriction v>0 and v<1'),
        (["{tmp}/nothing.jsonl"], "system 'nothing': no such predictions file: {tmp}/nothing.jsonl"),
    ],
)
def test_bad_options_are_one_line(three_files, tmp_path, capfd, monkeypatch, extra, message) -> None:
    refs, a, b = three_files
    fill = {"refs": refs, "a": a, "tmp": tmp_path}
    argv = ["compare", "--references", str(refs), str(a), str(b), *(x.format(**fill) for x in extra)]
    code, _, err = run_main(argv, capfd, monkeypatch)
    assert (code, err) == (2, f"healthai compare: error: {message.format(**fill)}\n")
    assert refs.read_text(encoding="utf-8").startswith('{"id": 0')  # no input was touched


def test_bad_line_in_a_system_file_names_file_and_line(three_files, capfd, monkeypatch) -> None:
    refs, a, b = three_files
    b.write_text(b.read_text(encoding="utf-8") + '{"id": 9, "diseases": \n', encoding="utf-8")
    code, _, err = run_main(["compare", "--references", str(refs), str(a), str(b)], capfd, monkeypatch)
    assert code == 2 and err.startswith(f"healthai compare: error: {b}:9: malformed JSON") and err.count("\n") == 1


def external_references(page: str) -> list[str]:
    """Anything a browser would fetch: src/href attributes, stylesheets, scripts, CSS url() and @import."""
    found = re.findall(r"""(?:src|href)\s*=\s*["'][^"'#]""", page)
    found += re.findall(r"<link|<script|<img|<iframe|url\((?!#)|@import", page)  # url(#id): a reference inside the page
    return found


def test_html_report_is_self_contained_and_shows_everything(three_files, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    refs, a, b = three_files
    html_path = tmp_path / "report.html"
    compare([f"zero-shot={b}", f"tuned={a}"], refs, html=html_path, resamples=200, examples=3)
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert external_references(page) == []
    assert page.count("<svg") == 2  # the per-diagnosis F1 chart and the differences chart
    assert "tuned − zero-shot" in page and "+1.0000" in page and "[+1.0000, +1.0000]" in page
    assert "tuned is better" in page
    # Example records: case start, reference, each system's answer marked matched / extra / missed.
    assert page.count('<div class="case">') == 3 and "病历病历" in page
    assert '<span class="m">病0</span>' in page and '<span class="x">错</span>' in page and "missed: 病0" in page

    evaluate(a, refs, html=tmp_path / "eval.html")
    single = (tmp_path / "eval.html").read_text(encoding="utf-8")
    assert single.count("<svg") == 1 and external_references(single) == [] and "HealthAI evaluation" in single


def test_html_without_matplotlib_names_the_extra(three_files, tmp_path, capfd, monkeypatch) -> None:
    refs, a, _ = three_files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, _, err = run_main(["evaluate", "--predictions", str(a), "--references", str(refs), "--html",
                             str(tmp_path / "r.html")], capfd, monkeypatch)  # fmt: skip
    assert (code, err) == (2, "healthai evaluate: error: --html needs matplotlib, which is not installed: it comes with "
                              "the 'report' extra (pip install -e '.[report]' in a clone, pip install "
                              "'healthai[report]' otherwise)\n")  # fmt: skip
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_report_page_in_headless_chromium(three_files, tmp_path: Path) -> None:
    """The page as a browser draws it: the DOM holds the tables, and a screenshot is a drawn page, not a blank one."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the page is not browser-checked")
    pytest.importorskip("matplotlib")
    from PIL import Image

    refs, a, b = three_files
    page = tmp_path / "report.html"
    compare([f"zero-shot={b}", f"tuned={a}"], refs, html=page, resamples=200)
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "Disease F1 differences" in dom and "tuned is better" in dom and dom.count("<svg") == 2
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()], capture_output=True,
                   timeout=120, cwd=tmp_path)  # fmt: skip
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 1400)
    # A drawn page has text, table borders and the chart's bar colours; a blank or error page has a handful.
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200
    from healthai.report import COLORS

    tuned_bars = tuple(int(COLORS[1][i : i + 2], 16) for i in (1, 3, 5))  # the second system's F1 bars (1.0 each)
    assert any(sum(abs(c - t) for c, t in zip(rgb, tuned_bars)) < 12 for _, rgb in colours)
