"""Issue 33 item 3: padding-free packing (``--data.packing true``). A packed batch's loss is the unpacked batch's, token
for token, on the attention paths the small model runs on CPU; fit refuses an attention implementation that would
attend across records."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, labelled_records, write_jsonl
from healthai.batching import PackingCollator, TrainCollator
from healthai.cli import cli_main
from healthai.encoding import IGNORE_INDEX, encode_example
from healthai.errors import ConfigError
from healthai.prompts import PromptStyle

MAX_LENGTH = 512


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    """Six real records of different lengths with short labels, encoded as fit encodes them."""
    rows = labelled_records(6, offset=3)
    return [encode_example(tokenizer, PromptStyle(), r["feature_content"], r["diseases"], r["reason"], MAX_LENGTH)
            for r in rows]  # fmt: skip


def test_packed_rows_restart_positions_keep_labels_and_fit_max_length(examples):
    batch = PackingCollator(pad_id=151643, max_length=MAX_LENGTH)(examples)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape[0] < len(examples) and batch["input_ids"].shape[1] <= MAX_LENGTH
    # Every record is in one row, whole: its tokens and labels in a run whose positions count 0, 1, 2, ...
    runs = []
    for ids, labels, positions in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                      batch["position_ids"].tolist()):  # fmt: skip
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        runs += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
        assert all(positions[a:b] == list(range(b - a)) for a, b in zip(starts, starts[1:]))
    records = [(e["input_ids"], e["labels"]) for e in examples]
    assert all(r in runs for r in records)
    pads = [r for r in runs if r not in records]  # the fill of a short row: a sequence of its own, no label
    assert all(set(ids) == {151643} and set(labels) == {IGNORE_INDEX} for ids, labels in pads)
    assert int(batch["attention_mask"].sum()) == sum(lengths)  # real tokens, for the padding statistics


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_of_the_same_records_unpacked(examples, tiny_model_dir, attention):
    """Summed over answer tokens (what a step divides by their count), fp32: equal to rounding. Packed into one row
    each record still sees only itself: one row of all six gives the same sum."""
    from healthai.model import DiagnosisLoRA

    module = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", attn_implementation=attention,
                           gradient_checkpointing=False)  # fmt: skip
    module.configure_model()
    module.eval()
    with torch.no_grad():
        padded = module.answer_loss(TrainCollator(151643)(examples), reduction="sum")
        packed = PackingCollator(151643, MAX_LENGTH)(examples)
        one_row = PackingCollator(151643, 4096)(examples)
        assert packed["input_ids"].shape[0] > 1 and one_row["input_ids"].shape[0] == 1
        for batch in (packed, one_row):
            assert torch.allclose(module.answer_loss(batch, reduction="sum"), padded, rtol=1e-5, atol=1e-4)
        # What packing would be without the position ids: records attending to the ones before them.
        leaky = {**one_row, "position_ids": None, "attention_mask": torch.ones_like(one_row["input_ids"])}
        assert not torch.allclose(module.answer_loss(leaky, reduction="sum"), padded, rtol=1e-3)


def test_fit_refuses_packing_with_an_attention_that_would_cross_records(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    data = write_jsonl(tmp_path / "train.jsonl", labelled_records(8))
    loaded = []
    monkeypatch.setattr("healthai.model.DiagnosisLoRA._load_base", lambda self: loaded.append(1))
    args = ["fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
            "--data.train_file", str(data), "--data.val_file", str(data),
            "--data.val_overlap", "keep", "--data.packing", "true",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--model.attn_implementation", "paged|sdpa"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"^data\.packing true needs an attention implementation that keeps packed "
                                          r"records apart .*'paged\|sdpa' would let each record attend"):  # fmt: skip
        cli_main(args)
    assert not loaded


def test_a_packed_fit_trains_and_pads_less(tmp_path, tiny_model_dir, monkeypatch):
    """The whole fit path with packing: steps run, the loss is logged, the adapter is saved; the padding fraction it
    logs is below the unpacked run's on the same batches."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(REPO)
    data = write_jsonl(tmp_path / "train.jsonl", labelled_records(16))
    padding = {}
    for packing in ("false", "true"):
        runs = tmp_path / f"runs-{packing}"
        cli_main(["fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
                  "--data.train_file", str(data), "--data.val_file", str(data),
                  "--data.val_overlap", "keep", "--data.packing", packing,
                  "--data.max_length", "1024", "--trainer.max_steps", "3", "--model.generate_every_n_epochs", "0",
                  "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
                  "--trainer.callbacks.dirpath", str(runs / "ckpt"), "--trainer.enable_progress_bar", "false",
                  "--trainer.limit_val_batches", "0"])  # fmt: skip
        (events,) = runs.glob("tiny/version_*/events.*")
        scalars = EventAccumulator(str(events)).Reload().Scalars("train/padding_fraction")
        padding[packing] = sum(s.value for s in scalars) / len(scalars)
        assert list(runs.glob("tiny/version_*/adapter/adapter_model.safetensors"))
    assert padding["true"] < padding["false"]
