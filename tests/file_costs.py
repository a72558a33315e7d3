"""The order the suite's files run in: the costliest first, so that the two workers end together.

scripts/test.sh runs the files on 2 pytest-xdist workers (``--dist loadfile``, ``--no-loadscope-reorder``): a worker
that is free takes the next file in collection order. xdist's own order (most tests first) put files of one or two
long tests (the two-node run, the demo's memorisation) last, and one worker ran them for half a minute while the
other had finished. Longest first is the classic answer (LPT): what is left at the end is short files.

The costs are seconds per file from an earlier run, committed in ``tests/file_costs.json``; a file not listed there
counts as the median. Rewrite them after the suite's shape changed: ``scripts/test.sh --record-file-costs`` (a run
of some files updates only theirs). A stale figure only makes the order less good, never a test wrong.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

COSTS = Path(__file__).with_name("file_costs.json")
_spent: dict[str, float] = defaultdict(float)


def pytest_addoption(parser) -> None:
    parser.addoption("--record-file-costs", action="store_true",
                     help=f"write each file's seconds (setup, call, teardown) into {COSTS.name}: the order of the "
                          "next runs")  # fmt: skip


def read_costs() -> dict[str, float]:
    return json.loads(COSTS.read_text(encoding="utf-8")) if COSTS.is_file() else {}


def pytest_collection_modifyitems(items: list) -> None:
    """The files in order of cost, longest first; each file's tests in their own order."""
    costs = read_costs()
    unknown = statistics.median(costs.values()) if costs else 0.0
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)
    items.sort(key=lambda item: (-costs.get(item.nodeid.split("::")[0], unknown), first[item.nodeid.split("::")[0]]))


def pytest_runtest_logreport(report) -> None:
    _spent[report.nodeid.split("::")[0]] += report.duration


def pytest_sessionfinish(session) -> None:
    # In the xdist controller (or a run without workers): it receives every worker's reports.
    if not session.config.getoption("record_file_costs") or hasattr(session.config, "workerinput"):
        return
    costs = {**read_costs(), **{name: round(seconds, 1) for name, seconds in _spent.items()}}
    COSTS.write_text(json.dumps(dict(sorted(costs.items(), key=lambda kv: -kv[1])), indent=1) + "\n", encoding="utf-8")
