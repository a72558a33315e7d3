"""The offline tokenizer is the real Qwen2.5 one: golden ids of the real tokenizer, token for token."""

import json

import pytest

from conftest import GOLDEN

CASES = json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_chat_template_reproduces_golden_ids(tokenizer, case):
    ids = tokenizer.apply_chat_template(
        case["messages"], tokenize=True, add_generation_prompt=case["add_generation_prompt"]
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == case["input_ids"]


def test_added_tokens_and_special_ids(tokenizer):
    assert len(tokenizer) == 151665  # 151,643 BPE tokens + 22 added
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643, 151644, 151645, 151664,
    ]  # fmt: skip
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == 151643


def test_model_loads_with_full_vocabulary(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    # Qwen2.5-7B pads its embedding to 152,064 rows, beyond the tokenizer's 151,665 tokens.
    assert config.model_type == "qwen2" and config.vocab_size == 152064 and len(config.layer_types) == 2
