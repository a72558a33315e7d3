"""FSDP loads the base once (#32 item 1, healthai/sharded_load.py): on 2 gloo CPU ranks with a base of a few hundred MB
(random weights, built here), rank 1's peak host memory while loading rises by well under one copy of the base, and
every rank holds exactly its slice of the weights on disk, RoPE's fp32 frequencies and rank 0's random state. That
the sharded fit then trains as one process does is tests/test_fsdp.py's check (its fit goes through the same path)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO


@pytest.fixture(scope="module")
def large_base(tmp_path_factory, tiny_model_dir):
    """The small model's config grown to ~225 MB of bf16 decoder weights (16 layers of hidden 512, MLP 4096) with a
    1,024-token vocabulary: the weight is in many tensors, as in a real base, not in two 152k-row embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("large-base")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(vocab_size=1024, hidden_size=512, intermediate_size=4096, num_hidden_layers=16,
                  num_attention_heads=8, num_key_value_heads=2, layer_types=["full_attention"] * 16, bos_token_id=None,
                  eos_token_id=None)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.empty(p.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
               for name, p in shapes.state_dict().items()}  # fmt: skip
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tiny_model_dir / "generation_config.json", folder)
    return folder


@pytest.mark.slow
def test_fsdp_ranks_after_the_first_never_hold_a_copy_of_the_base(large_base, tmp_path, forkserver):
    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    forkserver.run_ranks([str(REPO / "tests" / "fsdp_load_probe.py"), str(large_base), str(tmp_path)], nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    base_bytes = (large_base / "model.safetensors").stat().st_size
    assert base_bytes > 200e6
    # Its half of the weights and a tensor in flight: 0.54-0.67 copies measured (each rank loading the whole
    # base before sharding it rose by 2.1 copies, #32).
    assert ranks[1]["rise"] < 0.75 * base_bytes, f"rank 1 rose by {ranks[1]['rise'] / base_bytes:.2f} copies"
    with safe_open(large_base / "model.safetensors", "pt") as weights:
        on_disk = weights.get_tensor("model.layers.0.mlp.up_proj.weight")
    for rank, got in enumerate(ranks):
        assert torch.equal(got["weight"], on_disk.chunk(2)[rank]), rank  # bit for bit its own rows
        assert got["weight"].dtype == torch.bfloat16
    inv_freq = Qwen2RotaryEmbedding(AutoConfig.from_pretrained(large_base)).inv_freq
    for got in ranks:  # rebuilt as one process builds it: fp32, not left empty by the meta build
        assert got["inv_freq"].dtype == torch.float32 and torch.equal(got["inv_freq"], inv_freq)
    # One LoRA initialisation (rank 0's), split: rank 1's rows are not a second, different draw; and rank 0's random
    # state after it, on every rank, as when each rank built the same model itself.
    lora_A = torch.cat([got["lora_A"] for got in ranks])
    assert lora_A.shape == (8, 512) and lora_A.abs().sum() > 0
    assert torch.equal(ranks[0]["draw"], ranks[1]["draw"])
