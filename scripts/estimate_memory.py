"""Estimate the peak GPU memory of a fit config from the model's architecture — arithmetic, not a measurement.

    python scripts/estimate_memory.py configs/qwen2.5-7b/lora.yaml        # print the estimate block
    python scripts/estimate_memory.py --write configs/qwen2.5-*/*.yaml    # (re)write the block in each file's header
    python scripts/estimate_memory.py --gpus 4 configs/qwen2.5-32b/lora.yaml   # per GPU under FSDP on 4 GPUs

The block goes into the config's opening comments, between the line ``# Estimated peak GPU memory`` and the next line
that is just ``#``; tests/test_configs.py recomputes it from the parsed config and fails when a file's block is stale.

What is counted (bytes that ``torch.cuda.max_memory_allocated`` would report; the CUDA context and allocator slack,
typically another 0.5-2 GB on ``nvidia-smi``, are not):

* **Base weights.** bf16: 2 bytes per parameter. nf4 (QLoRA): the decoder's linear weights at 4 bits plus double-
  quantised block scales (4.127 bits); everything else — embeddings, an untied LM head, biases, norms — is cast to
  fp32 by ``peft.prepare_model_for_kbit_training``, 4 bytes per parameter; and the answer-only loss keeps a bf16 copy
  of that fp32 head for its matmuls (``healthai.loss.cast_head``: cast once, held), ``vocab·hidden·2`` bytes.
* **LoRA state.** ``r·(in + out)`` parameters per adapted linear; fp32 weight, gradient and two AdamW moments:
  16 bytes per parameter.
* **Training step** at ``max_length × batch_size`` tokens T (a full-length batch, the worst case), bf16 activations:
  with gradient checkpointing, every layer keeps its input (``T·hidden·2`` bytes per layer), and in backward one
  layer is recomputed: its saved tensors ``T·(12·hidden + 3·kv + 5·intermediate)·2`` bytes (norm outputs, q/k/v/o,
  rotary copies, attention output, gate/up/act/product, the LoRA dropout copies of each adapted input), counted twice
  for the gradients flowing through it. Without checkpointing every layer keeps those tensors. The answer-only loss
  (healthai/loss.py) materialises at most one chunk of logits, ≤ 1 GiB fp32 plus its bf16 matmul output, over the
  answer tokens (at most ``batch_size × max_new_tokens`` of them is assumed); it is not live during the backward of
  the layers, so the step's peak is the larger of the two. Under nf4 the residual stream is fp32 (the fp32
  embeddings and norms feed it): each kept layer input and the two norm outputs take 4 bytes per value, not 2.
* **Validation** (``eval_batch_size`` B, no gradients): the loss forward over ``B × max_length`` tokens holds one
  layer's transient ``B·max_length·(4·hidden + 3·intermediate)·2`` bytes; generation holds the KV cache
  ``2·layers·B·(max_length + max_new_tokens)·kv·2`` bytes plus the prefill's one-layer transient. Optimizer state
  stays allocated during validation.

Peak = weights + LoRA state + max(training step, validation).

**Per GPU under FSDP on N GPUs** (``--gpus N``, configs/qwen_lora_fsdp.yaml; bf16 only — a 4-bit base is not sharded):
the base weights and the LoRA state divided by N, plus what is gathered whole at the peak — the embeddings (the root
unit stays gathered through the step), the LM head (gathered for the loss), and three decoder layers (the one
running, the next one prefetched, and the last one, kept gathered for the backward) — plus the activations of this
GPU's own batch, which sharding does not divide. A calibration against a measured run would replace the
constants above; scripts/gpu_check.sh measures the 7B at 2048 × 2 when a GPU is available.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

GB = 1e9


@dataclass(frozen=True)
class Arch:
    """The shape of one Qwen2.5 size (from its published config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of the seven linear projections of one decoder layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    def decoder_linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, untied LM head, q/k/v biases, norms: what nf4 leaves unquantised."""
        h = self.hidden
        per_layer = h + 2 * self.kv_dim + 2 * h  # q/k/v biases, two RMSNorms
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def params(self) -> int:
        return self.decoder_linear_params() + self.other_params()


ARCHS = {
    "0.5B": Arch(24, 896, 4864, 14, 2, True, 151936),
    "1.5B": Arch(28, 1536, 8960, 12, 2, True, 151936),
    "3B": Arch(36, 2048, 11008, 16, 2, True, 151936),
    "7B": Arch(28, 3584, 18944, 28, 4, False, 152064),
    "14B": Arch(48, 5120, 13824, 40, 8, False, 152064),
    "32B": Arch(64, 5120, 27648, 40, 8, False, 152064),
}
"""Qwen2.5-{size}-Instruct: layers, hidden, intermediate, attention heads, KV heads, tied embeddings, vocabulary."""

NF4_BYTES = 4.127 / 8  # 4-bit weights + 8-bit block scales per 64 weights + fp32 scale-of-scales per 256 blocks
LOSS_CHUNK_BYTES = 1 << 30  # healthai/loss.py CHUNK_BYTES["cuda"]


@dataclass(frozen=True)
class Settings:
    """The config values the estimate depends on."""

    model_name_or_path: str
    quantization: str | None
    lora_r: int
    target_modules: tuple[str, ...]
    gradient_checkpointing: bool
    max_length: int
    batch_size: int
    eval_batch_size: int
    max_new_tokens: int
    generates: bool  # validation generation on (generate_every_n_epochs > 0 and val_generate_limit > 0)

    @classmethod
    def from_config(cls, config: dict) -> "Settings":
        """From a parsed fit config (``{"model": {...}, "data": {...}}``); a missing key raises KeyError."""
        m, d = config["model"], config["data"]
        return cls(
            model_name_or_path=m["model_name_or_path"], quantization=m.get("quantization"), lora_r=m["lora_r"],
            target_modules=tuple(m["target_modules"]), gradient_checkpointing=m["gradient_checkpointing"],
            max_length=d["max_length"], batch_size=d["batch_size"], eval_batch_size=d["eval_batch_size"],
            max_new_tokens=m["generation"]["max_new_tokens"],
            generates=m["generate_every_n_epochs"] > 0 and m["val_generate_limit"] > 0,
        )  # fmt: skip


def size_of(model_name_or_path: str) -> str:
    """``Qwen/Qwen2.5-7B-Instruct`` (or a local folder so named) → ``7B``."""
    match = re.search(r"Qwen2\.5-(\d+(?:\.\d+)?B)", model_name_or_path, re.IGNORECASE)
    if not match or match.group(1).upper() not in ARCHS:
        raise ValueError(f"{model_name_or_path}: not a Qwen2.5 size this script knows ({', '.join(ARCHS)})")
    return match.group(1).upper()


def estimate(s: Settings, gpus: int = 1) -> dict[str, float]:
    """Bytes of each part and the peak, per GPU (see the module docstring for the formulas); ``gpus`` > 1: under FSDP
    on that many GPUs."""
    a = ARCHS[size_of(s.model_name_or_path)]
    h, kv, i, L = a.hidden, a.kv_dim, a.intermediate, a.layers
    nf4 = s.quantization == "nf4"
    if gpus > 1 and nf4:
        raise ValueError("--gpus: a 4-bit (QLoRA) base cannot be sharded by FSDP; estimate its one-GPU peak")
    if nf4:
        head_cast = a.vocab * h * 2  # healthai.loss.cast_head's bf16 copy of the fp32 head
        weights = a.decoder_linear_params() * NF4_BYTES + a.other_params() * 4 + head_cast
    else:
        weights = a.params() * 2
    shapes = a.linear_shapes()
    unknown = sorted(set(s.target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"target_modules {unknown}: only the decoder's linear projections are modelled")
    lora_params = L * sum(s.lora_r * sum(shapes[t]) for t in s.target_modules)
    lora = lora_params * 16

    tokens = s.max_length * s.batch_size
    residual = 4 if nf4 else 2  # bytes per value of the residual stream (fp32 under QLoRA)
    layer = tokens * (12 * h + 3 * kv + 5 * i) * 2 + tokens * 2 * h * (residual - 2)  # two norm outputs
    saved = L * tokens * h * residual if s.gradient_checkpointing else L * layer  # what forward leaves for backward
    answer_rows = s.batch_size * s.max_new_tokens
    loss_chunk = min(LOSS_CHUNK_BYTES, answer_rows * a.vocab * 4) * 1.5  # fp32 logits + their bf16 matmul output
    train = saved + max(2 * layer, loss_chunk)

    b = s.eval_batch_size
    layer_no_grad = b * s.max_length * (4 * h + 3 * i) * 2  # one layer's transient in a forward without gradients
    val_loss = layer_no_grad + min(LOSS_CHUNK_BYTES, b * s.max_new_tokens * a.vocab * 4) * 1.5
    kv_cache = 2 * L * b * (s.max_length + s.max_new_tokens) * kv * 2 if s.generates else 0
    generate = kv_cache + layer_no_grad if s.generates else 0
    validation = max(val_loss, generate)
    gathered = 0
    if gpus > 1:  # FSDP: the shards, plus the units gathered whole at the peak
        weights, lora = weights / gpus, lora / gpus
        layer_params = sum(a * b for a, b in a.linear_shapes().values()) + h + 2 * kv + 2 * h  # biases, norms
        gathered = (a.vocab * h * (1 if a.tied else 2) + 3 * layer_params) * 2
    peak = weights + lora + gathered + max(train, validation)
    return {"params": a.params(), "weights": weights, "lora_params": lora_params, "lora": lora, "train": train,
            "validation": validation, "kv_cache": kv_cache, "gathered": gathered, "peak": peak}  # fmt: skip


def fsdp_line(s: Settings, gpus: tuple[int, ...] = (2, 4, 8)) -> str:
    """The header line of a bf16 config's per-GPU peak under FSDP (configs/qwen_lora_fsdp.yaml) on ``gpus`` GPUs."""
    each = ", ".join(f"{n} GPUs {estimate(s, n)['peak'] / GB:.1f} GB" for n in gpus)
    return f"#   Per GPU with configs/qwen_lora_fsdp.yaml (FSDP, --gpus N): {each}"


def comment_block(s: Settings) -> list[str]:
    """The header lines written into a config (each starts with ``#``)."""
    e = estimate(s)
    weights = "nf4 (fp32 embeddings/head)" if s.quantization == "nf4" else "bf16"
    phase = "training step" if e["train"] >= e["validation"] else "validation"
    return [
        f"# Estimated peak GPU memory: {e['peak'] / GB:.1f} GB at max_length {s.max_length} × batch {s.batch_size}"
        f" (at {phase}). An estimate, not a measurement:",
        "#   python scripts/estimate_memory.py (architecture arithmetic; add ~1 GB CUDA context). Parts:",
        f"#   base {e['params'] / 1e9:.2f}B params {weights} {e['weights'] / GB:.1f} GB"
        f" + LoRA r{s.lora_r} {e['lora_params'] / 1e6:.1f}M params, fp32 + grads + AdamW {e['lora'] / GB:.2f} GB",
        f"#   + max(training step {e['train'] / GB:.1f} GB, validation at eval batch {s.eval_batch_size}"
        f" {e['validation'] / GB:.1f} GB incl. KV cache {e['kv_cache'] / GB:.1f} GB)",
    ] + ([] if s.quantization == "nf4" else [fsdp_line(s)])


BLOCK_START = "# Estimated peak GPU memory"


def replace_block(text: str, block: list[str]) -> str:
    """``text`` with its estimate block (``BLOCK_START`` up to the next bare ``#`` line) replaced by ``block``."""
    lines = text.splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith(BLOCK_START)), None)
    if start is None:
        raise ValueError(f"no line starting with {BLOCK_START!r}")
    end = next((n for n in range(start, len(lines)) if lines[n].strip() == "#"), None)
    if end is None:
        raise ValueError("the estimate block must end with a line holding only '#'")
    return "\n".join(lines[:start] + block + lines[end:]) + "\n"


def current_block(text: str) -> list[str]:
    """The estimate block as it stands in a config's text (empty if there is none)."""
    lines = text.splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith(BLOCK_START)), None)
    if start is None:
        return []
    end = next((n for n in range(start, len(lines)) if lines[n].strip() == "#"), len(lines))
    return lines[start:end]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="fit config YAML files")
    parser.add_argument("--write", action="store_true", help="rewrite the estimate block in each file")
    parser.add_argument("--gpus", type=int, default=1, help="per-GPU peak under FSDP on this many GPUs (default 1: "
                        "one GPU, no sharding)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus must be 1 or more, got {args.gpus}")  # exit 2
    if args.gpus > 1 and args.write:
        parser.error("--gpus with --write: the header block is the one-GPU estimate (with its FSDP line)")
    for path in args.configs:
        text = path.read_text(encoding="utf-8")
        try:
            settings = Settings.from_config(yaml.safe_load(text))
            if args.gpus > 1:
                e = estimate(settings, args.gpus)
                print(f"{path}: per GPU under FSDP on {args.gpus} GPUs: {e['peak'] / GB:.1f} GB (weights shard "
                      f"{e['weights'] / GB:.1f} GB + LoRA state {e['lora'] / GB:.2f} GB + gathered units "
                      f"{e['gathered'] / GB:.1f} GB + max(training step {e['train'] / GB:.1f} GB, validation "
                      f"{e['validation'] / GB:.1f} GB))")  # fmt: skip
                continue
            block = comment_block(settings)
        except ValueError as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 2
        except KeyError as e:
            print(f"{path}: {e!r}", file=sys.stderr)
            return 1
        if args.write:
            path.write_text(replace_block(text, block), encoding="utf-8")
        print(f"{path}:", *block, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
