"""How much padding ``--data.packing true`` saves on real records: one epoch of the training sampler's batches, the
tokens a padded batch computes vs a packed one, for a config's batch size and max_length. Tokenizer arithmetic only
(no model), so it runs in seconds on the 3000 seed records. Not a test.

    python scripts/bench_packing.py --records ../shared/seed_data/20250208181531_camp_data_step_1_without_answer.jsonl

The records carry no labels: each gets one of the official example answers (tests/fixtures/example_output.jsonl) in
turn, the length answers of the task have.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", default=str(REPO / "tests" / "fixtures" / "seed_records.jsonl"),
                   help="JSONL of case records (id, feature_content) (default: the committed 96-record fixture)")
    p.add_argument("--config", default=str(REPO / "configs" / "qwen_lora.yaml"),
                   help="fit config whose data.batch_size, max_length and mega_batch_mult are used")
    p.add_argument("--tokenizer", default=str(REPO / "models" / "tiny-qwen2.5"), help="tokenizer folder")
    p.add_argument("--batch_sizes", default=None, help="comma-separated batch sizes (default: the config's)")
    p.add_argument("--mega_batch_mult", type=int, default=None,
                   help="the sampler's length grouping (default: the config's; 1 = batches of random lengths)")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from healthai.batching import LengthGroupedSampler, PackingCollator
    from healthai.encoding import encode_example
    from healthai.prompts import PromptStyle

    data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))["data"]
    max_length, mult = data.get("max_length", 2048), args.mega_batch_mult or data.get("mega_batch_mult", 50)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    answers = [json.loads(line) for line in (REPO / "tests" / "fixtures" / "example_output.jsonl").open(encoding="utf-8")]
    records = [json.loads(line) for line in Path(args.records).open(encoding="utf-8") if line.strip()]
    lengths = []
    for i, r in enumerate(records):
        answer = answers[i % len(answers)]
        example = encode_example(tokenizer, PromptStyle(), r["feature_content"], answer["diseases"], answer["reason"],
                                 max_length)  # fmt: skip
        lengths.append(len(example["input_ids"]))
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [data.get("batch_size", 4)]
    print(f"{len(records)} records of {args.records}; tokens per example: median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}; max_length {max_length}, mega_batch_mult {mult}")
    print(f"{'batch':>5} {'real tokens':>12} {'padded':>12} {'packed':>12} {'padding padded':>15} {'padding packed':>15}"
          f" {'tokens saved':>13}")
    for batch_size in sizes:
        sampler = LengthGroupedSampler(lengths, batch_size, 1, 0, 42, mult)
        packer = PackingCollator(0, max_length)
        real = padded = packed = 0
        for batch in sampler.global_batches():
            sizes_of = [lengths[i] for i in batch]
            real += sum(sizes_of)
            padded += len(sizes_of) * max(sizes_of)
            rows = packer.rows(sizes_of)
            packed += len(rows) * max(sum(sizes_of[i] for i in row) for row in rows)
        print(f"{batch_size:>5} {real:>12} {padded:>12} {packed:>12} {1 - real / padded:>15.1%} "
              f"{1 - real / packed:>15.1%} {1 - packed / padded:>13.1%}")


if __name__ == "__main__":
    main()
