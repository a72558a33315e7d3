"""Benchmark prediction: the project's batched, greedy, JSON-constrained predict path vs the same batches generated
by transformers alone without a constraint, and vs the old one-record-at-a-time sampling loop, side by side in this
one process. Not a test.

    python scripts/bench_predict.py --records path/to/records.jsonl    # 64 real records, 64 new tokens, batch 16
    python scripts/bench_predict.py --n_records 4 --max_new_tokens 8   # smoke run (the committed fixture)
    python scripts/bench_predict.py --old_records 64                    # time (b) on all 64 too (~7 min on 2 cores)
    python scripts/bench_predict.py --model path/to/Qwen2.5-7B-Instruct --n_records 256 --batch_size 32

Records: the first ``--n_records`` (after ``--offset``) of ``--records`` (default: the committed fixture,
tests/fixtures/seed_records.jsonl, 96 real records spanning the length range); a count larger than the file is an
error.

(a) new: ``DiagnosisDataModule`` (prompts tokenised once and sorted by length, left-padded batches of
    ``--batch_size``) → ``DiagnosisLoRA.predict_step`` (``generate`` with greedy decoding, KV cache and the xgrammar
    JSON constraint, then ``parse_answer``), in ``torch.no_grad``. The timed part covers the data module's
    ``setup("predict")`` (reading + tokenising), the collation and every ``predict_step``.
(c) plain: what a user would write with transformers alone: the plain model, the tokenizer with
    ``padding_side="left"``, the chat template applied to the same ``PromptStyle`` messages, ``generate`` on (a)'s
    very batches (same records, same length-sorted grouping) with greedy decoding and no constraint, stopping at the
    end-of-turn token, then ``batch_decode``. (a)/(c) is what the JSON constraint (and the project's data module and
    parsing) costs or saves; the JSON-valid rates show what it buys.
(b) old: the plain transformers model, one record at a time: ``prompt_ids`` (same chat prompt) →
    ``model.generate(do_sample=True, temperature=0.7, top_p=0.8)`` with no constraint → ``tokenizer.decode``.

(b) costs ~0.1 s per new token on 2 CPU cores (top-p sorts the 152k-token vocabulary at every step), so by default it is
timed on ``--old_records`` 16 of the 64 records, spread evenly over their prompt lengths (the records are ranked by
prompt length and every 4th is taken); its records/s is a per-record rate, so the ratio stays like for like, and the
table shows both sets' mean prompt length. ``--old_records`` equal to ``--records`` times (b) on all of them.

The three are timed in alternating rounds (one (a) batch, the same batch through (c), then (b) on its share of the
records, and so on), so that a change in the machine's load during the run weighs on all alike.

All use the same ``--max_new_tokens``. The unconstrained paths stop at the model's end-of-turn token whenever they
write one, while the constrained path writes until its JSON object closes, so they may generate different numbers of
tokens: the table shows new tokens (per row, up to and including its stop token) and new tokens/s next to records/s,
and the share of outputs that parse as the answer JSON (checked after the clock stops). Each path is warmed up once on
2 records first (for (a) that also compiles the JSON grammar, a one-off cost per run). Target: (a)/(b) >= 8x in
records/s with the small model; (a)/(c) has no target: it is reported as measured.

Threads: torch's default. On a shared CPU under load, two OpenMP threads can make each of the small model's tiny ops
wait milliseconds for a descheduled thread, which swamps both paths unevenly (in one loaded run on 2 cores, (a) took
18x and (b) 6x as long as with one thread); the header prints the load average, and ``--threads 1`` gives steadier
numbers there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Real case records committed with the tests (96, spanning the length range); pass a larger file for real figures.
SEED_RECORDS = REPO / "tests" / "fixtures" / "seed_records.jsonl"
TARGET_RATIO = 8.0


def resolve_model(path: str) -> str:
    """``--model`` as given, or relative to the repository root when it is not a folder relative to the cwd."""
    p = Path(path)
    if not p.exists() and (REPO / p).exists():
        return str(REPO / p)
    return path


def read_seed_records(path: Path, n: int, offset: int = 0, warm: int = 0) -> list[dict]:
    """The first ``n`` + ``warm`` real records (``id``, ``feature_content``) after ``offset``; exits with one line if
    the file holds fewer."""
    rows = []
    if not path.is_file():
        raise SystemExit(f"--records {path}: no such file")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if len(rows) == n + warm:
                break
            if i < offset or not line.strip():
                continue
            obj = json.loads(line)
            rows.append({"id": obj["id"], "feature_content": obj["feature_content"]})
    if len(rows) < n + warm:
        raise SystemExit(f"--n_records {n} (+ {warm} for warm-up) from --offset {offset}: {path} holds only "
                         f"{offset + len(rows)} records")  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def new_token_counts(new, stop_ids: set[int]) -> list[int]:
    """Per row of ``new`` (2-D generated ids): tokens up to and including the first stop token (all if none)."""
    counts = []
    for row in new.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in stop_ids:
                n = i + 1
                break
        counts.append(n)
    return counts


# --------------------------------------------------------------------------------------------------------------------
# (a) the project's predict path
# --------------------------------------------------------------------------------------------------------------------


class CountingGenerate:
    """Wraps ``PeftModel.generate`` to count each row's new tokens (a few list operations per batch)."""

    def __init__(self, generate, stop_ids: set[int]):
        self.generate = generate
        self.stop_ids = stop_ids
        self.new_tokens = 0

    def __call__(self, *args, input_ids, **kwargs):
        out = self.generate(*args, input_ids=input_ids, **kwargs)
        self.new_tokens += sum(new_token_counts(out[:, input_ids.shape[1] :], self.stop_ids))
        return out


class ProjectPath:
    """(a): ``DiagnosisLoRA`` built as predict builds it; :meth:`batches` runs a file through the data module."""

    def __init__(self, model_path: str, tokenizer, args):
        from healthai.data import end_of_turn_id
        from healthai.decoding import GenerationSettings
        from healthai.model import DiagnosisLoRA

        self.model_path, self.tokenizer = model_path, tokenizer
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, max_diseases_chars=args.max_diseases_chars,
                                      max_reason_chars=args.max_reason_chars)  # fmt: skip
        self.lit = DiagnosisLoRA(model_path, dtype="float32", gradient_checkpointing=False, generation=settings)
        self.lit.configure_model()
        self.lit.eval()
        self.counter = CountingGenerate(self.lit.model.generate, {end_of_turn_id(tokenizer), tokenizer.pad_token_id})
        self.lit.model.generate = self.counter  # an instance attribute: only this object's calls are counted

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

        from healthai.data import prompt_ids

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

        from healthai.data import end_of_turn_id
        from healthai.prompts import PromptStyle

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        self.style, self.max_new_tokens, self.new_tokens = PromptStyle(), args.max_new_tokens, 0
        self.eot = end_of_turn_id(self.tokenizer)

    def generate(self, rows: list[dict]) -> list[str]:
        import torch

        texts = [self.tokenizer.apply_chat_template(self.style.messages(r["feature_content"]), tokenize=False,
                                                    add_generation_prompt=True) for r in rows]  # fmt: skip
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      eos_token_id=self.eot, pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        self.new_tokens += sum(new_token_counts(new, {self.eot, self.tokenizer.pad_token_id}))
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def run_interleaved(new: ProjectPath, plain: PlainBatchedPath, old: OldPath, records_file: Path,
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
    rows, texts, plain_texts, b_seconds, c_seconds = [], [], [], 0.0, 0.0
    batches = iter(loader)
    for k in range(rounds):
        batch = next(batches)
        t = time.perf_counter()
        rows += new.step(batch, k)
        a_seconds += time.perf_counter() - t
        t = time.perf_counter()
        plain_texts += plain.generate(batch["records"])
        c_seconds += time.perf_counter() - t
        t = time.perf_counter()
        texts += old.generate(chunks[k])
        b_seconds += time.perf_counter() - t
    a = {"records": len(rows), "seconds": a_seconds, "new_tokens": new.counter.new_tokens,
         # Strict JSON, as for (b) and (c): a truncated row parsed strictly too (a field reached its cap).
         "parse_ok": sum(r["parse_status"] in ("ok", "truncated") for r in rows)}  # fmt: skip
    b = {"records": len(texts), "seconds": b_seconds, "new_tokens": old.new_tokens,
         "parse_ok": sum(parse_answer(x).status == "ok" for x in texts)}  # fmt: skip
    c = {"records": len(plain_texts), "seconds": c_seconds, "new_tokens": plain.new_tokens,
         "parse_ok": sum(parse_answer(x).status == "ok" for x in plain_texts)}  # fmt: skip
    return a, b, c


def spread_subset(tokenizer, records: list[dict], m: int) -> tuple[list[dict], float, float]:
    """``m`` of ``records`` at evenly spaced ranks of prompt length (input order kept), and the mean prompt length
    of all records and of the subset."""
    from healthai.data import prompt_ids
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
    parser.add_argument("--model", default="models/tiny-qwen2.5", help="model folder (default: %(default)s)")
    parser.add_argument("--records", default=str(SEED_RECORDS),
                        help="JSONL of real case records (id, feature_content) (default: the committed fixture)")
    parser.add_argument("--n_records", type=int, default=64, help="records timed (default: %(default)s)")
    parser.add_argument("--offset", type=int, default=0, help="first record taken from --records")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="same for all paths (default: %(default)s)")
    parser.add_argument("--old_records", type=int, default=16,
                        help="records (b) is timed on, spread over the prompt lengths (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="predict batch size of (a) and (c) (default: %(default)s)")
    parser.add_argument("--max_diseases_chars", type=int, default=12, help="(a)'s constraint bound (as predict_tiny)")
    parser.add_argument("--max_reason_chars", type=int, default=36, help="(a)'s constraint bound (as predict_tiny)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of (b)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Warm-up records are the 2 after the timed ones, so no path has seen the timed prompts.
    both = read_seed_records(Path(args.records), args.n_records, args.offset, warm=2)
    records, warm = both[: args.n_records], both[args.n_records :]

    old_records, new_len, old_len = spread_subset(tokenizer, records, args.old_records)

    print(f"model {model_path}; {len(records)} records of {args.records}, max_new_tokens {args.max_new_tokens}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} "
          "CPUs", flush=True)  # fmt: skip
    new_path, old_path = ProjectPath(model_path, tokenizer, args), OldPath(model_path, tokenizer, args)
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
        old_path.generate(warm)
        old_warm = time.perf_counter() - t
        new_path.counter.new_tokens = old_path.new_tokens = plain_path.new_tokens = 0
        new, old, plain = run_interleaved(new_path, plain_path, old_path, records_file, old_records, args.batch_size)
    new["prompt_len"], old["prompt_len"], plain["prompt_len"] = new_len, old_len, new_len
    new["warmup_s"], old["warmup_s"], plain["warmup_s"] = new_warm, old_warm, plain_warm
    print(f"load average after the run {os.getloadavg()[0]:.2f}")

    rows = [
        (f"(a) project: batch {args.batch_size}, greedy, KV cache, constrained", new),
        ("(c) transformers alone: same batches, greedy, unconstrained", plain),
        ("(b) old: 1 record at a time, sampled, unconstrained", old),
    ]
    header = (f"{'path':<56} {'records':>7} {'prompt':>6} {'seconds':>8} {'records/s':>10} {'new tok':>8} "
              f"{'new tok/s':>10} {'JSON ok':>8}")  # fmt: skip
    print()
    print(header)
    print("-" * len(header))
    for name, r in rows:
        rate, tok_rate = r["records"] / r["seconds"], r["new_tokens"] / r["seconds"]
        print(f"{name:<56} {r['records']:7d} {r['prompt_len']:6.0f} {r['seconds']:8.2f} {rate:10.2f} "
              f"{r['new_tokens']:8d} {tok_rate:10.1f} {r['parse_ok']:>4}/{r['records']:<3}")  # fmt: skip
    print("(prompt = mean prompt tokens; new tok = generated tokens, each row up to and including its stop token;")
    print(f" JSON ok = rows that parse strictly as the answer object; warm-up on 2 other records, not timed: "
          f"(a) {new['warmup_s']:.2f} s incl. the grammar compile, (c) {plain['warmup_s']:.2f} s, "
          f"(b) {old['warmup_s']:.2f} s)")  # fmt: skip

    def rate(r: dict) -> float:
        return r["records"] / r["seconds"]

    print()
    print(f"ratio (a)/(c): {rate(new) / rate(plain):.2f}x records/s: what the constraint costs (< 1) or saves (> 1) "
          f"next to plain batched greedy generate; JSON valid {new['parse_ok']}/{new['records']} vs "
          f"{plain['parse_ok']}/{plain['records']}")  # fmt: skip
    ratio = rate(new) / rate(old)
    tok_ratio = (new["new_tokens"] / new["seconds"]) / max(old["new_tokens"] / old["seconds"], 1e-9)
    verdict = "meets" if ratio >= TARGET_RATIO else "below"
    print(f"ratio (a)/(b): {ratio:.1f}x records/s ({tok_ratio:.1f}x new tokens/s); "
          f"target >= {TARGET_RATIO:g}x: {verdict}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
