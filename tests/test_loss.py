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
