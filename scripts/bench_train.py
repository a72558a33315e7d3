"""Benchmark training throughput: the project's fit path vs the old Hugging Face Trainer recipe, on the same tokens and
the same number of optimizer steps. Not a test.

    python scripts/bench_train.py                          # 256 real records, batch 8, 6 optimizer steps
    python scripts/bench_train.py --steps 1 --records 16   # smoke run
    python scripts/bench_train.py --steps 16 --batch_size 16

Data: ``--records`` real case records (``feature_content`` of the seed file) with answers made up here, of realistic
length (1–2 disease names; a numbered reason of about 150–400 characters, ~280 on average, composed from a fixed list
of clinical phrases, deterministic with ``--seed``; the official example answers' reasons average ~180). Both variants
train on exactly the same token sequences: those of the project's ``encode_example`` (prompt through the chat
template, answer, end-of-turn; the case text trimmed to ``--max_length`` when too long, never the answer), consumed in
the order the project's ``LengthGroupedSampler`` draws them. The answer share of the tokens sets the ceiling of the
speed-up from answer-only logits, so the script prints it.

(a) project: ``DiagnosisDataModule`` (``val_fraction`` 0) → ``LengthGroupedSampler`` + ``TrainCollator`` (dynamic
    padding to the longest in the batch) → ``DiagnosisLoRA.training_step`` (``answer_loss``: LM-head logits only at
    answer positions), batch ``--batch_size``, one optimizer step per batch, driven by the real fit path: a Lightning
    ``Trainer(accelerator="cpu", max_steps=N, logger=False, ...)`` and ``trainer.fit(model, datamodule)``. Lightning's
    own per-step overhead is small next to a step of this size, so no manual loop is used.
(b) old recipe: ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (pads to the longest in the batch), no length
    grouping, micro-batch 1 with gradient accumulation ``--batch_size``, the whole sequence in the loss
    (``labels = input_ids``, prompt not masked: standard causal-LM loss through ``model(input_ids, labels=...)``, with
    full-vocabulary logits at every position).
    The original recipe accumulated 16 micro-batches; here accumulation equals (a)'s batch size, so that both variants
    take N optimizer steps over the same N x batch_size sequences (the same tokens per optimizer step). Run with
    ``--batch_size 16`` for the original accumulation of 16. (b) reads the sequences in (a)'s order through a
    sequential sampler: at micro-batch 1 order changes no padding, and the two runs then see identical data.

Shared: the small model (``--model``), fp32 on CPU, PEFT LoRA r=8 (alpha 16, dropout 0) on all seven projections,
non-reentrant gradient checkpointing on, AdamW at ``--lr``, the same ``--max_length``.

Each variant runs in its own child process (this script re-invoked with ``--variant a|b``), so peak RSS
(``getrusage`` maxrss: the process's high-water mark, model loading included) is per variant. Real tokens/s counts
non-pad tokens over the optimizer steps after ``--warmup_steps`` (untimed: first-step allocations); padding fraction is
over all steps. Targets: (a)/(b) >= 3x real tokens/s, (a)'s padding fraction <= 5% at batch size 8.

The default of 6 steps keeps a run to about 4–5 minutes on 2 busy CPU cores, (b) taking most of it (about 0.5 s per
sequence of the small model: its 152k-column LM head and loss over every position). On a shared, loaded machine two
OpenMP threads can stall every small op on a descheduled thread; ``--threads 1`` then gives steadier numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Real case records committed with the tests (96, spanning the length range); pass a larger file for real figures.
SEED_RECORDS = REPO / "tests" / "fixtures" / "seed_records.jsonl"
TARGET_RATIO = 3.0
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


def write_train_file(path: Path, seed_file: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    count = 0
    with open(seed_file, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as out:
        for line in src:
            if count == n:
                break
            if not line.strip():
                continue
            obj = json.loads(line)
            diseases, reason = make_answer(rng)
            row = {"id": obj["id"], "feature_content": obj["feature_content"], "diseases": diseases, "reason": reason}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    if count < n:
        raise SystemExit(f"{seed_file}: only {count} records, {n} wanted")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Shared by both variants (in their child processes)
# --------------------------------------------------------------------------------------------------------------------


def datamodule(args):
    from healthai.data import DiagnosisDataModule

    return DiagnosisDataModule(
        train_file=args.train_file, tokenizer_path=args.model, max_length=args.max_length,
        batch_size=args.batch_size, val_fraction=0.0, seed=args.seed,
    )  # fmt: skip


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Meter:
    """Real/padded tokens of every optimizer step; real tokens and wall time of the steps from ``warmup`` on."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.real = self.padded = self.timed_real = self.answer = 0
        self.start = self.stop = None

    def add(self, attention_mask, step: int, labels=None) -> None:
        """Count one (micro-)batch; ``labels`` (−100 outside the answer) also counts answer tokens."""
        if labels is not None:
            self.answer += int((labels != -100).sum())
        real = int(attention_mask.sum())
        self.real += real
        self.padded += attention_mask.numel()
        if step >= self.warmup:
            self.timed_real += real

    def result(self, variant: str, steps: int, sequences: int) -> dict:
        seconds = self.stop - self.start
        return {
            "variant": variant, "steps": steps, "sequences": sequences, "real_tokens": self.real,
            "padded_tokens": self.padded, "answer_tokens": self.answer, "padding_fraction": 1 - self.real / self.padded,
            "timed_steps": steps - self.warmup, "timed_real_tokens": self.timed_real, "seconds": seconds,
            "tokens_per_s": self.timed_real / seconds, "peak_rss_mb": peak_rss_mb(), "torch_threads": _threads(),
        }  # fmt: skip


def run_project(args) -> dict:
    """(a): the real fit path, a Lightning Trainer over DiagnosisDataModule and DiagnosisLoRA."""
    import lightning as L

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
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as root:  # on_train_end saves the adapter under default_root_dir
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, max_epochs=-1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, default_root_dir=root, callbacks=[Timing()],
        )  # fmt: skip
        dm = datamodule(args)
        trainer.fit(model, datamodule=dm)
    return meter.result("a", trainer.global_step, args.steps * args.batch_size)


def sampler_order(dm, steps: int, batch_size: int) -> list[int]:
    """The first ``steps × batch_size`` indices (a)'s LengthGroupedSampler yields, epoch after epoch."""
    from healthai.data import LengthGroupedSampler

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
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)  # fmt: skip

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

    class Timing(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                meter.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == args.steps:
                meter.stop = time.perf_counter()

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
                             callbacks=[Timing()])  # fmt: skip
        trainer.train()
    return meter.result("b", trainer.state.global_step, len(dataset))


# --------------------------------------------------------------------------------------------------------------------
# The parent: data, one child per variant, the table
# --------------------------------------------------------------------------------------------------------------------


def run_child(variant: str, args, train_file: Path) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--train_file", str(train_file),
        "--model", args.model, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed),
        "--warmup_steps", str(args.warmup_steps), *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    print(f"running ({variant}) ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    raise SystemExit(f"variant {variant} failed (exit code {proc.returncode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="models/tiny-qwen2.5", help="model folder (default: %(default)s)")
    parser.add_argument("--records", type=int, default=256, help="real records to train on (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of each variant (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="(a)'s batch size = (b)'s gradient accumulation (default: %(default)s)")
    parser.add_argument("--max_length", type=int, default=1024, help="longest example, tokens (default: %(default)s)")
    parser.add_argument("--warmup_steps", type=int, default=1, help="first steps left out of the timing (default: 1)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed_file", default=str(SEED_RECORDS), help="JSONL of real records")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in both variants (default: torch's)")
    parser.add_argument("--variant", choices=["a", "b"], help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--train_file", help=argparse.SUPPRESS)  # internal: the parent's train file
    args = parser.parse_args(argv)
    if not Path(args.model).exists() and (REPO / args.model).exists():
        args.model = str(REPO / args.model)
    args.warmup_steps = max(0, min(args.warmup_steps, args.steps - 1))

    if args.variant is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_project(args) if args.variant == "a" else run_old_recipe(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    print(f"model {args.model}; {args.records} records; {args.steps} optimizer steps of {args.batch_size} sequences "
          f"(timed: steps {args.warmup_steps + 1}-{args.steps}); max_length {args.max_length}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_train_file(Path(tmp) / "train.jsonl", Path(args.seed_file), args.records, args.seed)
        a = run_child("a", args, train_file)
        b = run_child("b", args, train_file)

    names = {
        "a": f"(a) project: batch {args.batch_size}, length-grouped, answer loss",
        "b": f"(b) HF Trainer: 1 x accum {args.batch_size}, full-seq loss",
    }
    header = (f"{'variant':<52} {'steps':>5} {'real tok':>9} {'padding':>8} {'seconds':>8} {'real tok/s':>10} "
              f"{'peak RSS':>9}")  # fmt: skip
    print()
    print(header)
    print("-" * len(header))
    for r in (a, b):
        print(f"{names[r['variant']]:<52} {r['steps']:5d} {r['real_tokens']:9d} {r['padding_fraction']:8.1%} "
              f"{r['seconds']:8.2f} {r['tokens_per_s']:10.1f} {r['peak_rss_mb']:7.0f}MB")  # fmt: skip
    print("(real tok = non-pad tokens over all steps; seconds and real tok/s over the timed steps; peak RSS per "
          f"process; torch threads {a['torch_threads']})")  # fmt: skip
    share = a["answer_tokens"] / a["real_tokens"]
    print(f"answer tokens (the labels of (a); (b) puts all real tokens in its loss): {a['answer_tokens']} = "
          f"{share:.0%} of the real tokens: where the LM head and loss dominate a step (the small model), answer-only "
          f"logits alone can speed it up by at most ~{1 / share:.1f}x")  # fmt: skip
    if a["real_tokens"] != b["real_tokens"]:
        print(f"warning: the variants saw different tokens ({a['real_tokens']} vs {b['real_tokens']})")
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    print()
    print(f"(a) padding fraction {a['padding_fraction']:.1%} at batch size {args.batch_size}; target <= "
          f"{TARGET_PADDING:.0%}: {'meets' if a['padding_fraction'] <= TARGET_PADDING else 'above'}")  # fmt: skip
    print(f"ratio (a)/(b): {ratio:.1f}x real tokens/s; target >= {TARGET_RATIO:g}x: "
          f"{'meets' if ratio >= TARGET_RATIO else 'below'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
