"""Hand-computed checks of :mod:`healthai.metrics`: normalisation rules, P/R/F1, character ROUGE-L, state merging."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from healthai.metrics import (
    DiseaseF1,
    JsonValidRate,
    ReasonRougeL,
    lcs_length,
    match_diseases,
    normalize_diseases,
    rouge_l_char,
)
from healthai.synonyms import Normalizer

# ---------------------------------------------------------------------------------------------- normalize_diseases


@pytest.mark.parametrize(
    "text, expected",
    [
        # Enumeration markers glued to the previous name act as separators.
        ("1、慢性胃肠炎2、功能性消化不良", ["慢性胃肠炎", "功能性消化不良"]),
        ("1. 高尿酸血症；2. 皮炎；3. 失眠", ["高尿酸血症", "皮炎", "失眠"]),
        ("1.高血压2.冠心病", ["高血压", "冠心病"]),
        ("1)胃炎 2)肠炎", ["胃炎", "肠炎"]),
        ("1）胃炎2）肠炎", ["胃炎", "肠炎"]),
        ("(1)高血压(2)冠心病", ["高血压", "冠心病"]),
        ("（1）高血压（2）冠心病", ["高血压", "冠心病"]),
        ("１．高血压２．冠心病", ["高血压", "冠心病"]),  # full-width digits and "．"
        # Digits that belong to a name stay.
        ("2型糖尿病", ["2型糖尿病"]),
        ("1、2型糖尿病", ["2型糖尿病"]),
        ("（1）高血压（2）2型糖尿病", ["高血压", "2型糖尿病"]),
        ("原发性高血压（1级）", ["原发性高血压(1级)"]),  # bracket holds "1级", not a bare digit run; NFKC → ASCII
        ("多囊卵巢综合征（PCOS）", ["多囊卵巢综合征(PCOS)"]),
        ("COVID-19、高血压", ["COVID-19", "高血压"]),
        ("维生素B12缺乏。", ["维生素B12缺乏"]),
        ("1.5度烧伤", ["1.5度烧伤"]),  # a decimal is not marker "1."
        # Full-width punctuation is folded by NFKC; every separator splits.
        ("高血压，糖尿病；冠心病、胃炎", ["高血压", "糖尿病", "冠心病", "胃炎"]),
        ("高血压,糖尿病;冠心病\n胃炎\r\n肠炎", ["高血压", "糖尿病", "冠心病", "胃炎", "肠炎"]),
        # Question marks, full stops, colons and spaces at either end are stripped; inner ones stay.
        ("肺炎？", ["肺炎"]),
        ("肺炎?？", ["肺炎"]),
        ("诊断：肺炎。", ["诊断:肺炎"]),
        ("  高血压 病  ", ["高血压 病"]),
        ("\u3000发热\u3000", ["发热"]),  # ideographic space
        # Duplicates and empty items go, first occurrence order kept.
        ("胃炎，肠炎，胃炎", ["胃炎", "肠炎"]),
        ("胃炎，胃炎？", ["胃炎"]),
        ("，，；胃炎,, ；", ["胃炎"]),
        ("", []),
        ("？。", []),
        (None, []),
    ],
)
def test_normalize_diseases(text: str | None, expected: list[str]) -> None:
    assert normalize_diseases(text) == expected


def test_official_example_diseases() -> None:
    assert normalize_diseases("1. 高尿酸血症；2. 皮炎；3. 失眠；4. 原发性高血压（1级）") == [
        "高尿酸血症",
        "皮炎",
        "失眠",
        "原发性高血压(1级)",
    ]


def test_match_diseases_lists_and_exact_equality() -> None:
    m = match_diseases("1、高血压2、冠心病？", ["冠心病", "糖尿病"])  # a list target is joined with "；"
    assert m.matched == ["冠心病"]
    assert m.missed == ["糖尿病"]
    assert m.extra == ["高血压"]
    # Exact string equality after normalisation: "高血压病" is not "高血压".
    assert match_diseases("高血压病", "高血压") == ([], ["高血压"], ["高血压病"])
    assert match_diseases(None, "胃炎") == ([], ["胃炎"], [])


# ---------------------------------------------------------------------------------------------- DiseaseF1

PREDS = ["高血压；糖尿病", "", "胃炎,胃炎,肠炎", "感冒"]
TARGETS = ["1、高血压2、冠心病", "肺炎", "胃炎", "感冒、发热"]
# Per record (TP, FP, FN): (1, 1, 1), (0, 0, 1), (1, 1, 0), (1, 0, 1) → TP 3, FP 2, FN 3.
# P = 3/5, R = 3/6, F1 = 2·0.6·0.5 / 1.1 = 6/11.


def test_disease_f1_hand_computed() -> None:
    metric = DiseaseF1()
    metric.update(PREDS, TARGETS)
    out = metric.compute()
    assert (int(metric.tp), int(metric.fp), int(metric.fn)) == (3, 2, 3)
    assert out["precision"].item() == pytest.approx(0.6)
    assert out["recall"].item() == pytest.approx(0.5)
    assert out["f1"].item() == pytest.approx(6 / 11)


def test_disease_f1_undefined_is_zero_and_lengths_checked() -> None:
    metric = DiseaseF1()
    metric.update([""], ["肺炎"])  # no prediction: only a false negative, P undefined
    assert {k: v.item() for k, v in metric.compute().items()} == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError):
        metric.update(["a"], [])


# ---------------------------------------------------------------------------------------------- JsonValidRate


def test_json_valid_rate() -> None:
    metric = JsonValidRate()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().item() == 0.0  # nothing seen yet
    metric.update(["ok", "repaired", "failed", "ok"])
    assert metric.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="OK"):
        metric.update(["OK"])


# ---------------------------------------------------------------------------------------------- ROUGE-L


def _lcs_dp(a: str, b: str) -> int:
    """The textbook O(n·m) LCS, as an oracle for the bit-parallel one."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_length_hand_computed_and_against_dp() -> None:
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the CLRS example
    assert lcs_length("", "abc") == lcs_length("abc", "") == 0
    assert lcs_length("患者发热三天", "患者咳嗽发热") == 4
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("甲乙丙丁ab") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("甲乙丙丁ab") for _ in range(rng.randint(0, 70)))
        assert lcs_length(a, b) == _lcs_dp(a, b), (a, b)


def test_rouge_l_char_hand_computed() -> None:
    # LCS "患者发热" = 4 of 6 and 6: P = R = 2/3.
    assert rouge_l_char("患者发热三天", "患者咳嗽发热") == pytest.approx(2 / 3)
    # LCS 2: P = 1, R = 1/2, F = 2·1·0.5/1.5 = 2/3.
    assert rouge_l_char("ab", "abcd") == pytest.approx(2 / 3)
    assert rouge_l_char("发热", "发热") == 1.0
    assert rouge_l_char("", "发热") == rouge_l_char(None, "发热") == rouge_l_char("咳嗽", "发热") == 0.0
    # NFKC folds "，" to ","; whitespace is layout, not content.
    assert rouge_l_char("发热，咳嗽", "发热, 咳嗽\n") == 1.0


def test_rouge_l_char_agrees_with_torchmetrics_on_characters() -> None:
    from torchmetrics.text.rouge import ROUGEScore

    pairs = [("患者发热三天", "患者咳嗽发热"), ("主诉腹痛伴腹泻两天", "腹泻两天腹痛")]
    # torchmetrics' default normaliser drops every non-ASCII character, so it must be given identity + characters.
    reference = ROUGEScore(rouge_keys="rougeL", normalizer=lambda s: s, tokenizer=list)
    for pred, target in pairs:
        expected = reference([pred], [target])["rougeL_fmeasure"].item()
        assert rouge_l_char(pred, target) == pytest.approx(expected, abs=1e-6)


def test_reason_rouge_l_skips_records_without_reference() -> None:
    metric = ReasonRougeL()
    metric.update(["患者发热三天", "无关", None], ["患者咳嗽发热", None, "发热"])
    metric.update(["x"], ["   "])  # blank reference: skipped too
    assert int(metric.count) == 2
    assert metric.compute().item() == pytest.approx((2 / 3 + 0.0) / 2)
    empty = ReasonRougeL()
    empty.update(["a"], [None])
    assert int(empty.count) == 0 and empty.compute().item() == 0.0


# ---------------------------------------------------------------------------------------------- syncing state

REASON_PREDS = ["患者发热三天", "ab", "", "发热"]
REASON_TARGETS = ["患者咳嗽发热", "abcd", "咳嗽", None]
STATUSES = ["ok", "failed", "repaired", "ok"]


# The normalised metric's own predictions: a qualifier (原发性) on rank 0's record, a synonym on rank 1's.
NORM_PREDS = ["原发性高血压；糖尿病", "", "胃炎,胃炎,肠炎", "感冒；发烧"]


def _metrics() -> tuple[DiseaseF1, JsonValidRate, ReasonRougeL, DiseaseF1]:
    return DiseaseF1(), JsonValidRate(), ReasonRougeL(), DiseaseF1(normalizer=Normalizer({"发烧": "发热"}))


def _update(metrics: tuple[DiseaseF1, JsonValidRate, ReasonRougeL, DiseaseF1], lo: int, hi: int) -> None:
    f1, valid, rouge, norm = metrics
    f1.update(PREDS[lo:hi], TARGETS[lo:hi])
    norm.update(NORM_PREDS[lo:hi], TARGETS[lo:hi])
    valid.update(STATUSES[lo:hi])
    rouge.update(REASON_PREDS[lo:hi], REASON_TARGETS[lo:hi])


def _values(metrics: tuple[DiseaseF1, JsonValidRate, ReasonRougeL, DiseaseF1]) -> dict[str, float]:
    f1, valid, rouge, norm = metrics
    out = {k: v.item() for k, v in f1.compute().items()}
    out.update({f"{k}_normalized": v.item() for k, v in norm.compute().items()})
    return {**out, "json_valid_rate": valid.compute().item(), "rougeL": rouge.compute().item()}


def test_merge_state_equals_single_pass() -> None:
    whole, first, second = _metrics(), _metrics(), _metrics()
    _update(whole, 0, 4)
    _update(first, 0, 1)  # uneven shards, as DDP with a distributed sampler's padding can give
    _update(second, 1, 4)
    for a, b in zip(first, second):
        a.merge_state(b)
    assert _values(first) == pytest.approx(_values(whole))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: update on its own shard, then compute() — which all-reduces the sum states over gloo."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metrics = _metrics()
        lo, hi = (0, 1) if rank == 0 else (1, 4)
        _update(metrics, lo, hi)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(_values(metrics)))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync_equals_single_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # Forked, not spawned: a spawned child starts an interpreter and imports torch and torchmetrics again (4 s of CPU
    # each). This process has no process group and its torch runs one thread, so a fork starts clean.
    assert not torch.distributed.is_initialized()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    whole = _metrics()
    _update(whole, 0, 4)
    expected = _values(whole)
    # TP 4 (高血压 by 原发性, 感冒, 胃炎, 发热 by the table), FP 2, FN 2: the normalised rule matched across shards.
    assert expected["f1_normalized"] == pytest.approx(8 / 12) and expected["f1"] == pytest.approx(6 / 11)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(expected)


def test_states_are_sum_reduced_tensors() -> None:
    # The DDP contract: every state is a tensor summed across processes (no list states to gather).
    for metric in _metrics():
        assert metric._defaults and all(isinstance(v, torch.Tensor) for v in metric._defaults.values())
        assert all(fx is dim_zero_sum for fx in metric._reductions.values())
