"""Benchmark `healthai label`: concurrent vs sequential against a local fake server with a fixed per-request latency.

    python scripts/bench_label.py                      # the committed fixture's 96 records, 200 ms per request
    python scripts/bench_label.py --records path/to/records.jsonl --n_records 200 --latency 0.1 --concurrency 16

Both runs go through the real code path (async client, retry loop, parsing, fsync'ed appends) in this one process,
against tests/fake_openai_server.py on 127.0.0.1. The server runs in a child process, as a real one would: in this
process its threads would compete with the labeller for the GIL and the benchmark would partly measure the fake server.
The target is a ratio of at least 12x at concurrency 16. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from benchlib import REPO, add_records_option, read_case_records, write_jsonl

from healthai.label import LabelSettings, Summary, run_labelling

TARGET_RATIO = 12.0


@contextlib.contextmanager
def fake_server(latency: float) -> Iterator[str]:
    """Start tests/fake_openai_server.py in a child process; yields its base URL."""
    cmd = [sys.executable, str(REPO / "tests" / "fake_openai_server.py"), "--latency", str(latency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"the fake server did not start (exit code {proc.poll()})")
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_once(workdir: Path, base_url: str, concurrency: int) -> Summary:
    settings = LabelSettings(
        input=str(workdir / "in.jsonl"),
        output=str(workdir / f"out.c{concurrency}.jsonl"),
        base_url=base_url,
        model="bench",
        concurrency=concurrency,
        timeout=30.0,
        progress=False,
    )
    summary = asyncio.run(run_labelling(settings, api_key="bench-dummy-key"))
    if not summary.ok or summary.done != summary.total:
        raise SystemExit(f"benchmark run at concurrency {concurrency} did not label everything: {summary}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_records_option(parser)
    parser.add_argument("--n_records", "--n", type=int, default=96, help="records per run (default: %(default)s)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--concurrency", type=int, default=16, help="compared against concurrency 1")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_label_") as tmp, fake_server(args.latency) as base_url:
        workdir = Path(tmp)
        records = read_case_records(args.records.resolve(), args.n_records)
        write_jsonl(workdir / "in.jsonl", records)
        n = len(records)
        print(f"{n} records from {args.records.resolve()}, {args.latency * 1000:.0f} ms per request, {base_url}")
        results = {c: bench_once(workdir, base_url, c) for c in (1, args.concurrency)}

    print(f"{'concurrency':>11}  {'records':>7}  {'seconds':>8}  {'rec/s':>7}")
    rates = {}
    for c, s in results.items():
        rates[c] = s.done / s.elapsed_s
        print(f"{c:>11}  {s.done:>7}  {s.elapsed_s:>8.2f}  {rates[c]:>7.2f}")
    ratio = rates[args.concurrency] / rates[1]
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"speed-up at concurrency {args.concurrency}: {ratio:.1f}x ({verdict} the {TARGET_RATIO:g}x target)")


if __name__ == "__main__":
    main()
