"""Right-padded training batches go without an attention mask (#30 item 4): the same loss and gradients as with
it (sdpa and eager), while left-padded batches keep theirs and packed ones use their position ids."""

from __future__ import annotations

import pytest
import torch

import healthai.model
from healthai.attention_mask import training_attention_mask
from healthai.encoding import IGNORE_INDEX


def right_padded_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = [12, 7, 9]
    ids = torch.zeros((3, 12), dtype=torch.long)
    mask = torch.zeros((3, 12), dtype=torch.long)
    labels = torch.full((3, 12), IGNORE_INDEX)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(100, vocab, (n,), generator=g)
        mask[row, :n] = 1
        labels[row, n - 4 : n] = ids[row, n - 4 : n]  # the "answer": the last 4 real tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_only_right_padded_batches_drop_their_mask():
    batch = right_padded_batch(1000)
    assert training_attention_mask(batch) is None
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1), "labels": batch["labels"].flip(1)}
    assert training_attention_mask(left) is left["attention_mask"]  # real tokens after padding: kept
    labelled_padding = {**batch, "labels": batch["input_ids"]}  # padding with labels would count: kept
    assert training_attention_mask(labelled_padding) is batch["attention_mask"]
    packed = {**batch, "position_ids": torch.zeros_like(batch["input_ids"])}
    assert training_attention_mask(packed) is None  # packing delimits records by its position ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_loss_and_gradients_without_the_mask_equal_those_with_it(tiny_lora, attn, monkeypatch):
    module = tiny_lora
    module.base_model.set_attn_implementation(attn)
    batch = right_padded_batch(module.base_model.config.vocab_size)

    def loss_and_grads():
        module.model.zero_grad()
        loss = module.answer_loss(batch, reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}

    without, grads_without = loss_and_grads()
    monkeypatch.setattr(healthai.model, "training_attention_mask", lambda b: b["attention_mask"])
    with_mask, grads_with = loss_and_grads()
    torch.testing.assert_close(without, with_mask, rtol=1e-5, atol=1e-5)
    assert grads_with.keys() == grads_without.keys() and grads_with
    for name in grads_with:
        torch.testing.assert_close(grads_without[name], grads_with[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    from healthai.model import DiagnosisLoRA

    module = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=False, lora_dropout=0.0)
    module.configure_model()
    with torch.no_grad():  # a trained adapter: gradients reach both LoRA matrices
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    module.train()
    return module
