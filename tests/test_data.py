"""Data: token-exact loss mask, answer-protecting truncation, padding, the length-grouped sampler, bad input."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from conftest import labelled_records, seed_records, write_jsonl
from healthai.batching import LengthGroupedSampler, PromptCollator, TrainCollator
from healthai.data import DiagnosisDataModule, split_records
from healthai.encoding import IGNORE_INDEX, encode_example, prompt_ids
from healthai.jsonl import BadRecordError
from healthai.prompts import PromptStyle, answer_text
from healthai.records import read_records


def chat_ids(tokenizer, messages, add_generation_prompt):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("record", labelled_records(4), ids=lambda r: str(r["id"]))
def test_labels_mask_everything_but_answer_and_end_of_turn(tokenizer, record):
    prompt = PromptStyle()
    enc = encode_example(tokenizer, prompt, record["feature_content"], record["diseases"], record["reason"], 4096)
    answer = {"role": "assistant", "content": answer_text(record["diseases"], record["reason"])}
    conversation = prompt.messages(record["feature_content"]) + [answer]
    full = chat_ids(tokenizer, conversation, add_generation_prompt=False)
    prompt_only = chat_ids(tokenizer, prompt.messages(record["feature_content"]), add_generation_prompt=True)
    # The template ends the assistant turn with <|im_end|> "\n"; the example stops at <|im_end|>.
    assert full[-2:] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.encode("\n")[0]]
    assert enc["input_ids"] == full[:-1]
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_only) + full[len(prompt_only) : -1]
    assert enc["prompt_len"] == len(prompt_only) and not enc["trimmed"]
    learned = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == answer_text(record["diseases"], record["reason"]) + "<|im_end|>"


def test_answer_text_is_json_dumps():
    text = answer_text(["高血压", "糖尿病"], '依据 "引号"')
    assert json.loads(text) == {"diseases": "高血压；糖尿病", "reason": '依据 "引号"'}
    assert text == json.dumps({"diseases": "高血压；糖尿病", "reason": '依据 "引号"'}, ensure_ascii=False)


def test_truncation_trims_case_text_never_the_answer(tokenizer):
    record = max(seed_records(96), key=lambda r: len(r["feature_content"]))
    prompt, diseases, reason = PromptStyle(), "高血压；2型糖尿病", "1. 血压高；2. 血糖高。"
    full = encode_example(tokenizer, prompt, record["feature_content"], diseases, reason, 100_000)
    max_length = len(full["input_ids"]) // 2
    enc = encode_example(tokenizer, prompt, record["feature_content"], diseases, reason, max_length)
    assert enc["trimmed"] and len(enc["input_ids"]) <= max_length
    answer = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert answer == [t for t in full["labels"] if t != IGNORE_INDEX]  # the whole answer survives
    kept = tokenizer.decode(enc["input_ids"][: enc["prompt_len"]])
    assert kept.endswith("<|im_start|>assistant\n")
    case_kept = kept.split("病历如下：\n", 1)[1].split("<|im_end|>", 1)[0]
    assert record["feature_content"].startswith(case_kept) and 0 < len(case_kept) < len(record["feature_content"])
    # As long as possible: one more character would not fit.
    longer = encode_example(tokenizer, prompt, record["feature_content"][: len(case_kept) + 1], diseases, reason, 10**6)
    assert len(longer["input_ids"]) > max_length


def test_answer_longer_than_max_length_is_an_error_not_a_cut(tokenizer):
    with pytest.raises(ValueError, match="answer alone"):
        encode_example(tokenizer, PromptStyle(), "性别: 男", "高血压", "很长的依据" * 50, 64)


def test_train_collate_pads_right_with_pad_id_ignore_and_zero_mask():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "prompt_len": 1},
        {"input_ids": [4, 5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8], "prompt_len": 2},
    ]
    batch = TrainCollator(pad_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long
    rounded = TrainCollator(pad_id=0, pad_to_multiple_of=8)(examples)
    assert rounded["input_ids"].shape == (2, 8) and rounded["attention_mask"][:, 5:].sum() == 0


def test_prompt_collate_pads_left_for_generation():
    examples = [
        {"input_ids": [1, 2, 3, 9], "prompt_len": 3, "record": {"id": "a"}, "order": 1},
        {"input_ids": [4, 5], "prompt_len": 2, "record": {"id": "b"}, "order": 0},
    ]
    batch = PromptCollator(pad_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["order"] == [1, 0] and [r["id"] for r in batch["records"]] == ["a", "b"]


@pytest.mark.parametrize("replicas", [1, 2])
def test_sampler_covers_every_index_once_per_epoch(replicas):
    lengths = [(i * 37) % 101 + 1 for i in range(96)]  # 96 = 4 batches × 8 × {1, 2} replicas × 3
    for epoch in range(3):
        seen = []
        per_rank = []
        for rank in range(replicas):
            sampler = LengthGroupedSampler(lengths, batch_size=4, num_replicas=replicas, rank=rank, seed=7)
            sampler.set_epoch(epoch)
            indices = list(sampler)
            assert len(indices) == len(sampler)
            per_rank.append(indices)
            seen += indices
        assert sorted(seen) == list(range(96))
        assert len({len(r) for r in per_rank}) == 1  # ranks take the same number of batches


def test_sampler_tops_up_uneven_datasets_and_reshuffles_per_epoch():
    lengths = list(range(1, 31))  # 30 records, global batch 8 → 32 slots
    per_epoch = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            s = LengthGroupedSampler(lengths, batch_size=4, num_replicas=2, rank=rank, seed=0)
            s.set_epoch(epoch)
            seen += list(s)
        assert len(seen) == 32 and set(seen) == set(range(30))
        assert max(Counter(seen).values()) == 2
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]


def rank_batches(lengths, batch_size, replicas, epoch, seed=0):
    """Each rank's batches (lists of indices) for one epoch."""
    out = []
    for rank in range(replicas):
        sampler = LengthGroupedSampler(lengths, batch_size=batch_size, num_replicas=replicas, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        out.append([indices[i : i + batch_size] for i in range(0, len(indices), batch_size)])
    return out


@pytest.mark.parametrize("records", [1, 3, 5])
def test_fewer_records_than_a_global_batch_still_give_every_rank_full_equal_batches(records):
    # 4 ranks × batch 4 = 16 slots: a rank with fewer batches than the others would hang DDP's all-reduce.
    per_rank = rank_batches([10 + i for i in range(records)], batch_size=4, replicas=4, epoch=0)
    assert [[len(b) for b in batches] for batches in per_rank] == [[4]] * 4
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(records))
    assert max(Counter(seen).values()) - min(Counter(seen).values()) <= 1  # repeated evenly, as DistributedSampler


@pytest.mark.parametrize("replicas", [1, 2])
def test_every_epoch_starts_with_its_longest_batch(replicas):
    lengths = [(i * 37) % 101 + 1 for i in range(96)]  # one longest sequence (101), 12 or 24 batches per rank
    longest = lengths.index(max(lengths))
    for epoch in range(6):
        per_rank = rank_batches(lengths, batch_size=4, replicas=replicas, epoch=epoch, seed=5)
        assert longest in per_rank[0][0], epoch


def test_the_longest_sequences_of_a_step_are_spread_over_the_ranks():
    lengths = list(range(1, 65))  # distinct lengths; 4 ranks × batch 4, 4 steps
    per_rank = rank_batches(lengths, batch_size=4, replicas=4, epoch=0)
    for step in range(len(per_rank[0])):
        batches = [per_rank[rank][step] for rank in range(4)]
        union = sorted((lengths[i] for b in batches for i in b), reverse=True)
        maxima = sorted((max(lengths[i] for i in b) for b in batches), reverse=True)
        assert maxima == union[:4]  # each rank holds one of the step's 4 longest sequences


def test_sampler_groups_similar_lengths_so_padding_is_low(tokenizer):
    # Real records' prompt lengths plus a typical answer of ~150 tokens.
    # The fixture's records sit at evenly spaced length quantiles, so 512 seeded draws from them follow the real
    # length distribution of a training file (at 96 records, neighbours in length are too far apart for batch 8).
    fixture = [len(prompt_ids(tokenizer, PromptStyle(), r["feature_content"])) + 150 for r in seed_records(96)]
    lengths = random.Random(0).choices(fixture, k=512)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=0)
    order = list(sampler)
    grouped = [order[i : i + 8] for i in range(0, len(order), 8)]
    padded = sum(8 * max(lengths[i] for i in b) for b in grouped)
    real = sum(lengths)
    random_batches = [list(range(i, i + 8)) for i in range(0, 512, 8)]
    random_padded = sum(8 * max(lengths[i] for i in b) for b in random_batches)
    assert 1 - real / padded < 0.05 < 1 - real / random_padded


def test_split_is_seeded_and_disjoint():
    records = [{"id": i} for i in range(40)]
    train, val = split_records(records, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert {r["id"] for r in train} | {r["id"] for r in val} == set(range(40))
    assert split_records(records, 0.1, seed=3) == (train, val)
    assert split_records(records, 0.1, seed=4)[1] != val


GOOD = {"id": 1, "feature_content": "性别: 男\n主诉: 头痛", "diseases": "偏头痛", "reason": "1. 头痛。"}
BAD_LINES = {
    "malformed JSON": b'{"id": 2, "feature_content": "x",',
    "missing field 'diseases'": json.dumps({"id": 2, "feature_content": "x", "reason": "r"}).encode(),
    "field 'id' must be an integer or a string": json.dumps({"id": 1.5, "feature_content": "x", "diseases": "d", "reason": "r"}).encode(),
    "field 'reason' must be a string": json.dumps({"id": 2, "feature_content": "x", "diseases": "d", "reason": 3}).encode(),
    "field 'feature_content' is empty": json.dumps({"id": 2, "feature_content": "  ", "diseases": "d", "reason": "r"}).encode(),
    "not valid UTF-8": b'{"id": 2, "feature_content": "\xff\xfe", "diseases": "d", "reason": "r"}',
    "expected a JSON object": b"[1, 2]",
}  # fmt: skip


def _file_with_bad_line(tmp_path, bad: bytes):
    path = tmp_path / "train.jsonl"
    good2 = dict(GOOD, id=3)
    path.write_bytes(b"\n".join([json.dumps(GOOD, ensure_ascii=False).encode(), bad,
                                 json.dumps(good2, ensure_ascii=False).encode()]) + b"\n")  # fmt: skip
    return path


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_input_is_an_error_naming_file_and_line(tmp_path, reason):
    path = _file_with_bad_line(tmp_path, BAD_LINES[reason])
    with pytest.raises(BadRecordError) as err:
        read_records(path, labelled=True)
    assert str(err.value).startswith(f"{path}:2: ") and reason in str(err.value)


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_input_skipped_goes_to_rejects_with_reason(tmp_path, reason):
    path = _file_with_bad_line(tmp_path, BAD_LINES[reason])
    records = read_records(path, labelled=True, on_bad_record="skip")
    assert [r["id"] for r in records] == [1, 3]
    rejects = [json.loads(line) for line in open(tmp_path / "train.rejects.jsonl", encoding="utf-8")]
    assert len(rejects) == 1 and rejects[0]["line"] == 2 and reason in rejects[0]["reason"]


def test_duplicate_id_is_an_error_even_when_skipping(tmp_path):
    path = _file_with_bad_line(tmp_path, json.dumps(dict(GOOD, reason="r2"), ensure_ascii=False).encode())
    for mode in ("error", "skip"):
        with pytest.raises(BadRecordError, match=r"train.jsonl:2: duplicate id 1 \(first at line 1\)"):
            read_records(path, labelled=True, on_bad_record=mode)


def test_list_valued_diseases_are_joined(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [dict(GOOD, diseases=["高血压", "糖尿病"])])
    assert read_records(path, labelled=True)[0]["diseases"] == "高血压；糖尿病"


def test_datamodule_batches_and_logs_trimming(tmp_path, tiny_model_dir, caplog):
    rows = labelled_records(12)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = DiagnosisDataModule(train_file=str(train), tokenizer_path=str(tiny_model_dir), max_length=160,
                             batch_size=4, val_fraction=0.25, seed=1)  # fmt: skip
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3
    assert "had their case text trimmed" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 160
    val = next(iter(dm.val_dataloader()))
    assert val["prompt_ids"].shape[0] == 3 and len(val["references"]) == 3


def test_answer_too_long_for_max_length_goes_to_rejects_when_skipping(tmp_path, tiny_model_dir):
    rows = labelled_records(3)
    rows[1]["reason"] = "很长的依据。" * 100
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    kwargs = dict(train_file=str(train), tokenizer_path=str(tiny_model_dir), max_length=300, val_fraction=0,
                  batch_size=2)  # 2 records remain after the reject: one batch
    with pytest.raises(BadRecordError, match=r"train.jsonl:2: the answer alone"):
        DiagnosisDataModule(**kwargs).setup("fit")
    dm = DiagnosisDataModule(**kwargs, on_bad_record="skip")
    dm.setup("fit")
    assert len(dm.train_set) == 2
    rejects = [json.loads(x) for x in open(tmp_path / "train.rejects.jsonl", encoding="utf-8")]
    assert [r["line"] for r in rejects] == [2]


def test_val_overlap_drop_trains_without_the_validation_ids_and_keep_keeps_them(caplog):
    """#29 item 7: `5` and `"5"` are one record; drop and keep each say so in a warning line."""
    from healthai.splits import separate_validation

    train = [{"id": 5}, {"id": 6}, {"id": "7"}]
    val = [{"id": "5"}, {"id": 7}, {"id": 8}]
    with caplog.at_level("WARNING", logger="healthai.splits"):
        assert separate_validation(train, val, "t.jsonl", "v.jsonl", "drop") == [{"id": 6}]
        assert separate_validation(train, val, "t.jsonl", "v.jsonl", "keep") == train
    assert [r.getMessage().split(": ")[1] for r in caplog.records] == [
        "dropped from training (data.val_overlap drop), 1 record(s) left",
        "kept in training (data.val_overlap keep)",
    ]
    assert caplog.records[0].getMessage().startswith("2 id(s) of data.val_file v.jsonl are also in data.train_file "
                                                     "t.jsonl (e.g. 5)")  # fmt: skip
