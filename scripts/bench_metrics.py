"""Benchmark disease scoring: exact vs normalised (synonym table + qualifier rules) on the same records. Not a test.

    python scripts/bench_metrics.py                                   # 3,000 synthetic records of ~5 names each
    python scripts/bench_metrics.py --records /work/shared/seed_data/20250214171329_example_output.jsonl

With ``--records`` (JSONL with a ``diseases`` field), each record's names are the reference, and the prediction is
the same names with qualifiers added or dropped at random (原发性, (2级), 伴血糖控制不佳), repeated to ``--n``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from healthai.metrics import DiseaseF1, normalize_diseases  # noqa: E402
from healthai.prompts import join_diseases  # noqa: E402
from healthai.synonyms import Normalizer  # noqa: E402

NAMES = ["高血压", "2型糖尿病", "1型糖尿病", "冠心病", "慢性肾脏病", "肺炎", "肺癌", "低血压", "糖尿病肾病",
         "甲状腺功能亢进症", "甲状腺功能减退症", "上呼吸道感染", "慢性胃炎", "脑梗死", "高脂血症"]
QUALIFY = [lambda n: "原发性" + n, lambda n: n + "(2级)", lambda n: n + "伴血糖控制不佳", lambda n: n]


def _records(path: str | None, n: int, rng: random.Random) -> list[list[str]]:
    if path is None:
        return [rng.sample(NAMES, 5) for _ in range(n)]
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    names = [normalize_diseases(join_diseases(r["diseases"])) for r in rows if r.get("diseases")]
    return [names[i % len(names)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", help="JSONL with a diseases field (default: synthetic names)")
    parser.add_argument("--n", type=int, default=3000, help="records to score")
    args = parser.parse_args()
    rng = random.Random(0)
    refs = _records(args.records, args.n, rng)
    preds = ["；".join(rng.choice(QUALIFY)(name) for name in names) for names in refs]
    targets = ["；".join(names) for names in refs]
    times = {}
    for label, metric in (("exact", DiseaseF1()), ("normalised", DiseaseF1(normalizer=Normalizer()))):
        start = time.perf_counter()
        metric.update(preds, targets)
        f1 = float(metric.compute()["f1"])
        times[label] = (time.perf_counter() - start, f1)
    names = sum(len(r) for r in refs) / len(refs)
    print(f"{len(refs)} records x {names:.1f} names (CPU, 1 process): "
          + ", ".join(f"{k} {t:.3f} s (F1 {f1:.3f})" for k, (t, f1) in times.items()))


if __name__ == "__main__":
    main()
