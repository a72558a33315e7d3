"""GPU benchmark of the Qwen2.5-7B architecture: peak memory and training tokens/s of real fit steps through the
project's LightningModule, plus a constrained predict pass. Not a test.

    python scripts/bench_gpu.py                    # on a CUDA machine: the 7B architecture, random bf16 weights
    python scripts/bench_gpu.py --device cpu       # smoke mode: the small model, small sizes (what CI runs)
    python scripts/bench_gpu.py --shapes 4096x1,2048x2 --steps 8

GPU mode (CUDA available): a temporary model folder holds a Qwen2.5-7B ``config.json`` (hidden 3584, 28 layers,
28 heads, 4 KV heads, intermediate 18944, vocab 152064, rope_theta 1e6, untied embeddings) and the tokenizer files of
``--model``. ``DiagnosisLoRA(random_init=True, dtype="bfloat16")`` builds the base from that config inside
``configure_model``, which Lightning runs in the strategy's init context: the random weights are created on the GPU,
never as a 15 GB CPU copy (the host peak RSS printed after the build shows it). LoRA r=16 on all seven projections,
non-reentrant gradient checkpointing, ``precision="bf16-mixed"``.

Training: one ``Trainer.fit`` whose loader yields, for each shape ``SEQxMICRO_BATCH`` (default 2048x2 then 1024x4),
``--warmup_steps`` + ``--steps`` batches of real-looking token ids (the chat prompts of seed records, tokenised and
concatenated, cut to SEQ; labels masked except the last ``--answer_tokens`` as the answer) collated by the project's
``TrainCollator``. Per shape: ``torch.cuda.max_memory_allocated`` over all of its steps (weights and optimizer state
included; reset at its first step) and training tokens/s over the steps after the warm-up
(``torch.cuda.synchronize`` at both ends). Lightning places the batches on the device.

Predict: ``DiagnosisLoRA.generate_answers`` (greedy, KV cache, xgrammar JSON constraint) on ``--predict_batch`` real
prompts (left-padded, longest first as the data module sorts them) with ``--predict_new_tokens`` new tokens, under
bf16 autocast as Lightning's ``bf16-mixed`` predict runs it; warmed up on 2 other records first (grammar compile,
Triton kernel). Records/s and generated tokens/s.

CPU mode (no CUDA, or ``--device cpu``): the same code on the small model's architecture (``--model``, random fp32
weights, ``32-true``) with small sizes (256x2 and 128x4, 1 warm-up + 2 timed steps, predict 4 records x 16 new
tokens), so CI can smoke-test it; memory is then the process's peak RSS.

Targets on an H200: peak <= 20 GB (1e9 bytes) at 2048x2, >= 8,000 training tokens/s. The last line is
``RESULT {json}`` for the README table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Real case records committed with the tests (96, spanning the length range); pass a larger file for real figures.
SEED_RECORDS = REPO / "tests" / "fixtures" / "seed_records.jsonl"
TARGET_PEAK_GB = 20.0
TARGET_TOKENS_PER_S = 8000.0

QWEN25_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151645, use_sliding_window=False,
    sliding_window=None, max_window_layers=28, attention_dropout=0.0,
)  # fmt: skip

MODES = {
    # mode: shapes, warm-up steps, timed steps, answer tokens, predict batch, predict new tokens
    "gpu": dict(shapes="2048x2,1024x4", warmup_steps=2, steps=5, answer_tokens=300, predict_batch=32,
                predict_new_tokens=256),
    "cpu": dict(shapes="256x2,128x4", warmup_steps=1, steps=2, answer_tokens=64, predict_batch=4,
                predict_new_tokens=16),
}  # fmt: skip

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")  # fmt: skip


def resolve_model(path: str) -> Path:
    p = Path(path)
    return REPO / p if not p.exists() and (REPO / p).exists() else p


def host_peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def write_model_dir(dest: Path, tokenizer_src: Path, mode: str) -> Path:
    """A model folder without weights: the architecture's ``config.json`` plus ``tokenizer_src``'s tokenizer files."""
    from transformers import AutoConfig, Qwen2Config

    dest.mkdir(parents=True, exist_ok=True)
    if mode == "gpu":
        config = Qwen2Config(**QWEN25_7B)
        config.architectures = ["Qwen2ForCausalLM"]
    else:
        config = AutoConfig.from_pretrained(tokenizer_src)  # the small model's own architecture
    config.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy(tokenizer_src / name, dest / name)
    return dest


def seed_prompts(tokenizer, n: int, offset: int = 0) -> list[list[int]]:
    """Chat-prompt token ids of ``n`` seed records from ``offset``, wrapping round the file when it holds fewer."""
    from healthai.data import prompt_ids
    from healthai.prompts import PromptStyle

    style = PromptStyle()
    with open(SEED_RECORDS, encoding="utf-8") as f:
        texts = [json.loads(line)["feature_content"] for line in f if line.strip()]
    out = [prompt_ids(tokenizer, style, texts[(offset + i) % len(texts)]) for i in range(n)]
    return out


def train_examples(tokenizer, shapes, per_shape: int, answer_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """Examples of exactly SEQ tokens cut from a stream of concatenated real prompts, and the batches (index lists)
    of each shape in turn."""
    from healthai.data import IGNORE_INDEX

    need = sum(seq * mb * per_shape for seq, mb in shapes)
    stream: list[int] = []
    offset = 0
    while len(stream) < need:
        chunk = seed_prompts(tokenizer, 64, offset)
        offset += 64
        for ids in chunk:
            stream += ids
    examples, batches, pos = [], [], 0
    for seq, mb in shapes:
        answer = min(answer_tokens, seq // 2)
        for _ in range(per_shape):
            batch = []
            for _ in range(mb):
                ids = stream[pos : pos + seq]
                pos += seq
                batch.append(len(examples))
                examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (seq - answer) + ids[seq - answer :]})
            batches.append(batch)
    return examples, batches


def build_trainer_callback(shapes, warmup: int, steps: int, cuda: bool):
    import lightning as L
    import torch

    per_shape = warmup + steps
    last = per_shape - 1

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Meter(L.Callback):
        def __init__(self):
            self.t0, self.t1, self.peak, self.rss, self.loss = {}, {}, {}, {}, {}
            self.host_rss_after_build = None
            self.param_device = None

        def on_train_start(self, trainer, pl_module):
            self.host_rss_after_build = host_peak_rss_gb()
            self.param_device = str(next(pl_module.model.parameters()).device)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            shape, pos = divmod(batch_idx, per_shape)
            if pos == 0 and cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
            if pos == warmup:
                sync()
                self.t0[shape] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shape, pos = divmod(batch_idx, per_shape)
            if pos == last:
                sync()
                self.t1[shape] = time.perf_counter()
                self.peak[shape] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
                self.rss[shape] = host_peak_rss_gb()
                self.loss[shape] = float(outputs["loss"])

    return Meter()


class CountingGenerate:
    """Wraps ``PeftModel.generate`` to count generated tokens per row (up to and including the first stop token)."""

    def __init__(self, generate, stop_ids: set[int]):
        self.generate, self.stop_ids, self.new_tokens = generate, stop_ids, 0

    def __call__(self, *args, input_ids, **kwargs):
        out = self.generate(*args, input_ids=input_ids, **kwargs)
        for row in out[:, input_ids.shape[1] :].tolist():
            stop = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
            self.new_tokens += stop
        return out


def run_predict(lit, tokenizer, batch: int, cuda: bool) -> dict:
    import torch

    from healthai.data import end_of_turn_id, pad_batch

    device = torch.device("cuda" if cuda else "cpu")
    lit.to(device)  # Lightning's teardown after fit moved the module back to the CPU
    counter = CountingGenerate(lit.model.generate, {end_of_turn_id(tokenizer), tokenizer.pad_token_id})
    lit.model.generate = counter
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def tensors(prompts):
        prompts = sorted(prompts, key=len, reverse=True)  # as DiagnosisDataModule orders predict records
        ids = pad_batch(prompts, tokenizer.pad_token_id, "left").to(device)
        mask = pad_batch([[1] * len(p) for p in prompts], 0, "left").to(device)
        return ids, mask

    settings = lit.generation
    warm_ids, warm_mask = tensors(seed_prompts(tokenizer, 2, offset=90))
    lit.generation = dataclasses.replace(settings, max_new_tokens=min(16, settings.max_new_tokens))
    t = time.perf_counter()
    with autocast:
        lit.generate_answers(warm_ids, warm_mask)  # grammar compile, kernels
    warm_s = time.perf_counter() - t
    lit.generation = settings
    counter.new_tokens = 0

    prompts = seed_prompts(tokenizer, batch, offset=40)
    ids, mask = tensors(prompts)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with autocast:
        answers = lit.generate_answers(ids, mask)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {
        "batch": batch, "max_new_tokens": settings.max_new_tokens, "mean_prompt_tokens": sum(map(len, prompts)) / batch,
        "seconds": seconds, "records_per_s": batch / seconds, "new_tokens": counter.new_tokens,
        "new_tokens_per_s": counter.new_tokens / seconds, "json_ok": sum(a.status == "ok" for a in answers),
        "warmup_s": warm_s,
    }  # fmt: skip


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"--shapes: expected SEQxMICRO_BATCH[,SEQxMICRO_BATCH...], got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="models/tiny-qwen2.5",
                        help="tokenizer source; in CPU mode also the architecture (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--shapes", help="SEQxMICRO_BATCH,... (gpu: 2048x2,1024x4; cpu: 256x2,128x4)")
    parser.add_argument("--warmup_steps", type=int, help="untimed steps per shape (gpu 2, cpu 1)")
    parser.add_argument("--steps", type=int, help="timed steps per shape (gpu 5, cpu 2)")
    parser.add_argument("--answer_tokens", type=int, help="labelled tokens at the end of each sequence (gpu 300)")
    parser.add_argument("--predict_batch", type=int, help="records in the predict pass (gpu 32, cpu 4)")
    parser.add_argument("--predict_new_tokens", type=int, help="max new tokens in the predict pass (gpu 256, cpu 16)")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    args = parser.parse_args(argv)

    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from healthai.data import TrainCollator
    from healthai.decoding import GenerationSettings
    from healthai.model import DiagnosisLoRA

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    mode = "gpu" if cuda else "cpu"
    for key, value in MODES[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shapes = parse_shapes(args.shapes)
    per_shape = args.warmup_steps + args.steps
    if args.steps < 1 or args.warmup_steps < 0:
        raise SystemExit("--steps must be >= 1 and --warmup_steps >= 0")

    tokenizer_src = resolve_model(args.model)
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    arch = "Qwen2.5-7B architecture, random bf16 weights" if cuda else f"{tokenizer_src.name} architecture, fp32"
    print(f"mode: {mode.upper()} ({device_name}); {arch}; LoRA r={args.lora_r}, gradient checkpointing; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)  # fmt: skip

    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", tokenizer_src, mode)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples, batches = train_examples(tokenizer, shapes, per_shape, args.answer_tokens)
        loader = DataLoader(examples, batch_sampler=batches, collate_fn=TrainCollator(tokenizer.pad_token_id))
        n = args.predict_new_tokens
        lit = DiagnosisLoRA(
            str(model_dir), dtype="bfloat16" if cuda else "float32", lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
            gradient_checkpointing=True, random_init=True, generate_every_n_epochs=0,
            # String bounds that let the JSON object close within the new-token budget.
            generation=GenerationSettings(max_new_tokens=n, max_diseases_chars=max(2, n // 8),
                                          max_reason_chars=max(4, n * 3 // 4)),
        )  # fmt: skip
        meter = build_trainer_callback(shapes, args.warmup_steps, args.steps, cuda)
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
            max_steps=len(batches), max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            default_root_dir=tmp, callbacks=[meter],
        )  # fmt: skip
        trainer.fit(lit, train_dataloaders=loader)
        del trainer
        for p in lit.parameters():
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()
        predict = run_predict(lit, tokenizer, args.predict_batch, cuda)

    train = []
    for i, (seq, mb) in enumerate(shapes):
        seconds = meter.t1[i] - meter.t0[i]
        tokens = seq * mb * args.steps
        train.append({"seq": seq, "micro_batch": mb, "timed_steps": args.steps, "seconds": seconds,
                      "tokens_per_s": tokens / seconds, "peak_gb": meter.peak[i], "host_peak_rss_gb": meter.rss[i],
                      "last_loss": meter.loss[i]})  # fmt: skip

    print()
    print(f"parameters on {meter.param_device} at train start; host peak RSS after the model build: "
          f"{meter.host_rss_after_build:.1f} GB" + (" (a CPU copy of the 7B would add ~15 GB)" if cuda else ""))
    mem_head = "peak alloc" if cuda else "peak RSS"
    header = f"{'train shape':<14} {'steps':>5} {'seconds':>8} {'tokens/s':>10} {mem_head:>11} {'loss':>7}"
    print(header)
    print("-" * len(header))
    for r in train:
        mem = r["peak_gb"] if cuda else r["host_peak_rss_gb"]
        print(f"{r['seq']:>6} x {r['micro_batch']:<5} {r['timed_steps']:5d} {r['seconds']:8.2f} "
              f"{r['tokens_per_s']:10.0f} {mem:8.2f} GB {r['last_loss']:7.3f}")  # fmt: skip
    print()
    print(f"predict: {predict['batch']} records (mean prompt {predict['mean_prompt_tokens']:.0f} tokens), "
          f"max {predict['max_new_tokens']} new tokens, constrained: {predict['seconds']:.2f} s, "
          f"{predict['records_per_s']:.2f} records/s, {predict['new_tokens']} new tokens "
          f"({predict['new_tokens_per_s']:.0f}/s), JSON ok {predict['json_ok']}/{predict['batch']} "
          f"(warm-up {predict['warmup_s']:.1f} s, untimed)")  # fmt: skip
    if cuda:
        first = train[0]
        print(f"targets (H200, {first['seq']}x{first['micro_batch']}): peak {first['peak_gb']:.1f} GB <= "
              f"{TARGET_PEAK_GB:g} GB: {'meets' if first['peak_gb'] <= TARGET_PEAK_GB else 'above'}; "
              f"{first['tokens_per_s']:.0f} tokens/s >= {TARGET_TOKENS_PER_S:,.0f}: "
              f"{'meets' if first['tokens_per_s'] >= TARGET_TOKENS_PER_S else 'below'}")  # fmt: skip
    else:
        print("CPU smoke mode: the small model at small sizes; the numbers say nothing about the 7B on a GPU")
    result = {"mode": mode, "device": device_name, "arch": "qwen2.5-7b" if cuda else tokenizer_src.name,
              "lora_r": args.lora_r, "train": train, "predict": predict,
              "host_peak_rss_after_build_gb": meter.host_rss_after_build,
              "host_peak_rss_gb": host_peak_rss_gb()}  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
