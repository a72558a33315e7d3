"""bf16 weights with fp32 buffers in every command (#30 item 2): Lightning's ``bf16-true`` precision casts the whole
module, RoPE's ``inv_freq`` included; predict and validate put the buffers back as built, and serve never casts them, so
predict's rows are serve's answers token for token."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import labelled_records, seed_records, write_jsonl
from healthai.generation import GenerationSettings

GENERATION = GenerationSettings(max_new_tokens=24)


def rope_buffers(module) -> dict[str, torch.dtype]:
    return {name: b.dtype for name, b in module.named_buffers() if "inv_freq" in name}


def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, precision="bf16-true", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)  # fmt: skip


def module(tiny_model_dir, **kwargs):
    from healthai.model import DiagnosisLoRA

    return DiagnosisLoRA(str(tiny_model_dir), dtype="bfloat16", gradient_checkpointing=False, generation=GENERATION,
                         **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def predicted(tiny_model_dir, tmp_path_factory):
    """predict's rows and its model after ``Trainer.predict`` in ``bf16-true`` (the precision of predict.yaml)."""
    from healthai.data import DiagnosisDataModule

    records = write_jsonl(tmp_path_factory.mktemp("bf16") / "records.jsonl", seed_records(3, offset=40))
    model = module(tiny_model_dir)
    dm = DiagnosisDataModule(predict_file=str(records), tokenizer_path=str(tiny_model_dir), eval_batch_size=3,
                             max_length=512)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [row for batch in trainer().predict(model, datamodule=dm) for row in batch]
    finally:
        torch.set_num_threads(threads)
    return model, sorted(rows, key=lambda r: r["_order"])


def test_predict_in_bf16_true_keeps_bf16_weights_and_fp32_rope_buffers(predicted):
    model, _ = predicted
    buffers = rope_buffers(model)
    assert buffers and set(buffers.values()) == {torch.float32}, buffers
    assert model.base_model.model.embed_tokens.weight.dtype == torch.bfloat16  # the weights are cast


def test_validate_in_bf16_true_keeps_fp32_rope_buffers(tiny_model_dir, tmp_path):
    from healthai.data import DiagnosisDataModule

    val = write_jsonl(tmp_path / "val.jsonl", labelled_records(2))
    model = module(tiny_model_dir, generate_every_n_epochs=0)
    dm = DiagnosisDataModule(val_file=str(val), tokenizer_path=str(tiny_model_dir), eval_batch_size=3, max_length=512)
    trainer().validate(model, datamodule=dm, verbose=False)
    buffers = rope_buffers(model)
    assert buffers and set(buffers.values()) == {torch.float32}, buffers


def test_serve_in_bf16_answers_as_predict_in_bf16_true_token_for_token(predicted, tiny_model_dir):
    from healthai.prompts import PromptStyle
    from healthai.serve import DiagnosisAPI

    _, rows = predicted
    api = DiagnosisAPI(str(tiny_model_dir), None, "bfloat16", "sdpa", GENERATION, PromptStyle(), 512, 10_000, 3, 0.0)
    api.setup("cpu")
    buffers = rope_buffers(api.module)
    assert buffers and set(buffers.values()) == {torch.float32}, buffers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            answers = next(api.predict(api.batch([r["feature_content"] for r in rows])))
    finally:
        torch.set_num_threads(threads)
    assert [(a.diseases, a.reason, a.status) for a in answers] == [
        (r["diseases"], r["reason"], r["parse_status"]) for r in rows
    ]
