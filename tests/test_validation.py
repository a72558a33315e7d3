"""Validation's loss and metrics: ``val/loss`` is a mean per answer token (as ``train/loss``), and the records a
process repeats only to stay in step with the others count in no metric."""

from __future__ import annotations

import lightning as L
import pytest

from conftest import labelled_records, write_jsonl
from healthai.batching import EvalSampler, PaddedEvalSet, TrainCollator
from healthai.data import DiagnosisDataModule
from healthai.model import DiagnosisLoRA


def test_each_process_gets_its_share_and_the_padding_is_marked_as_repeats():
    data = PaddedEvalSet([{"id": i} for i in range(5)])
    shares = [[data[i] for i in EvalSampler(5, 2, rank)] for rank in (0, 1)]
    assert [[e["id"] for e in share] for share in shares] == [[0, 2, 4], [1, 3, 0]]  # as many batches on each rank
    assert [bool(e.get("repeat")) for share in shares for e in share] == [False] * 5 + [True]
    assert list(EvalSampler(5, 1, 0)) == [0, 1, 2, 3, 4]


def validation_loss(tiny_model_dir, val, eval_batch_size: int) -> float:
    L.seed_everything(0)
    model = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", lora_dropout=0.0, gradient_checkpointing=False,
                          generate_every_n_epochs=0)  # fmt: skip
    data = DiagnosisDataModule(val_file=str(val), tokenizer_path=str(tiny_model_dir), max_length=400,
                               eval_batch_size=eval_batch_size)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=val.parent)  # fmt: skip
    return trainer.validate(model, data, verbose=False)[0]["val/loss"]


def test_val_loss_is_a_mean_per_answer_token_whatever_the_batches(tmp_path, tiny_model_dir):
    # Answers of 33, 103 and 18 tokens: a mean of per-batch means (batches of 1) would weigh a short answer's tokens
    # 5x more than a long one's (0.25 % off here on the small model, where every token's loss is alike).
    records = labelled_records(3)
    records[1]["reason"] = "患者" + "反复咳嗽咳痰伴发热，" * 12
    records[2]["reason"] = "无"
    val = write_jsonl(tmp_path / "val.jsonl", records)
    one_batch, batches_of_one = validation_loss(tiny_model_dir, val, 3), validation_loss(tiny_model_dir, val, 1)
    assert batches_of_one == pytest.approx(one_batch, rel=1e-5)


def test_repeated_records_count_in_no_validation_metric(tiny_model_dir, tokenizer):
    from healthai.encoding import encode_example
    from healthai.prompts import PromptStyle

    model = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", generate_every_n_epochs=0)
    model.configure_model()
    records = labelled_records(2)
    examples = [{**encode_example(tokenizer, PromptStyle(), r["feature_content"], r["diseases"], r["reason"], 160),
                 "id": r["id"], "diseases": r["diseases"], "reason": r["reason"],
                 "feature_content": r["feature_content"]} for r in records]  # fmt: skip
    collate = TrainCollator(tokenizer.pad_token_id, with_prompts=True)
    padded = PaddedEvalSet(examples)
    sums = {}
    for name, indices in (("two records", [0, 1]), ("and a repeat", [0, 1, 2])):
        model.on_validation_epoch_start()
        model.validation_step(collate([padded[i] for i in indices]), 0)
        sums[name] = (float(model._val_loss_sum), float(model._val_tokens))
    assert sums["and a repeat"][1] == sums["two records"][1] > 0
    assert sums["and a repeat"][0] == pytest.approx(sums["two records"][0], rel=1e-5)


# -- the answer metrics are wired to the right references -------------------------------------------------------------


def answered_validation(tiny_model_dir, tmp_path, monkeypatch, answer_of) -> dict[str, float]:
    """``validate`` (one process, the real validation_step, metric updates and epoch-end compute) over 4 short records
    in 2 batches of 2, with generation replaced: the prompt of record ``i`` is answered with ``answer_of(i)`` (the
    JSON text of a label), found by the record's own marker in the prompt text, not by its place in a batch."""
    from healthai.prompts import answer_text

    records = [dict(r, feature_content=f"[病例{i}] " + r["feature_content"][:40])
               for i, r in enumerate(labelled_records(4))]  # fmt: skip
    val = write_jsonl(tmp_path / "val.jsonl", records)
    generated = []

    def generate_texts(self, input_ids, attention_mask):
        texts = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m])
            (i,) = [i for i in range(len(records)) if f"[病例{i}]" in prompt]
            diseases, reason = answer_of(i, records)
            texts.append(answer_text(diseases, reason))
            generated.append(i)
        return texts, [False] * len(texts), [len(t) for t in texts]

    monkeypatch.setattr(DiagnosisLoRA, "generate_texts", generate_texts)
    model = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=False,
                          generate_every_n_epochs=1, val_log_samples=0)  # fmt: skip
    data = DiagnosisDataModule(val_file=str(val), tokenizer_path=str(tiny_model_dir), max_length=160,
                               eval_batch_size=2)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    metrics = trainer.validate(model, data, verbose=False)[0]
    assert sorted(generated) == [0, 1, 2, 3]  # every record generated once
    return metrics


def test_answering_each_record_with_its_own_label_scores_one_and_with_anothers_less(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):  # fmt: skip
    """On a random model ``val/disease_f1`` is 0 however validation is wired; a generator that answers each prompt
    with that record's own label must score 1 (and one answering with another record's label less): the answers are
    scored against their own references."""
    own = answered_validation(tiny_model_dir, tmp_path / "own", monkeypatch,
                              lambda i, records: (records[i]["diseases"], records[i]["reason"]))  # fmt: skip
    for name in ("val/disease_f1", "val/disease_precision", "val/disease_recall", "val/json_valid",
                 "val/reason_rougeL"):  # fmt: skip
        assert own[name] == pytest.approx(1.0), (name, own)
    assert own["val/truncated"] == 0.0
    shifted = answered_validation(tiny_model_dir, tmp_path / "shifted", monkeypatch,
                                  lambda i, records: (records[(i + 1) % 4]["diseases"], records[(i + 1) % 4]["reason"]))
    assert shifted["val/disease_f1"] < 1.0 and shifted["val/reason_rougeL"] < 1.0, shifted
    assert shifted["val/json_valid"] == pytest.approx(1.0)  # the same answers' form; only who they answer differs
