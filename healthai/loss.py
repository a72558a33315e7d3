"""Cross-entropy through a frozen LM head, computed in chunks without keeping the logits.

With LoRA the LM head is frozen, so backward only needs ``d loss / d hidden = (softmax(logits) - onehot) @ W / n``.
That gradient is computed in forward, chunk by chunk, and the ``n × vocabulary`` logits (152k columns: 1.2 GB in fp32
for 2,000 answer tokens) never exist at once — the technique of fused linear cross-entropy kernels (e.g. Liger's),
written with plain matmuls. Same matmul count as the unfused head + loss; far less memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from healthai.encoding import IGNORE_INDEX

CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}
"""Bytes of fp32 logits per chunk. On CPU, below glibc's mmap threshold (32 MB) so buffers are reused instead of being
faulted in afresh each time; on GPU, large enough to keep the matmuls big."""


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of logits to materialise at once on ``device``."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * vocab_size))


class _ChunkBuffers:
    """One chunk's logits, allocated once per call and reused by every chunk. On CPU a fresh 32 MB tensor per chunk is
    mapped and faulted in anew each time (glibc maps a request the size of the one it just freed), which cost the loss
    a fifth of its time in page faults; on GPU the caching allocator hands the block back anyway."""

    def __init__(self, rows: int, hidden: torch.Tensor, weight: torch.Tensor):
        shape = (min(rows, hidden.shape[0]), weight.shape[0])
        self.head = torch.empty(shape, dtype=weight.dtype, device=hidden.device)  # matmul output in the head's dtype
        same = weight.dtype == torch.float32
        self.fp32 = self.head if same else torch.empty(shape, dtype=torch.float32, device=hidden.device)

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``h @ weight.t()`` in fp32, in the buffers."""
        m = h.shape[0]
        logits = torch.matmul(h, weight.t(), out=self.head[:m])
        return logits if self.fp32 is self.head else self.fp32[:m].copy_(logits)

    def in_head_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (fp32 chunk) in the head's dtype, for the gradient matmul."""
        return x if self.fp32 is self.head else self.head[: x.shape[0]].copy_(x)


def _softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of the rows' cross-entropies; ``logits`` (fp32) become their softmax, in place. One exp per logit:
    logsumexp and then exp(logits - lse) took two, and with the small model's hidden size of 64 the exps cost as much
    as the matmuls."""
    target = logits.gather(1, targets[:, None])
    peak = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(peak).exp_()
    norm = probs.sum(dim=-1, keepdim=True)
    probs.div_(norm)
    return (norm.log() + peak - target).sum()  # CE = logsumexp - target logit


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffers = _ChunkBuffers(rows, hidden, weight)
        for start in range(0, n, rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            probs = buffers.logits(h, weight)
            total += _softmax_cross_entropy_(probs, t)
            probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(sum of CE)/d logits = softmax - onehot
            torch.matmul(buffers.in_head_dtype(probs), weight, out=grad_hidden[start : start + rows])
        ctx.save_for_backward(grad_hidden)
        return total  # the sum: the caller divides by whatever count the mean is over

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


def cast_head(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, cast once rather than on every call. QLoRA's ``prepare_model_for_kbit_training`` keeps
    the head in fp32 while autocast computes in bf16: a copy per micro-batch was 1.56 GB allocated and written each
    time for 14B. Cast again only when the weight changed in place (its version counter) or another dtype is asked."""
    if weight.dtype == dtype:
        return weight
    cached = getattr(weight, "_healthai_cast", None)  # kept on the weight itself: it lives and dies with it
    if cached is not None and cached[0] == weight._version and cached[1] == dtype:
        return cached[2]
    cast = weight.detach().to(dtype)
    weight._healthai_cast = (weight._version, dtype, cast)
    return cast


def head_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets`` (``hidden``: n × d, ``targets``: n), averaged over the n
    rows or (``reduction="sum"``) summed — training sums, so that a step can average over all of its tokens.

    Fused and chunked when the head is frozen and bias-free (LoRA's case); the plain computation otherwise (a trained
    head needs its weight gradient).
    """
    if head.weight.requires_grad or head.bias is not None:
        return F.cross_entropy(head(hidden).float(), targets, reduction=reduction)
    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):
        # Match what autocast would do to head(hidden): one dtype for the chunk matmuls.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), cast_head(weight, dtype)
    rows = chunk_rows(weight.shape[0], hidden.device)
    if torch.is_grad_enabled() and hidden.requires_grad:
        total = _FrozenHeadCrossEntropy.apply(hidden, weight, targets, rows)
    else:
        total = _chunked_loss(hidden, weight, targets, rows)  # validation: no gradient to prepare
    return total if reduction == "sum" else total / hidden.shape[0]


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    buffers = _ChunkBuffers(rows, hidden, weight)
    for start in range(0, hidden.shape[0], rows):
        logits = buffers.logits(hidden[start : start + rows], weight)
        total += _softmax_cross_entropy_(logits, targets[start : start + rows])
    return total


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Answer tokens in a batch: the positions :meth:`healthai.model.DiagnosisLoRA.answer_loss` scores (labels shifted by one). A
    tensor on the labels' device, so counting does not wait for the GPU."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
