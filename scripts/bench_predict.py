"""Benchmark prediction: the project's batched, greedy, JSON-constrained predict path vs the same batches generated
by transformers alone without a constraint, and vs the old one-record-at-a-time sampling loop, side by side in this
one process. Not a test.

    python scripts/bench_predict.py --records path/to/records.jsonl    # 64 real records, 64 new tokens, batch 16
    python scripts/bench_predict.py --n_records 4 --max_new_tokens 16  # smoke run (the committed fixture)
    python scripts/bench_predict.py --old_records 64                    # time (b) on all 64 too (~7 min on 2 cores)
    python scripts/bench_predict.py --model path/to/Qwen2.5-7B-Instruct --n_records 256 --batch_size 32
    python scripts/bench_predict.py --batch_size 1 --n_records 16 --old_records 0   # batch 1, without (b)

Records: the first ``--n_records`` (after ``--offset``) of ``--records`` (default: the committed fixture,
tests/fixtures/seed_records.jsonl, 96 real records spanning the length range); a count larger than the file is an
error.

(a) new: ``DiagnosisDataModule`` (prompts tokenised once and sorted by length, left-padded batches of
    ``--batch_size``) → ``DiagnosisLoRA.predict_step`` (``generate`` with greedy decoding, KV cache and the xgrammar
    JSON constraint, which closes every answer within ``--max_new_tokens``, then ``parse_answer``), in
    ``torch.no_grad``. The timed part covers the data module's ``setup("predict")`` (reading + tokenising), the
    collation and every ``predict_step``.
(c) plain: what a user would write with transformers alone: the plain model, the tokenizer with
    ``padding_side="left"``, the chat template applied to the same ``PromptStyle`` messages, ``generate`` on (a)'s
    very batches (same records, same length-sorted grouping) with greedy decoding, no repetition penalty (as (a); the
    checkpoint's generation_config.json asks 1.05) and no constraint, then ``batch_decode``. It writes exactly as many
    tokens per row as (a) ran decoding steps on that batch (no stop token, ``max_new_tokens`` = (a)'s steps, so it
    never stops early and never runs longer): both sides compute the same token positions, and (a)/(c) in token
    positions/s inside ``generate`` is the per-token cost of the JSON constraint (and of PEFT's ``generate`` wrapper;
    of the unmerged LoRA layers too with ``--merge_for_inference false``). Target: >= 0.9x, at batch 16 and at
    batch 1. (a)/(c) in records/s adds the project's data module and parsing.
    The JSON-valid rates show what the constraint buys.
(a') the constraint alone: after each (a) batch, the same model and generation config generate the same batch without
    the JSON processor and without a stop token, for exactly (a)'s steps (timed inside ``generate``). (a)/(a') is the
    JSON constraint's own per-token cost; (c) differs from (a') by PEFT: its ``generate`` wrapper, and the LoRA
    weights, merged into the base with the LoRA layers set aside as predict does by default
    (``--merge_for_inference false`` times the unmerged layers).
(b) old: the plain transformers model, one record at a time: ``prompt_ids`` (same chat prompt) →
    ``model.generate(do_sample=True, temperature=0.7, top_p=0.8)`` with no constraint → ``tokenizer.decode``.

(b) (``--old_records 0`` leaves it out) costs ~0.1 s per new token on 2 CPU cores (top-p sorts the 152k-token
vocabulary at every step), so by default it is timed on ``--old_records`` 16 of the 64 records, spread evenly over
their prompt lengths (the records are ranked by prompt length and every 4th is taken); its records/s is a per-record
rate, so the ratio stays like for like, and the table shows both sets' mean prompt length. ``--old_records`` equal
to ``--n_records`` times (b) on all of them.

The paths are timed in alternating rounds (one (a) batch, the same batch through (c) and (a'), then (b) on its share
of the records, and so on), so that a change in the machine's load during the run weighs on all alike.

All use the same ``--max_new_tokens``: for (a) it is the answer's token budget, the only bound on its length (the
grammar's strings are unbounded). (b) stops at the model's end-of-turn token whenever it writes one, while the
constrained path writes until its JSON object closes: by itself, or closed by the budget by its last step (the
processor's ``BudgetCloser``; ``parse_status`` ``truncated``, still strict JSON). The small model's random weights
rarely end a string by themselves, so its rows are mostly closed by the budget and its batches run all
``--max_new_tokens`` steps. The table shows new tokens (per row, up to and including its stop token) and new
tokens/s next to records/s, the token positions computed (rows x decoding steps: a batch runs until its longest row
ends, and (c) runs as long) and their rate, and the outputs that are strictly valid answer JSON (checked after the
clock stops; for (a) ``json.loads`` of the generated text itself, and how many of those rows the budget closed). It
also prints what (a)'s JSON processor (grammar masks and budget decisions) took per decoding step, and its share of
(a)'s time in ``generate``. Each path is warmed up once on 2 records first (for (a) that also compiles the JSON
grammar, a one-off cost per run). Targets: (a)/(b) >= 8x in records/s with the small model; (a)/(a') and (a)/(c) >=
0.9x in token positions/s, with every (a) row strictly valid JSON.

Threads: torch's default. On a shared CPU under load, two OpenMP threads can make each of the small model's tiny ops
wait milliseconds for a descheduled thread, which swamps both paths unevenly (in one loaded run on 2 cores, (a) took
18x and (b) 6x as long as with one thread); the header prints the load average, and ``--threads 1`` gives steadier
numbers there.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchlib import (CountingGenerate, add_model_option, add_records_option, new_token_counts, read_case_records,
                      resolve_path, torch_threads, write_jsonl)  # fmt: skip

TARGET_RATIO = 8.0
TARGET_TOKEN_RATIO = 0.9  # (a)/(c) token positions/s at equal length


# --------------------------------------------------------------------------------------------------------------------
# (a) the project's predict path
# --------------------------------------------------------------------------------------------------------------------


class ProjectPath:
    """(a): ``DiagnosisLoRA`` built as predict builds it; :meth:`batches` runs a file through the data module."""

    def __init__(self, model_path: str, tokenizer, args):
        from healthai.encoding import end_of_turn_id
        from healthai.errors import ConfigError
        from healthai.generation import GenerationSettings, check_answer_budget
        from healthai.model import DiagnosisLoRA

        self.model_path, self.tokenizer = model_path, tokenizer
        # The budget is the only length setting: every answer closes within it as strict JSON.
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
        try:  # predict's start-up check (on_predict_start), which predict_step alone does not run
            check_answer_budget(tokenizer, settings, option="--max_new_tokens")
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        self.lit = DiagnosisLoRA(model_path, dtype="float32", gradient_checkpointing=False, generation=settings,
                                 merge_for_inference=args.merge_for_inference == "true")  # fmt: skip
        self.lit.configure_model()
        self.lit.eval()
        self.merged = self.lit.merge_lora_for_inference()  # what predict's on_predict_start does
        self.counter = CountingGenerate(self.lit.model.generate, {end_of_turn_id(tokenizer), tokenizer.pad_token_id})
        self.lit.model.generate = self.counter  # an instance attribute: only this object's calls are counted
        # Keep each generate call's JSON processor, for its time per step.
        constraint, self.processors = self.lit.constraint(), []
        make = constraint.logits_processor

        def keep_processor(budget: int):
            self.processors.append(make(budget))
            return self.processors[-1]

        constraint.logits_processor = keep_processor
        # Keep each row's generated text and budget flag too: predict_step's rows carry only the parsed fields, and
        # "strictly valid" is judged on the text itself (json.loads), not on parse_status.
        self.texts: list[str] = []
        self.truncated: list[bool] = []
        generate_texts = self.lit.generate_texts

        def keep_texts(input_ids, attention_mask):
            texts, truncated, lengths = generate_texts(input_ids, attention_mask)
            self.texts += texts
            self.truncated += truncated
            return texts, truncated, lengths

        self.lit.generate_texts = keep_texts  # an instance attribute: generate_answers looks it up on the object

    def reset(self) -> None:
        """Forget the warm-up: counts, processors and texts."""
        self.counter.reset()
        self.processors.clear()
        self.texts.clear()
        self.truncated.clear()

    def processor_steps(self) -> int:
        """Decoding steps the JSON processors ran (one call per step of each ``generate``)."""
        return sum(p.steps for p in self.processors)

    def processor_seconds(self) -> float:
        """Host seconds inside the JSON processors: grammar masks, budget decisions and applying them."""
        return sum(p.seconds for p in self.processors)

    def processor_ms_per_step(self) -> float:
        return 1e3 * self.processor_seconds() / max(self.processor_steps(), 1)

    def loader(self, path: Path, batch_size: int):
        """Set up the data module (reads and tokenises ``path``) and return its predict dataloader."""
        from healthai.data import DiagnosisDataModule

        dm = DiagnosisDataModule(predict_file=str(path), tokenizer_path=self.model_path, eval_batch_size=batch_size)
        dm.tokenizer = self.tokenizer  # loaded once, outside the clock (setup still reads and tokenises the records)
        dm.setup("predict")
        return dm.predict_dataloader()

    def step(self, batch, batch_idx: int) -> list[dict]:
        import torch

        with torch.no_grad():
            return self.lit.predict_step(batch, batch_idx)

    def unconstrained(self, batch, steps: int) -> float:
        """(a'): the same model (PEFT; LoRA merged as predict merges it, unless ``--merge_for_inference false``) and
        generation config on the same batch, without the JSON processor and without a stop token, for exactly
        ``steps`` steps; returns the seconds in ``generate``."""
        import copy

        import torch

        lit, pad = self.lit, self.tokenizer.pad_token_id
        config = lit.generation.transformers_config([pad], pad)
        config.eos_token_id, config.max_new_tokens = None, steps
        lit.base_model.generation_config = copy.deepcopy(config)  # no stop token from the checkpoint's either
        t = time.perf_counter()
        with torch.no_grad():
            out = self.counter.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        generation_config=config)  # fmt: skip
        seconds = time.perf_counter() - t
        assert out.shape[1] - batch["input_ids"].shape[1] == steps
        return seconds


class OldPath:
    """(b): the plain transformers model, one record at a time, sampled, unconstrained."""

    def __init__(self, model_path: str, tokenizer, args):
        import torch
        from transformers import AutoModelForCausalLM

        from healthai.prompts import PromptStyle

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.eval()
        self.tokenizer, self.style, self.max_new_tokens = tokenizer, PromptStyle(), args.max_new_tokens
        self.new_tokens = 0
        torch.manual_seed(args.seed)

    def generate(self, rows: list[dict]) -> list[str]:
        import torch

        from healthai.encoding import prompt_ids

        texts = []
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([prompt_ids(self.tokenizer, self.style, r["feature_content"])])
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                    do_sample=True, temperature=0.7, top_p=0.8, pad_token_id=self.tokenizer.pad_token_id,
                )  # fmt: skip
                new = out[0, ids.shape[1] :]
                self.new_tokens += new.shape[0]
                texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return texts


class PlainBatchedPath:
    """(c): transformers alone: left-padded batches, greedy ``generate``, no constraint."""

    def __init__(self, model_path: str, args):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from healthai.encoding import end_of_turn_id
        from healthai.prompts import PromptStyle

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.eval()
        self.model.generation_config.eos_token_id = None  # stop tokens only where generate() is given them
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        self.style, self.max_new_tokens, self.new_tokens, self.positions = PromptStyle(), args.max_new_tokens, 0, 0
        self.generate_seconds = 0.0
        self.eot = end_of_turn_id(self.tokenizer)

    def generate(self, rows: list[dict], steps: int | None = None) -> list[str]:
        """``steps``: write exactly that many tokens per row (the length (a) ran on the same batch)."""
        import torch

        from healthai.encoding import prompt_text

        texts = [prompt_text(self.tokenizer, self.style, r["feature_content"]) for r in rows]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        # Equal length: no stop token at all (the checkpoint's are cleared in __init__), so generate runs exactly
        # `steps` steps; min_new_tokens would do it too, but its processor costs a pass over the scores per step.
        length = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.eot) if steps is None else dict(
            max_new_tokens=steps, eos_token_id=None)  # fmt: skip
        t = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**enc, **length, do_sample=False, repetition_penalty=1.0,
                                      pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        self.generate_seconds += time.perf_counter() - t
        new = out[:, enc["input_ids"].shape[1] :]
        self.new_tokens += sum(new_token_counts(new, {self.eot, self.tokenizer.pad_token_id}))
        self.positions += new.numel()
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def run_interleaved(new: ProjectPath, plain: PlainBatchedPath, old: OldPath | None, records_file: Path,
                    old_records: list[dict], batch_size: int):  # fmt: skip
    """Time the paths in alternating rounds — one (a) batch, the same batch through (c), then (b)'s share of the
    records — so that a change in the machine's load during the run hits all alike. (a)'s clock also covers its data
    module set-up."""
    from healthai.decoding import parse_answer

    t = time.perf_counter()
    loader = new.loader(records_file, batch_size)
    a_seconds = time.perf_counter() - t
    rounds = len(loader)
    chunks = [old_records[len(old_records) * k // rounds : len(old_records) * (k + 1) // rounds] for k in range(rounds)]
    rows, texts, plain_texts, b_seconds, c_seconds, off_seconds = [], [], [], 0.0, 0.0, 0.0
    batches = iter(loader)
    for k in range(rounds):
        batch = next(batches)
        t = time.perf_counter()
        rows += new.step(batch, k)
        a_seconds += time.perf_counter() - t
        t = time.perf_counter()
        plain_texts += plain.generate(batch["records"], steps=new.counter.last_steps)
        c_seconds += time.perf_counter() - t
        off_seconds += new.unconstrained(batch, new.counter.last_steps)
        if old is not None:
            t = time.perf_counter()
            texts += old.generate(chunks[k])
            b_seconds += time.perf_counter() - t
    assert len(new.texts) == len(rows)
    a = {"records": len(rows), "seconds": a_seconds, "new_tokens": new.counter.new_tokens,
         "positions": new.counter.positions, "generate_s": new.counter.seconds, "off_generate_s": off_seconds,
         # Strict JSON on the generated text itself: a row the budget closed (parse_status truncated) counts when
         # json.loads reads it as the answer object, as it must under the constraint.
         "parse_ok": sum(map(strict_answer_json, new.texts)), "truncated": sum(new.truncated),
         "status_truncated": sum(r["parse_status"] == "truncated" for r in rows)}  # fmt: skip
    b = None if old is None else {
        "records": len(texts), "seconds": b_seconds, "new_tokens": old.new_tokens, "positions": old.new_tokens,
        "generate_s": b_seconds,
        "parse_ok": sum(parse_answer(x).status == "ok" for x in texts)}  # fmt: skip
    c = {"records": len(plain_texts), "seconds": c_seconds, "new_tokens": plain.new_tokens,
         "positions": plain.positions, "generate_s": plain.generate_seconds,
         "parse_ok": sum(parse_answer(x).status == "ok" for x in plain_texts)}  # fmt: skip
    return a, b, c


def strict_answer_json(text: str) -> bool:
    """Whether ``text``, exactly as generated, is strict JSON (``json.loads``: no fence stripping, no repair) holding
    the answer's fields."""
    import json

    from healthai.decoding import answer_fields

    try:
        answer_fields(json.loads(text))
    except ValueError:  # json.JSONDecodeError is one
        return False
    return True


def spread_subset(tokenizer, records: list[dict], m: int) -> tuple[list[dict], float, float]:
    """``m`` of ``records`` at evenly spaced ranks of prompt length (input order kept), and the mean prompt length
    of all records and of the subset."""
    from healthai.encoding import prompt_ids
    from healthai.prompts import PromptStyle

    lengths = [len(prompt_ids(tokenizer, PromptStyle(), r["feature_content"])) for r in records]
    ranked = sorted(range(len(records)), key=lambda i: lengths[i])
    m = max(1, min(m, len(records)))
    chosen = sorted(ranked[int((k + 0.5) * len(records) / m)] for k in range(m))
    return [records[i] for i in chosen], sum(lengths) / len(lengths), sum(lengths[i] for i in chosen) / m


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    add_model_option(parser)
    add_records_option(parser)
    parser.add_argument("--n_records", type=int, default=64, help="records timed (default: %(default)s)")
    parser.add_argument("--offset", type=int, default=0, help="first record taken from --records")
    parser.add_argument("--max_new_tokens", type=int, default=64,
                        help="same for all paths; (a)'s answer budget: every answer closes within it "
                             "(default: %(default)s)")
    parser.add_argument("--old_records", type=int, default=16,
                        help="records (b) is timed on, spread over the prompt lengths; 0 leaves (b) out "
                             "(default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="predict batch size of (a) and (c) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of (b)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--merge_for_inference", choices=("true", "false"), default="true",
                        help="(a)'s model.merge_for_inference, as predict's (default: %(default)s)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    threads = torch_threads(args.threads)
    model_path = resolve_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Warm-up records are the 2 after the timed ones, so no path has seen the timed prompts.
    both = read_case_records(args.records, args.n_records, args.offset, warm=2)
    records, warm = both[: args.n_records], both[args.n_records :]

    with_old = args.old_records > 0
    old_records, new_len, old_len = spread_subset(tokenizer, records, max(args.old_records, 1))
    old_records = old_records if with_old else []

    print(f"model {model_path}; {len(records)} records of {args.records}, max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch_size}, torch threads {threads}, load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    new_path = ProjectPath(model_path, tokenizer, args)
    old_path = OldPath(model_path, tokenizer, args) if with_old else None
    plain_path = PlainBatchedPath(model_path, args)
    with tempfile.TemporaryDirectory() as tmp:
        records_file = write_jsonl(Path(tmp) / "records.jsonl", records)
        warm_file = write_jsonl(Path(tmp) / "warm.jsonl", warm)
        t = time.perf_counter()
        for i, batch in enumerate(new_path.loader(warm_file, 2)):  # warm-up; compiles the JSON grammar once
            new_path.step(batch, i)
        new_warm = time.perf_counter() - t
        t = time.perf_counter()
        plain_path.generate(warm)
        plain_warm = time.perf_counter() - t
        t = time.perf_counter()
        if old_path is not None:
            old_path.generate(warm)
            old_path.new_tokens = 0
        old_warm = time.perf_counter() - t
        new_path.reset()
        plain_path.new_tokens = plain_path.positions = 0
        plain_path.generate_seconds = 0.0
        new, old, plain = run_interleaved(new_path, plain_path, old_path, records_file, old_records, args.batch_size)
    new["prompt_len"], plain["prompt_len"] = new_len, new_len
    new["warmup_s"], plain["warmup_s"] = new_warm, plain_warm
    print(f"load average after the run {os.getloadavg()[0]:.2f}")

    rows = [
        (f"(a) project: batch {args.batch_size}, greedy, KV cache, constrained", new),
        ("(c) transformers alone: same batches and length, greedy", plain),
    ]
    if old is not None:
        old["prompt_len"], old["warmup_s"] = old_len, old_warm
        rows.append(("(b) old: 1 record at a time, sampled, unconstrained", old))
    header = (f"{'path':<56} {'records':>7} {'prompt':>6} {'seconds':>8} {'records/s':>10} {'new tok':>8} "
              f"{'new tok/s':>10} {'positions':>9} {'gen s':>6} {'pos/s':>8} {'JSON ok':>8}")  # fmt: skip
    print()
    print(header)
    print("-" * len(header))
    off_name = "(a') = (a) without the JSON processor, same length"
    off = (f"{off_name:<56} {'':>7} {'':>6} {'':>8} {'':>10} {'':>8} {'':>10} {new['positions']:9d} "
           f"{new['off_generate_s']:6.2f} {new['positions'] / new['off_generate_s']:8.1f}")  # fmt: skip
    for name, r in rows:
        rate, tok_rate = r["records"] / r["seconds"], r["new_tokens"] / r["seconds"]
        pos_rate = r["positions"] / r["generate_s"]
        print(f"{name:<56} {r['records']:7d} {r['prompt_len']:6.0f} {r['seconds']:8.2f} {rate:10.2f} "
              f"{r['new_tokens']:8d} {tok_rate:10.1f} {r['positions']:9d} {r['generate_s']:6.2f} {pos_rate:8.1f} "
              f"{r['parse_ok']:>4}/{r['records']:<3}")  # fmt: skip
        if r is new:
            print(off)
    print("(prompt = mean prompt tokens; new tok = generated tokens, each row up to and including its stop token;")
    print(" positions = rows x decoding steps, what the model computed: a batch runs until its longest row ends, and")
    print(" (a') and (c) write as many tokens per row as (a) ran steps on the same batch; gen s = seconds inside")
    print(" generate (no data loading, tokenising, decoding or parsing), pos/s = positions / gen s;")
    print(" JSON ok = rows that are strictly the answer object (json.loads; for (a) of the generated text itself,")
    print(f" rows the budget closed included); warm-up on 2 other records, not timed: "
          f"(a) {new['warmup_s']:.2f} s incl. the grammar compile, (c) {plain['warmup_s']:.2f} s"
          + (f", (b) {old['warmup_s']:.2f} s)" if old is not None else ")"))  # fmt: skip

    def rate(r: dict, key: str = "records") -> float:
        return r[key] / r["seconds"]

    print()
    every = "every row" if new["parse_ok"] == new["records"] else f"ONLY {new['parse_ok']}/{new['records']} rows"
    print(f"(a)'s answers: {every} strictly valid JSON; {new['truncated']}/{new['records']} closed by the "
          f"{args.max_new_tokens}-token budget rather than by the model (parse_status truncated: "
          f"{new['status_truncated']})")  # fmt: skip
    steps, processor_s = new_path.processor_steps(), new_path.processor_seconds()
    print(f"(a)'s JSON processor (grammar masks, budget decisions, applying them): "
          f"{new_path.processor_ms_per_step():.2f} ms per decoding step of a batch of <= {args.batch_size} rows "
          f"({1e3 * processor_s / max(new['positions'], 1):.3f} ms per token position; {steps} steps, "
          f"{processor_s:.2f} s = {100 * processor_s / new['generate_s']:.1f}% of (a)'s time in generate); LoRA layers "
          f"{'merged into the base' if new_path.merged else 'unmerged'}")  # fmt: skip
    token_ratio = plain["generate_s"] / new["generate_s"]  # equal positions
    verdict = "meets" if token_ratio >= TARGET_TOKEN_RATIO else "below"
    own_ratio = new["off_generate_s"] / new["generate_s"]  # equal positions
    own_verdict = "meets" if own_ratio >= TARGET_TOKEN_RATIO else "below"
    print(f"ratio (a)/(a'): {own_ratio:.2f}x token positions/s in generate at equal length: the JSON constraint's "
          f"per-token cost on the project's model ((a') = (a) without the processor, {new['off_generate_s']:.2f} s); "
          f"target >= {TARGET_TOKEN_RATIO:g}x: {own_verdict}")  # fmt: skip
    peft = "PEFT, LoRA merged" if new_path.merged else "PEFT's unmerged LoRA layers"
    print(f"ratio (a)/(c): {token_ratio:.2f}x token positions/s in generate at equal length (the constraint and "
          f"{peft}; target >= {TARGET_TOKEN_RATIO:g}x: {verdict}); {rate(new) / rate(plain):.2f}x records/s; "
          f"JSON valid {new['parse_ok']}/{new['records']} vs "
          f"{plain['parse_ok']}/{plain['records']}")  # fmt: skip
    if old is not None:
        ratio = rate(new) / rate(old)
        tok_ratio = rate(new, "new_tokens") / max(rate(old, "new_tokens"), 1e-9)
        verdict = "meets" if ratio >= TARGET_RATIO else "below"
        print(f"ratio (a)/(b): {ratio:.1f}x records/s ({tok_ratio:.1f}x new tokens/s); "
              f"target >= {TARGET_RATIO:g}x: {verdict}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
