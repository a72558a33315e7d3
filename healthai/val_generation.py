"""Validation generation (#30 item 1): the answers validation scores, generated once per validation rather than batch by
batch inside the loss pass.

``validation_step`` computes the loss and only *collects* the prompts of this rank's share of ``val_generate_limit``
(:func:`rank_share`: the limit is global, so 1 or 8 GPUs score the same number of records and ``val/disease_f1`` does
not depend on the GPU count). At the validation's end the LoRA is merged into the base and its layers set aside, as
predict does (no LoRA matmuls at every projection of every decoding step), the prompts are generated in batches of
``val_generate_batch_size`` (:func:`left_padded`), and the base weights are put back bit for bit
(:func:`healthai.base_model.unmerge_lora` from the kept copies), so training goes on from exactly the weights it left.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch


def rank_share(limit: int, rank: int, world_size: int) -> int:
    """How many of ``limit`` records rank ``rank`` of ``world_size`` generates: the limit split as evenly as it goes,
    the first ``limit % world_size`` ranks one more. With :class:`healthai.batching.EvalSampler`'s order (rank ``r``
    takes records ``r, r + R, …``) the shares together are the first ``limit`` validation records, whatever R."""
    return limit // world_size + (1 if rank < limit % world_size else 0)


@dataclasses.dataclass
class PendingPrompt:
    """One validation record to generate at the validation's end."""

    prompt_ids: list[int]  # unpadded
    reference: Any
    record_id: Any
    case_text: str


def pending_from_batch(batch: dict[str, Any], rows: list[int]) -> list[PendingPrompt]:
    """The prompts of ``rows`` of a validation batch, with their left padding taken off (they are padded again with
    the other prompts of their generation batch)."""
    out = []
    for i in rows:
        ids = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        out.append(PendingPrompt(ids, batch["references"][i], batch["ids"][i], batch["case_texts"][i]))
    return out


def left_padded(prompts: list[PendingPrompt], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``prompts``, left-padded to the longest (as predict's collator pads)."""
    width = max(len(p.prompt_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        n = len(p.prompt_ids)
        ids[row, width - n :] = torch.tensor(p.prompt_ids, dtype=torch.long)
        mask[row, width - n :] = 1
    return ids.to(device), mask.to(device)


def generation_batches(prompts: list[PendingPrompt], batch_size: int, calls: int) -> Iterator[tuple[list, int]]:
    """``calls`` batches of up to ``batch_size`` prompts, longest first (less padding per batch), each with how many of
    its rows count. Ranks that must stay in step (a sharded model gathers its layers at each call's prompt forward,
    :mod:`healthai.fsdp_generation`) all make ``calls`` calls: a rank out of prompts repeats its last batch (or a one-token prompt) and counts none of it."""
    ordered = sorted(prompts, key=lambda p: len(p.prompt_ids), reverse=True)
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    filler = chunks[-1] if chunks else [PendingPrompt([0], None, None, "")]
    for k in range(calls):
        yield (chunks[k], len(chunks[k])) if k < len(chunks) else (filler, 0)


def probe_prompt(examples: list[dict[str, Any]], limit: int, batch_size: int, world_size: int,
                 budget: int) -> tuple[list[int], int]:  # fmt: skip
    """The memory probe of fit's sanity check (#30 item 5): the longest prompt among the first ``limit`` validation
    records (the ones validation generates), followed by ``budget`` more tokens, and how many rows of it — one
    generation batch at its largest (``batch_size``, at most rank 0's share). Its forward with the KV cache on holds
    what the largest generation step will: a cache of prompt + budget tokens for every row (sharded, next to the
    whole gathered model: :func:`probe_generation_memory` gathers it as generation does). ``([], 0)`` when
    validation generates nothing."""
    first = examples[:limit]
    rows = min(batch_size, rank_share(limit, 0, world_size))
    if not first or rows == 0:
        return [], 0
    longest = max(first, key=lambda e: e["prompt_len"])
    prompt = list(longest["input_ids"][: longest["prompt_len"]])
    return prompt + [prompt[-1]] * budget, rows


@torch.no_grad()
def probe_generation_memory(model: torch.nn.Module, ids: list[int], rows: int, device: torch.device) -> None:
    """One forward of ``rows`` copies of ``ids`` with the KV cache on and logits for the last position only: an out
    of memory that the first validation's generation would meet is met here, in the first minute of fit."""
    from healthai.fsdp_generation import gathered_for_generation

    batch = torch.tensor([ids] * rows, dtype=torch.long, device=device)
    with gathered_for_generation(model):  # sharded: every layer stays gathered, as during generation
        out = model(input_ids=batch, use_cache=True, logits_to_keep=1)
        del out
