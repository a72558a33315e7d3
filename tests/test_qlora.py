"""QLoRA (``quantization: nf4``) on the small model: the base projections are bitsandbytes 4-bit layers, and the answer
loss back-propagates into the LoRA weights only.

bitsandbytes runs 4-bit NF4 on the CPU since its torch-ops backend (checked with 0.50.2), so this runs in CI
wherever the ``qlora`` extra is installed; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from conftest import labelled_records
from healthai.base_model import ALL_LINEAR
from healthai.encoding import IGNORE_INDEX, encode_example
from healthai.model import DiagnosisLoRA
from healthai.prompts import PromptStyle

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[qlora])")


def _skip_without_cpu_4bit() -> None:
    """Skip, naming the version, when this bitsandbytes cannot quantize to NF4 on the CPU (builds before its
    torch-ops backend need CUDA for every 4-bit kernel)."""
    try:
        bnb.functional.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU 4-bit kernels: {type(e).__name__}: {e}")


def one_batch(tokenizer) -> dict[str, torch.Tensor]:
    """One real record as a training batch of size 1 (no padding)."""
    record = labelled_records(1)[0]
    example = encode_example(tokenizer, PromptStyle(), record["feature_content"], record["diseases"],
                             record["reason"], max_length=160)  # fmt: skip
    ids = torch.tensor([example["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([example["labels"]])}


def lora_grads(module: DiagnosisLoRA, which: str) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters() if f"{which}." in n}


@pytest.mark.parametrize(
    "dtype, checkpointing",
    [("float32", False), ("bfloat16", True)],  # the exact CPU setting, and the 24 GB-card setting of qwen_lora.yaml
)
def test_nf4_base_is_4bit_and_answer_loss_trains_lora_only(tiny_model_dir, dtype, checkpointing):
    _skip_without_cpu_4bit()
    module = DiagnosisLoRA(model_name_or_path=str(tiny_model_dir), quantization="nf4", dtype=dtype,
                           gradient_checkpointing=checkpointing, lora_r=4, lora_alpha=8, lora_dropout=0.0)  # fmt: skip
    module.configure_model()
    base = module.base_model

    adapted = {n: m for n, m in base.named_modules() if n.split(".")[-1] in ALL_LINEAR}
    assert len(adapted) == len(ALL_LINEAR) * base.config.num_hidden_layers
    for name, layer in adapted.items():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit), name
        assert layer.base_layer.weight.quant_type == "nf4" and layer.base_layer.weight.dtype == torch.uint8, name
        assert layer.base_layer.compute_dtype == getattr(torch, dtype), name
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        n for n, _ in module.named_parameters() if "lora_" in n
    }

    batch = one_batch(module.tokenizer)
    assert (batch["labels"] != IGNORE_INDEX).sum() > 5
    loss = module.answer_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    # LoRA starts with B = 0, so the first backward reaches B only; A's gradient is B-weighted and still zero.
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(module, "lora_B").values())
    assert all(p.grad is None for n, p in module.named_parameters() if "lora_" not in n)

    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    module.answer_loss(batch).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(module, "lora_A").values())


def test_nf4_base_loads_on_the_device_of_its_process(tiny_model_dir, monkeypatch):
    """Under DDP every rank quantizes its own copy of the base: onto its own device (bitsandbytes' 4-bit weights cannot
    be moved afterwards), not onto the current default GPU."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    seen = {}

    def capture(source, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("captured")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", capture)
    module = DiagnosisLoRA(model_name_or_path=str(tiny_model_dir), quantization="nf4")
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 3)))
    with pytest.raises(RuntimeError, match="captured"):
        module._load_base()
    assert seen["device_map"] == {"": "cuda:3"}
