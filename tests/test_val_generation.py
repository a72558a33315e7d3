"""Validation generation (#30 item 1): a global record limit split between the ranks, batches of prompts generated
together, and the base weights put back bit for bit after generating with the LoRA merged (bf16 too)."""

from __future__ import annotations

import torch

from healthai.batching import EvalSampler
from healthai.val_generation import PendingPrompt, generation_batches, left_padded, rank_share


def test_the_generation_limit_is_global_the_first_records_whatever_the_rank_count():
    for limit in (0, 1, 5, 64):
        for world in (1, 2, 3, 8):
            shares = [rank_share(limit, r, world) for r in range(world)]
            assert sum(shares) == limit and max(shares) - min(shares) <= 1, (limit, world, shares)
            # Each rank takes the first records of its EvalSampler share: together the first `limit` records.
            taken = {i for r in range(world) for i in list(EvalSampler(100, world, r))[: shares[r]]}
            assert taken == set(range(limit)), (limit, world)


def test_prompts_are_batched_left_padded_and_ranks_in_step_get_uncounted_filler():
    prompts = [PendingPrompt(list(range(1, n + 1)), f"ref{n}", n, "") for n in (2, 5, 3)]
    batches = list(generation_batches(prompts, 2, 3))
    assert [[len(p.prompt_ids) for p in b] for b, _ in batches] == [[5, 3], [2], [2]]  # longest first
    assert [counted for _, counted in batches] == [2, 1, 0]  # the third call only keeps this rank in step
    ids, mask = left_padded(batches[0][0], 0, torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3, 4, 5], [0, 0, 1, 2, 3]] and mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1]]
    assert list(generation_batches([], 4, 1))[0][1] == 0  # a rank without prompts still makes its calls


def test_an_exact_merge_puts_every_bf16_base_weight_back_bit_for_bit(tiny_model_dir):
    from healthai.model import DiagnosisLoRA

    module = DiagnosisLoRA(str(tiny_model_dir), dtype="bfloat16", gradient_checkpointing=False)
    module.configure_model()
    with torch.no_grad():  # a trained adapter: B is no longer zero, so merging changes the base weights
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    assert module.merge_lora_for_inference(exact=True)
    merged = module.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(merged, torch.nn.Linear) and not torch.equal(merged.weight, before[next(
        k for k in before if k.endswith("layers.0.self_attn.q_proj.base_layer.weight"))])  # merged, set aside
    module.unmerge_lora()
    after = module.model.state_dict()
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert not module.lora_merged() and all(not m.merged for m in module.model.modules() if hasattr(m, "merged"))


def test_the_sanity_checks_memory_probe_is_the_largest_generation_batch_with_the_longest_prompt():
    from healthai.val_generation import probe_prompt

    examples = [{"input_ids": list(range(n + 5)), "prompt_len": n} for n in (3, 9, 4, 20)]
    ids, rows = probe_prompt(examples, limit=3, batch_size=16, world_size=1, budget=7)
    assert ids == list(range(9)) + [8] * 7 and rows == 3  # record 4 is past the limit: never generated
    assert probe_prompt(examples, limit=4, batch_size=2, world_size=1, budget=1)[1] == 2  # the batch size caps it
    assert probe_prompt(examples, limit=4, batch_size=16, world_size=2, budget=1)[1] == 2  # rank 0's share caps it
    assert probe_prompt(examples, limit=0, batch_size=16, world_size=1, budget=1) == ([], 0)
