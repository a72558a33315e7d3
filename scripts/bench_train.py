"""Benchmark training throughput: the project's fit path vs TRL's ``SFTTrainer`` (the primary baseline: what a user
choosing a tool would pick) and vs the seed project's own ``transformers.Trainer`` recipe (second line), on the same
token sequences and the same number of optimizer steps. Not a test.

    python scripts/bench_train.py --records path/to/records.jsonl   # 128 real records, batch 8, one epoch (16 steps)
    python scripts/bench_train.py --steps 1 --n_records 16 --batch_size 4 --max_length 512   # smoke run
    python scripts/bench_train.py --variants a,t                      # leave out the slow seed recipe
    python scripts/bench_train.py --variants a,dora,rslora,pissa,neftune   # the model options against plain LoRA

TRL is an optional dependency: ``pip install -e .[bench]``.

Data: the first ``--n_records`` real case records (``feature_content``) of ``--records`` (default: the committed
fixture, 96 records spanning the length range; pass the competition's 3000-record file for real figures) with answers
made up here, of realistic length (1–2 disease names; a numbered reason of about 150–400 characters, ~280 on average,
composed from a fixed list of clinical phrases, deterministic with ``--seed``; the official example answers' reasons
average ~180). By default every variant trains one epoch: ``--steps`` = ``--n_records`` / ``--batch_size``, so each
sees every record exactly once and all three train on the same tokens: those of the project's ``encode_example``
(prompt through the chat template, answer, end-of-turn; the case text trimmed to ``--max_length`` when too long,
never the answer). The answer share of the tokens sets the ceiling of the speed-up from answer-only logits, so the
script prints it.

(a) project: ``DiagnosisDataModule`` (``val_fraction`` 0) → ``LengthGroupedSampler`` + ``TrainCollator`` (dynamic
    padding to the longest in the batch) → ``DiagnosisLoRA.training_step`` (``answer_loss``: LM-head logits only at
    answer positions), batch ``--batch_size``, one optimizer step per batch, driven by the real fit path: a Lightning
    ``Trainer(accelerator="cpu", max_steps=N, logger=False, ...)`` and ``trainer.fit(model, datamodule)``.
(t) TRL ``SFTTrainer`` (TRL's own loop, collator and loss), at its best CPU settings: a prompt–completion dataset whose
    prompt is the chat template applied to the project's ``PromptStyle.messages`` (of the case text (a) kept after
    trimming) and whose completion is the project's ``answer_text`` (TRL appends the end-of-turn token, the
    tokenizer's EOS); ``completion_only_loss=True``; ``train_sampling_strategy="group_by_length"`` (the transformers
    length-grouped sampler: TRL picks the order, so the order differs from (a)'s, but over one epoch the sequences
    are the same); TRL's fused, chunked LM head (on CPU it scores every position: only with Triton does it skip the
    masked ones); ``padding_free=True`` (``--trl_padding_free``): the batch is flattened into one row with
    ``position_ids``, no pad tokens, and transformers' sdpa builds a block-diagonal causal mask from the
    ``position_ids``, so it runs on CPU without FlashAttention. The script checks, before training, that TRL's
    tokenised dataset equals (a)'s ``encode_example`` output token for token (``input_ids`` and the loss mask) and
    prints the result.
(b) seed recipe: ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (pads to the longest in the batch), no length
    grouping, micro-batch 1 with gradient accumulation ``--batch_size``, the whole sequence in the loss
    (``labels = input_ids``, prompt not masked: standard causal-LM loss through ``model(input_ids, labels=...)``, with
    full-vocabulary logits at every position). The original recipe accumulated 16 micro-batches; here accumulation
    equals (a)'s batch size, so that all variants take N optimizer steps of the same size. (b) reads the sequences in
    (a)'s order through a sequential sampler (at micro-batch 1 order changes no padding).

Model options, each a row of its own against (a) (plain LoRA): (a) again with one ``DiagnosisLoRA`` option set, on
the same records, batches and steps, each in its own child process as (a): ``dora`` (``lora_variant: dora``),
``rslora`` (``lora_variant: rslora``), ``pissa`` (``lora_init: pissa``, its SVD at start-up counted in the peak RSS,
not in the timed steps), ``olora`` (``lora_init: olora``), ``neftune`` (``neftune_alpha: 5``).

Shared: the model (``--model``), fp32 on CPU (TRL's default bf16 is turned off), sdpa attention, PEFT LoRA r=8
(alpha 16, dropout 0) on all seven projections, non-reentrant gradient checkpointing, AdamW at ``--lr``, the same
``--max_length`` and ``--batch_size``, one optimizer step per batch of (a) and (t).

Each variant runs in its own child process (this script re-invoked with ``--variant a|t|b``), so peak RSS
(``getrusage`` maxrss: the process's high-water mark, model loading and TRL's dataset preparation included) is per
variant. Real tokens/s counts non-pad tokens over the optimizer steps after ``--warmup_steps`` (untimed: first-step
allocations); padding fraction is over all steps. Targets: (a)/(t) >= 3x real tokens/s and (a)'s peak RSS <= 1/2 of
(t)'s; (a)'s padding fraction <= 5% at batch size 8.

The header prints the load average: on a shared, loaded machine two OpenMP threads can stall every small op on a
descheduled thread; ``--threads 1`` then gives steadier numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (REPO, add_model_option, add_records_option, peak_rss_bytes, read_case_records, resolve_path,
                      torch_threads, write_jsonl)  # fmt: skip

TARGET_RATIO = 3.0  # (a)/(t) real tokens/s
TARGET_RSS = 0.5  # (a)/(t) peak RSS
TARGET_PADDING = 0.05
RESULT_PREFIX = "BENCH_TRAIN_RESULT "

# --------------------------------------------------------------------------------------------------------------------
# Made-up answers of realistic length
# --------------------------------------------------------------------------------------------------------------------

DISEASES = [
    "慢性乙型病毒性肝炎", "2型糖尿病", "高血压病3级", "急性上呼吸道感染", "慢性胃炎", "社区获得性肺炎",
    "冠状动脉粥样硬化性心脏病", "腰椎间盘突出症", "甲状腺功能减退症", "缺铁性贫血", "急性胆囊炎",
    "慢性阻塞性肺疾病", "高尿酸血症", "带状疱疹", "支气管哮喘", "脑梗死", "尿路感染", "胃食管反流病",
    "过敏性鼻炎", "失眠障碍",
]  # fmt: skip
PHRASES = [
    "患者主诉症状持续数日，呈进行性加重", "既往有相关慢性病史，长期规律服药",
    "体格检查可见相应体征，生命体征平稳", "辅助检查提示相关指标明显升高",
    "血常规示白细胞及中性粒细胞比例升高，提示细菌感染可能", "无发热、寒战等全身感染中毒症状",
    "影像学检查见典型改变，支持诊断", "症状与体征相符，符合该病的临床表现",
    "需与其他常见病相鉴别，目前依据不足", "结合年龄、性别及危险因素，考虑该诊断可能性大",
    "肝功能示转氨酶轻度升高，需动态复查", "空腹血糖及糖化血红蛋白高于正常范围",
    "血压多次测量均高于正常值，需规律监测", "心电图未见明显急性缺血改变",
    "既往无药物及食物过敏史，无手术外伤史", "建议进一步完善相关检查以明确病因并评估病情严重程度",
    "患者饮食睡眠欠佳，大小便基本正常", "查体局部压痛明显，无反跳痛及肌紧张",
]  # fmt: skip


def make_answer(rng: random.Random) -> tuple[str, str]:
    """One or two disease names, and a numbered reason: whole items until it reaches 150–350 characters."""
    diseases = "；".join(rng.sample(DISEASES, rng.choice([1, 1, 2])))
    target = rng.randint(150, 350)
    items: list[str] = []
    while sum(len(s) for s in items) < target:
        items.append(f"{len(items) + 1}. {rng.choice(PHRASES)}，{rng.choice(PHRASES)}；")
    return diseases, "\n".join(items)


def write_train_file(path: Path, records: Path, n: int, seed: int) -> Path:
    """The first ``n`` records of ``records`` with made-up answers; exits with one line if it holds fewer."""
    rng = random.Random(seed)
    rows = []
    for row in read_case_records(records, n):
        diseases, reason = make_answer(rng)
        rows.append({**row, "diseases": diseases, "reason": reason})
    return write_jsonl(path, rows)


# --------------------------------------------------------------------------------------------------------------------
# Shared by both variants (in their child processes)
# --------------------------------------------------------------------------------------------------------------------


def datamodule(args):
    from healthai.data import DiagnosisDataModule

    return DiagnosisDataModule(
        train_file=args.train_file, tokenizer_path=args.model, max_length=args.max_length,
        batch_size=args.batch_size, val_fraction=0.0, seed=args.seed,
    )  # fmt: skip


class Meter:
    """Real/padded tokens of every optimizer step; real tokens and wall time of the steps from ``warmup`` on."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.real = self.padded = self.timed_real = self.answer = 0
        self.start = self.stop = None

    def add(self, attention_mask, step: int, labels=None, real: int | None = None) -> None:
        """Count one (micro-)batch; ``labels`` (−100 outside the answer) also counts answer tokens. A padding-free
        batch has no ``attention_mask``: pass ``real`` (its every token) instead."""
        if labels is not None:
            self.answer += int((labels != -100).sum())
        if real is None:
            real, padded = int(attention_mask.sum()), attention_mask.numel()
        else:
            padded = real
        self.real += real
        self.padded += padded
        if step >= self.warmup:
            self.timed_real += real

    def result(self, variant: str, steps: int, sequences: int) -> dict:
        seconds = self.stop - self.start
        return {
            "variant": variant, "steps": steps, "sequences": sequences, "real_tokens": self.real,
            "padded_tokens": self.padded, "answer_tokens": self.answer, "padding_fraction": 1 - self.real / self.padded,
            "timed_steps": steps - self.warmup, "timed_real_tokens": self.timed_real, "seconds": seconds,
            "tokens_per_s": self.timed_real / seconds, "peak_rss_mb": peak_rss_bytes() / 2**20,
            "torch_threads": torch_threads(),
        }  # fmt: skip


def step_timer(meter: Meter, args):
    """A transformers ``TrainerCallback`` ((t) and (b)): starts ``meter``'s clock before optimizer step
    ``--warmup_steps`` and stops it after step ``--steps``."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                meter.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == args.steps:
                meter.stop = time.perf_counter()

    return Timing()


OPTIONS = {"dora": {"lora_variant": "dora"}, "rslora": {"lora_variant": "rslora"}, "pissa": {"lora_init": "pissa"},
           "olora": {"lora_init": "olora"}, "neftune": {"neftune_alpha": 5.0}}  # fmt: skip
"""The model options benchmarked as rows of their own: (a) with these ``DiagnosisLoRA`` arguments."""


def run_project(args) -> dict:
    """(a): the real fit path, a Lightning Trainer over DiagnosisDataModule and DiagnosisLoRA; with ``--variant`` one
    of :data:`OPTIONS`, the same with that model option."""
    import lightning as L

    from healthai.adapter_saver import AdapterSaver
    from healthai.generation import GenerationSettings
    from healthai.model import DiagnosisLoRA

    meter = Meter(args.warmup_steps)

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step  # optimizer steps done so far = index of this one
            meter.add(batch["attention_mask"], step, batch["labels"])
            if step == args.warmup_steps:
                meter.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == args.steps:  # the optimizer has stepped inside this batch
                meter.stop = time.perf_counter()

    L.seed_everything(args.seed, verbose=False)
    model = DiagnosisLoRA(
        args.model, dtype="float32", lora_r=8, lora_alpha=16, lora_dropout=0.0, gradient_checkpointing=True,
        learning_rate=args.lr, generate_every_n_epochs=0,
        # Trains only, never decodes: the JSON constraint is not this benchmark's business.
        generation=GenerationSettings(constrained=False), **OPTIONS.get(args.variant, {}),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as root:  # AdapterSaver saves the adapter under default_root_dir, as fit does
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, max_epochs=-1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, default_root_dir=root, callbacks=[Timing(), AdapterSaver()],
        )  # fmt: skip
        dm = datamodule(args)
        trainer.fit(model, datamodule=dm)
    return meter.result(args.variant, trainer.global_step, args.steps * args.batch_size)


def sampler_order(dm, steps: int, batch_size: int) -> list[int]:
    """The first ``steps × batch_size`` indices (a)'s LengthGroupedSampler yields, epoch after epoch."""
    from healthai.batching import LengthGroupedSampler

    sampler = LengthGroupedSampler(dm.train_set.lengths, batch_size, 1, 0, dm.seed, dm.mega_batch_mult)
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        sampler.set_epoch(epoch)
        order += list(sampler)
        epoch += 1
    return order[: steps * batch_size]


def run_old_recipe(args) -> dict:
    """(b): transformers.Trainer, DataCollatorForSeq2Seq, micro-batch 1 × accumulation, full-sequence loss."""
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from healthai.model import ALL_LINEAR

    set_seed(args.seed)
    dm = datamodule(args)
    dm.setup("fit")
    examples = dm.train_set.examples
    dataset = [
        {"input_ids": list(examples[i]["input_ids"]), "attention_mask": [1] * len(examples[i]["input_ids"]),
         "labels": list(examples[i]["input_ids"])}  # the whole sequence in the loss
        for i in sampler_order(dm, args.steps, args.batch_size)
    ]  # fmt: skip

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)

    meter = Meter(args.warmup_steps)

    class OldTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)  # (a)'s order; see the module docstring

        def training_step(self, model, inputs, *a, **k):
            meter.add(inputs["attention_mask"], self.state.global_step)
            return super().training_step(model, inputs, *a, **k)

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    options = {
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": args.batch_size, "max_steps": args.steps,
        "learning_rate": args.lr, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
        ckpt: True, f"{ckpt}_kwargs": {"use_reentrant": False}, "report_to": [], "save_strategy": "no",
        "logging_strategy": "no", "dataloader_num_workers": 0, "use_cpu": True, "remove_unused_columns": False,
        "disable_tqdm": True, "seed": args.seed,
    }  # fmt: skip
    # No length grouping (transformers 4: group_by_length=False; 5: train_sampling_strategy, overridden anyway).
    if "group_by_length" in fields:
        options["group_by_length"] = False
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, **options)
        collator = DataCollatorForSeq2Seq(dm.tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = OldTrainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                             callbacks=[step_timer(meter, args)])  # fmt: skip
        trainer.train()
    return meter.result("b", trainer.state.global_step, len(dataset))


def kept_case_text(tokenizer, style, case_text: str, ids: list[int]) -> str:
    """The prefix of ``case_text`` whose prompt tokenises to ``ids``: what ``encode_example`` kept of a record it had
    to trim (the same character bisection as ``fit_case_text``, aimed at a known prompt length)."""
    from healthai.encoding import prompt_ids

    if len(prompt_ids(tokenizer, style, case_text)) <= len(ids):
        return case_text
    lo, hi = 0, len(case_text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(prompt_ids(tokenizer, style, case_text[:mid])) <= len(ids):
            lo = mid
        else:
            hi = mid
    return case_text[:lo]


def trl_rows(dm, train_file: str) -> list[dict]:
    """TRL's prompt–completion dataset: the chat-template text of the project's ``PromptStyle.messages`` (of the case
    text (a) kept) and the project's ``answer_text``; TRL appends the tokenizer's EOS (``<|im_end|>``) itself."""
    from healthai.encoding import prompt_text
    from healthai.prompts import answer_text

    with open(train_file, encoding="utf-8") as f:
        cases = {r["id"]: r["feature_content"] for r in map(json.loads, f)}
    rows = []
    for e in dm.train_set.examples:
        prompt = e["input_ids"][: e["prompt_len"]]
        case = kept_case_text(dm.tokenizer, dm.prompt, cases[e["id"]], prompt)
        text = prompt_text(dm.tokenizer, dm.prompt, case)
        rows.append({"prompt": text, "completion": answer_text(e["diseases"], e["reason"])})
    return rows


def same_tokens(trl_dataset, examples: list[dict]) -> tuple[int, int]:
    """How many of TRL's tokenised rows equal (a)'s ``encode_example`` output (``input_ids`` and −100 loss mask)."""
    from healthai.encoding import IGNORE_INDEX

    equal = 0
    for row, e in zip(trl_dataset, examples):
        if "labels" in row:
            mask = [label != IGNORE_INDEX for label in row["labels"]]
        else:
            mask = [bool(m) for m in row["completion_mask"]]
        equal += row["input_ids"] == e["input_ids"] and mask == [label != IGNORE_INDEX for label in e["labels"]]
    return equal, len(examples)


def run_trl(args) -> dict:
    """(t): TRL's SFTTrainer on a prompt–completion dataset, completion-only loss, its best CPU settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from healthai.model import ALL_LINEAR

    set_seed(args.seed)
    dm = datamodule(args)
    dm.setup("fit")
    dataset = Dataset.from_list(trl_rows(dm, args.train_file))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    meter = Meter(args.warmup_steps)

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")  # padding-free batches have none: every token is real
            real = None if mask is not None else int(inputs["position_ids"].numel())
            meter.add(mask, self.state.global_step, inputs["labels"], real=real)
            return super().training_step(model, inputs, *a, **k)

    padding_free = args.trl_padding_free == "on"
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
            weight_decay=0.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, completion_only_loss=True,
            train_sampling_strategy="group_by_length", padding_free=padding_free,
            # Padding-free without packing refuses a max_length (it would not enforce it); the prompts are already
            # trimmed to it, as (a)'s are, and the token check below proves nothing is longer.
            max_length=None if padding_free else args.max_length,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            seed=args.seed, data_seed=args.seed,
        )  # fmt: skip
        trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=dm.tokenizer,
                                     peft_config=lora, callbacks=[step_timer(meter, args)])  # fmt: skip
        equal, total = same_tokens(trainer.train_dataset, dm.train_set.examples)
        trainer.train()
    result = meter.result("t", trainer.state.global_step, args.steps * args.batch_size)
    result.update(same_tokens=equal, examples=total, padding_free=padding_free)
    return result


# --------------------------------------------------------------------------------------------------------------------
# The parent: data, one child per variant, the table
# --------------------------------------------------------------------------------------------------------------------


VARIANTS = {"a": "run_project", **{name: "run_project" for name in OPTIONS}, "t": "run_trl", "b": "run_old_recipe"}


def run_child(variant: str, args, train_file: Path) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--train_file", str(train_file),
        "--model", args.model, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed),
        "--warmup_steps", str(args.warmup_steps), "--trl_padding_free", args.trl_padding_free,
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    print(f"running ({variant}) ...", flush=True)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            # The variants run one after the other: a change of the machine's load between them moves the ratios.
            return {**json.loads(line[len(RESULT_PREFIX) :]), "load_average": [load, os.getloadavg()[0]]}
    sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    raise SystemExit(f"variant {variant} failed (exit code {proc.returncode})")


def verdict(ok: bool) -> str:
    return "meets" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    add_model_option(parser)
    add_records_option(parser)
    parser.add_argument("--n_records", type=int, default=128,
                        help="how many of them to train on, from the top (default: %(default)s)")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps of each variant (default: one epoch, n_records / batch_size)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="(a)'s and (t)'s batch size = (b)'s gradient accumulation (default: %(default)s)")
    parser.add_argument("--max_length", type=int, default=1024, help="longest example, tokens (default: %(default)s)")
    parser.add_argument("--warmup_steps", type=int, default=1, help="first steps left out of the timing (default: 1)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="a,dora,rslora,pissa,neftune,t,b",
                        help="which to run, comma-separated: a project, t TRL, b seed recipe, or (a) with a model "
                             f"option: {', '.join(OPTIONS)} (default: %(default)s)")
    parser.add_argument("--trl_padding_free", choices=["on", "off"], default="on",
                        help="TRL's padding_free (default: %(default)s; runs on CPU through sdpa)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in every variant (default: torch's)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--train_file", help=argparse.SUPPRESS)  # internal: the parent's train file
    args = parser.parse_args(argv)
    args.model = resolve_path(args.model)

    if args.variant is not None:
        torch_threads(args.threads)
        result = globals()[VARIANTS[args.variant]](args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "a" not in variants:
        parser.error(f"--variants {args.variants}: must include a, and only {', '.join(VARIANTS)}")
    if args.steps is None:
        args.steps = max(1, args.n_records // args.batch_size)
    args.warmup_steps = max(0, min(args.warmup_steps, args.steps - 1))
    print(f"model {args.model}; {args.n_records} records of {args.records}; {args.steps} optimizer steps of "
          f"{args.batch_size} sequences (timed: steps {args.warmup_steps + 1}-{args.steps}); max_length "
          f"{args.max_length}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_train_file(Path(tmp) / "train.jsonl", args.records, args.n_records, args.seed)
        results = {v: run_child(v, args, train_file) for v in VARIANTS if v in variants}
    print(f"load average after the run {os.getloadavg()[0]:.2f}")
    print(RESULT_PREFIX + json.dumps(results), flush=True)  # every figure, for whoever keeps a record
    report(args, results)
    return 0


def report(args, results: dict[str, dict]) -> None:
    a = results["a"]
    names = {
        "a": f"(a) project: batch {args.batch_size}, length-grouped, answer loss",
        "t": f"(t) TRL SFTTrainer: batch {args.batch_size}, group_by_length, "
             + ("padding-free" if args.trl_padding_free == "on" else "padded"),
        "b": f"(b) seed recipe: 1 x accum {args.batch_size}, full-seq loss",
        **{name: f"(a) + {', '.join(f'{k} {v}' for k, v in option.items())}" for name, option in OPTIONS.items()},
    }  # fmt: skip
    header = (f"{'variant':<60} {'steps':>5} {'real tok':>9} {'padding':>8} {'seconds':>8} {'real tok/s':>10} "
              f"{'peak RSS':>9} {'load':>9}")  # fmt: skip
    print()
    print(header)
    print("-" * len(header))
    for v, r in results.items():
        print(f"{names[v]:<60} {r['steps']:5d} {r['real_tokens']:9d} {r['padding_fraction']:8.1%} "
              f"{r['seconds']:8.2f} {r['tokens_per_s']:10.1f} {r['peak_rss_mb']:7.0f}MB "
              f"{r['load_average'][0]:4.1f}>{r['load_average'][1]:<4.1f}")  # fmt: skip
    print("(real tok = non-pad tokens over all steps; seconds and real tok/s over the timed steps; peak RSS per "
          f"process; load = 1-min load average as the variant started > ended; torch threads {a['torch_threads']})")
    share = a["answer_tokens"] / a["real_tokens"]
    print(f"answer tokens (the labels of (a) and (t); (b) puts all real tokens in its loss): {a['answer_tokens']} = "
          f"{share:.0%} of the real tokens: where the LM head and loss dominate a step (the small model), answer-only "
          f"logits alone can speed it up by at most ~{1 / share:.1f}x")  # fmt: skip
    for v, r in results.items():
        if r["real_tokens"] != a["real_tokens"]:
            print(f"warning: ({v}) saw different tokens from (a) ({r['real_tokens']} vs {a['real_tokens']})")
    print()
    print(f"(a) padding fraction {a['padding_fraction']:.1%} at batch size {args.batch_size}; target <= "
          f"{TARGET_PADDING:.0%}: {'meets' if a['padding_fraction'] <= TARGET_PADDING else 'above'}")  # fmt: skip
    if "t" in results:
        t = results["t"]
        print(f"TRL token check: {t['same_tokens']}/{t['examples']} of TRL's tokenised prompt+completion rows equal "
              "(a)'s encode_example (input_ids and loss mask)")  # fmt: skip
        speed, rss = a["tokens_per_s"] / t["tokens_per_s"], a["peak_rss_mb"] / t["peak_rss_mb"]
        print(f"ratio (a)/(t) TRL: {speed:.1f}x real tokens/s (target >= {TARGET_RATIO:g}x: "
              f"{verdict(speed >= TARGET_RATIO)}); peak RSS {rss:.2f}x (target <= {TARGET_RSS:g}: "
              f"{verdict(rss <= TARGET_RSS)})")  # fmt: skip
    for name in (n for n in OPTIONS if n in results):
        r = results[name]
        speed, rss = r["tokens_per_s"] / a["tokens_per_s"], r["peak_rss_mb"] / a["peak_rss_mb"]
        print(f"option {name} vs (a) plain LoRA: {speed:.2f}x real tokens/s, peak RSS {rss:.2f}x")
    if "b" in results:
        b = results["b"]
        speed, rss = a["tokens_per_s"] / b["tokens_per_s"], a["peak_rss_mb"] / b["peak_rss_mb"]
        print(f"ratio (a)/(b) seed recipe: {speed:.1f}x real tokens/s; peak RSS {rss:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
