"""Benchmark `healthai serve`: records/s with 8 clients at once vs 1, against one server, side by side in one run —
the gain of LitServe's dynamic batching (requests that arrive together are decoded as one left-padded batch). Not a
test.

    python scripts/bench_serve.py                                   # small model, 64 real records, 48 new tokens
    python scripts/bench_serve.py --records 16 --rounds 2           # quicker
    python scripts/bench_serve.py --model path/to/Qwen2.5-7B-Instruct --dtype bfloat16 --device cuda \\
        --adapter ADAPTER --max_new_tokens 512 --records 256

It starts `python -m healthai serve` on a free loopback port (max_batch_size = --concurrency), waits for /health,
sends one warm-up request, then times ``--rounds`` alternating rounds: the round's share of the records sent one at a
time (concurrency 1), then the same records by ``--concurrency`` client threads. Alternating keeps a change in the
machine's load from favouring one side. Both sides send the same records, so they do the same work; the script also
checks that they got the same answers (greedy decoding is batch-invariant) and prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from benchlib import REPO, SEED_RECORDS, add_model_option, read_case_records, resolve_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, record: dict, timeout: float) -> dict:
    data = json.dumps(record, ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not healthy after {timeout:.0f}s")


def timed(fn) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_option(p)
    p.add_argument("--adapter", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch_timeout", type=float, default=0.05)
    p.add_argument("--max_new_tokens", type=int, default=48, help="the answer's token budget (its only bound)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server (OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for start-up and for each request")
    args = p.parse_args()
    if args.records % args.rounds:
        raise SystemExit("--records must be a multiple of --rounds")

    records = read_case_records(SEED_RECORDS, args.records, option="--records")
    # The server runs in the repository root: paths given relative to the caller's folder are made absolute.
    args.model, args.adapter = resolve_path(args.model), resolve_path(args.adapter)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "healthai", "serve", "--model_name_or_path", args.model, "--dtype", args.dtype,
           "--device", args.device, "--port", str(port), "--max_batch_size", str(args.concurrency),
           "--batch_timeout", str(args.batch_timeout), "--max_length", "768", "--log_level", "warning",
           "--generation.max_new_tokens", str(args.max_new_tokens)]  # fmt: skip
    if args.adapter:
        cmd += ["--adapter_path", args.adapter]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_serve: {args.records} records, {args.rounds} rounds, max_new_tokens {args.max_new_tokens}, "
          f"max_batch_size {args.concurrency}, batch_timeout {args.batch_timeout}s, model {args.model}, "
          f"load average {load:.1f}, {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        wait_healthy(proc, url, args.timeout)
        post(url + "/predict", records[0], args.timeout)  # warm-up
        per_round = args.records // args.rounds
        seconds = {1: 0.0, args.concurrency: 0.0}
        answers: dict[int, list[dict]] = {1: [], args.concurrency: []}
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for r in range(args.rounds):
                chunk = records[r * per_round : (r + 1) * per_round]
                t, out = timed(lambda: [post(url + "/predict", rec, args.timeout) for rec in chunk])
                seconds[1] += t
                answers[1] += out
                t, out = timed(lambda: list(pool.map(lambda rec: post(url + "/predict", rec, args.timeout), chunk)))
                seconds[args.concurrency] += t
                answers[args.concurrency] += out
                print(f"  round {r + 1}/{args.rounds}: done", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    rates = {c: args.records / s for c, s in seconds.items()}
    same = answers[1] == answers[args.concurrency]
    print(f"\n| clients at once | records | seconds | records/s |\n|---|---|---|---|")
    for c in (1, args.concurrency):
        print(f"| {c} | {args.records} | {seconds[c]:.1f} | {rates[c]:.2f} |")
    print(f"\nanswers identical at both concurrencies: {'yes' if same else 'NO'}")
    print(f"ratio concurrency {args.concurrency} / 1: {rates[args.concurrency] / rates[1]:.2f}x records/s")


if __name__ == "__main__":
    main()
