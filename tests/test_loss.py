"""The chunked frozen-head cross-entropy equals the plain one, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from healthai.loss import head_cross_entropy


@pytest.mark.parametrize("n", [1, 7, 300])
def test_matches_plain_cross_entropy_and_its_gradient(n):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 5000, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(n, 16, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, 5000, (n,))
    plain_hidden = hidden.detach().clone().requires_grad_()
    expected = F.cross_entropy(head(plain_hidden), targets)
    expected.backward()
    got = head_cross_entropy(hidden, head, targets)
    got.backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(hidden.grad, plain_hidden.grad, atol=1e-7)


def test_many_small_chunks_and_no_grad_path(monkeypatch):
    import healthai.loss as loss

    monkeypatch.setitem(loss.CHUNK_BYTES, "cpu", 4 * 5000 * 3)  # 3 rows a chunk
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 5000, bias=False).requires_grad_(False)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 5000, (10,))
    expected = F.cross_entropy(head(hidden), targets)
    (grad_expected,) = torch.autograd.grad(expected, hidden)
    got = head_cross_entropy(hidden, head, targets)
    (grad_got,) = torch.autograd.grad(got, hidden)
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(grad_got, grad_expected, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(head_cross_entropy(hidden, head, targets), expected, atol=1e-6)


def test_trainable_head_uses_the_plain_path():
    head = torch.nn.Linear(4, 50, bias=False)
    hidden = torch.randn(3, 4, requires_grad=True)
    targets = torch.tensor([1, 2, 3])
    head_cross_entropy(hidden, head, targets).backward()
    assert head.weight.grad is not None


def test_sum_reduction_is_n_times_the_mean_in_value_and_gradient():
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 300, (5,))
    (grad_mean,) = torch.autograd.grad(head_cross_entropy(hidden, head, targets), hidden)
    total = head_cross_entropy(hidden, head, targets, reduction="sum")
    (grad_sum,) = torch.autograd.grad(total, hidden)
    assert torch.allclose(total, F.cross_entropy(head(hidden), targets, reduction="sum"), atol=1e-5)
    assert torch.allclose(grad_sum, 5 * grad_mean, atol=1e-6)


def test_bf16_path_is_as_accurate_as_plain_bf16_autograd_against_a_float64_reference():
    # The 7B trains in bf16: the fused path computes bf16 matmuls and an fp32 softmax. Its gradient must be as close to
    # the exact (float64) one as PyTorch's own bf16 head + fp32 cross-entropy is.
    torch.manual_seed(3)
    n, d, vocab = 64, 128, 4000
    weight64 = torch.randn(vocab, d, dtype=torch.float64) / d**0.5
    hidden64 = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    exact = F.cross_entropy(hidden64 @ weight64.t(), targets)
    (exact_grad,) = torch.autograd.grad(exact, hidden64)

    head = torch.nn.Linear(d, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    head.weight.copy_(weight64.to(torch.bfloat16))
    hidden = hidden64.detach().to(torch.bfloat16).requires_grad_()
    fused = head_cross_entropy(hidden, head, targets)
    (fused_grad,) = torch.autograd.grad(fused, hidden)
    plain = F.cross_entropy(head(hidden).float(), targets)
    (plain_grad,) = torch.autograd.grad(plain, hidden)

    assert fused.dtype == torch.float32 and fused_grad.dtype == torch.bfloat16
    assert abs(fused.item() - exact.item()) <= 1e-2 * exact.item()

    def error(grad):
        return ((grad.double() - exact_grad).norm() / exact_grad.norm()).item()

    assert error(fused_grad) < 1e-2
    assert error(fused_grad) <= 1.5 * error(plain_grad)


def test_answer_loss_equals_transformers_own_loss_on_a_padded_batch(tiny_model_dir, tokenizer):
    from conftest import labelled_records

    from healthai.batching import TrainCollator
    from healthai.encoding import encode_example
    from healthai.model import DiagnosisLoRA, answer_tokens
    from healthai.prompts import PromptStyle

    examples = [
        encode_example(tokenizer, PromptStyle(), r["feature_content"], r["diseases"], r["reason"], max_length)
        for r, max_length in zip(labelled_records(3), (200, 170, 140))
    ]
    batch = TrainCollator(tokenizer.pad_token_id)(examples)
    assert (batch["attention_mask"] == 0).any()  # padded
    torch.manual_seed(0)
    lit = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=False, lora_dropout=0.0)
    lit.configure_model()
    lit.eval()
    with torch.no_grad():
        for name, param in lit.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter, not the identity a fresh one is
                param.normal_(0, 0.02)
        # transformers shifts the labels itself and averages over every label that is not -100 in the batch.
        expected = lit.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss  # fmt: skip
        got = lit.answer_loss(batch)
        total = lit.answer_loss(batch, reduction="sum")
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(total, expected * answer_tokens(batch["labels"]), rtol=1e-5)


def test_a_frozen_fp32_head_is_cast_to_the_autocast_dtype_once_not_per_call():
    # QLoRA: prepare_model_for_kbit_training leaves the head fp32 while autocast computes in bf16 (#30 item 7).
    from healthai.loss import cast_head

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(6, 16, requires_grad=True), torch.randint(0, 50, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = head_cross_entropy(hidden, head, targets)
        copy = cast_head(head.weight, torch.bfloat16)
        assert copy.dtype == torch.bfloat16 and cast_head(head.weight, torch.bfloat16) is copy  # cached
        assert torch.equal(head_cross_entropy(hidden, head, targets), first)
        with torch.no_grad():
            head.weight.mul_(2)  # changed in place: cast again
        assert cast_head(head.weight, torch.bfloat16) is not copy
        assert torch.equal(cast_head(head.weight, torch.bfloat16), head.weight.to(torch.bfloat16))
