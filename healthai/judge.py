"""A large model as a second opinion on the diagnosis match, ``evaluate --judge_base_url URL --judge_model M``: how it
is asked (this module) and how its answers are scored (:mod:`healthai.judge_report`).

Exact and normalised matching (:mod:`healthai.metrics`, :mod:`healthai.synonyms`) are deterministic and auditable and
stay the headline; the judge is reported beside them as its own section (``disease_judge``), never in their place.

How a record is judged:

* Names that match exactly (after :func:`~healthai.metrics.normalize_diseases`) count as matched without asking: the
  judge is only asked about the names left on both sides, and a record with none left on one side asks nothing.
* The judge is asked twice, in both orders: predicted names as list A and reference names as list B, then the lists
  swapped (:func:`~healthai.prompts.judge_messages`, the one place the question is worded). Only a pair both orders
  name counts: a model that pairs names by their position in the question disagrees with itself and is caught. The
  share of (predicted, reference) name pairs on which the two orders give the same verdict is reported as
  ``agreement``.
* Agreed pairs are matched one to one (each name used at most once; a maximum matching,
  :func:`scipy.sparse.csgraph.maximum_bipartite_matching`), so judge F1 ≥ exact F1 on the same records.
* An answer that is not a JSON object ``{"pairs": [["A1", "B2"], ...]}`` with labels the lists showed is asked once
  more, then counted as failed. A record with a failed question is scored by its exact matches only and listed in
  ``failed``; ``evaluate`` writes its report and exits with status 1 (rerun to ask the failed questions again).
* Every good answer is appended to a JSONL cache beside the report (``<report stem>.judge.jsonl``), fsync'ed as it
  arrives (:class:`~healthai.jsonl.DurableAppender`), keyed by record id, both name lists and the judge model; a rerun
  asks only what is not in it (a crash's torn last line is cut off first).

The client, its retries, the shared 429 pause, concurrency, JSON mode, the stop on 401/403/404 and on a streak of
give-ups, SIGTERM / SIGINT, and the API key (from ``HEALTHAI_API_KEY`` / ``OPENAI_API_KEY``, never an option, scrubbed
from everything printed, written or raised) are ``label``'s: :mod:`healthai.teacher`, :mod:`healthai.teacher_run`,
:mod:`healthai.redact`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from tqdm import tqdm

from healthai.decoding import load_answer_json
from healthai.errors import ConfigError, check_output
from healthai.jsonl import BadRecordError, DurableAppender, iter_jsonl, recover_jsonl
from healthai.prompts import JUDGE_LIST_NAMES, judge_messages
from healthai.records import id_key
from healthai.redact import Redactor
from healthai.teacher import PauseGate, check_base_url, checked_api_key, make_client
from healthai.teacher_run import Failed, TeacherRun, run_workers

ASK_ATTEMPTS = 2
"""An unparseable answer is asked again once (sampling can differ); after that the question counts as failed."""

JUDGE_MAX_TOKENS = 512
"""Room for the answer: a record's pairs of labels are a few dozen tokens."""

JUDGE_TEMPERATURE = 0.0
"""The judge should answer the same question the same way: greedy decoding where the server honours it."""

_LABEL = re.compile(r"\s*([AB])\s*(\d+)\s*")


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how it is asked; built by :func:`judge_settings` from ``evaluate``'s options."""

    base_url: str
    """OpenAI-compatible endpoint (``--judge_base_url``)."""
    model: str
    """The judge model's name (``--judge_model``); part of every cache key."""
    cache: Path
    """The JSONL cache of answers, beside the report."""
    concurrency: int = 8
    """Questions in flight at once."""
    max_retries: int = 5
    """The client's retries per request (408, 409, 429, 5xx, timeouts, dropped connections)."""
    timeout: float = 120.0
    """Seconds allowed for one request."""


def cache_path_for(report: Path) -> Path:
    """``out/report.json`` → ``out/report.judge.jsonl``: the cache lives beside the report it serves."""
    report = Path(report)
    stem = report.name[: -len(report.suffix)] if report.suffix else report.name
    return report.with_name(stem + ".judge.jsonl")


def judge_settings(base_url: Optional[str], model: Optional[str], report: Optional[Path], inputs: Mapping[str, Any],
                   concurrency: int, max_retries: int, timeout: float) -> Optional[JudgeSettings]:
    """The judge's settings, or None when no judge was asked for. Raises :class:`ConfigError` naming the option when
    only one of URL and model is given, the URL has no scheme, or there is no ``--report`` to keep the cache beside;
    :class:`~healthai.errors.InputError` when the cache would replace one of ``inputs`` (option → path);
    :class:`~healthai.teacher.MissingApiKeyError` when the environment holds no usable key."""
    if base_url is None and model is None:
        return None
    if base_url is None or model is None:
        given, missing = ("--judge_base_url", "--judge_model") if model is None else ("--judge_model",
                                                                                       "--judge_base_url")
        raise ConfigError(f"{given} needs {missing} too (the judge's endpoint and model name)")
    check_base_url("--judge_base_url", base_url)
    if not model.strip():
        raise ConfigError("--judge_model: empty model name")
    if report is None:
        raise ConfigError("--judge_base_url needs --report: the judge's answers are cached beside the report, so a "
                          "rerun asks nothing twice")  # fmt: skip
    cache = cache_path_for(report)
    check_output("--report's judge cache", cache, dict(inputs))
    checked_api_key()  # a missing or unusable key stops here, before any scoring work
    return JudgeSettings(base_url, model, cache, concurrency, max_retries, timeout)


# ---------------------------------------------------------------------------------------------------------------------
# The question and its answer
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One question to the judge: which names of ``a`` name the same disease as which names of ``b``."""

    id: int | str
    a: tuple[str, ...]
    b: tuple[str, ...]

    def key(self, model: str) -> str:
        """The cache key: record id, both lists (in this order) and the judge model."""
        text = json.dumps([id_key(self.id), self.a, self.b, model], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _label_index(label: Any, letter: str, size: int) -> int:
    """The 0-based index a label such as ``A2`` stands for; ValueError unless it is one the list showed."""
    m = _LABEL.fullmatch(label) if isinstance(label, str) else None
    if m is None or m.group(1) != letter or not 1 <= int(m.group(2)) <= size:
        raise ValueError(f"{label!r} is not one of {letter}1..{letter}{size}")
    return int(m.group(2)) - 1


def parse_judge_reply(text: str, n_a: int, n_b: int) -> frozenset[tuple[int, int]]:
    """The ``(index in A, index in B)`` pairs (0-based) of a judge's answer ``{"pairs": [["A1", "B2"], ...]}``, or
    :class:`ValueError` saying why it is unusable. Fences are stripped but nothing is repaired: a guessed repair could
    invent a match."""
    if not text or not text.strip():
        raise ValueError("empty reply")
    obj, _ = load_answer_json(text, allow_repair=False)
    if not isinstance(obj, dict) or not isinstance(obj.get("pairs"), list):
        raise ValueError('not a JSON object with a "pairs" list')
    pairs = set()
    for item in obj["pairs"]:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError(f"pair {item!r} is not two labels")
        first, second = JUDGE_LIST_NAMES
        a, b = sorted(item, key=lambda x: str(x).strip()[:1])  # ["B2", "A1"] names the same pair
        pairs.add((_label_index(a, first, n_a), _label_index(b, second, n_b)))
    return frozenset(pairs)


# ---------------------------------------------------------------------------------------------------------------------
# Asking
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class JudgeState:
    """Why the judge's run stopped early, when it did (:class:`~healthai.teacher_run.RunState`)."""

    aborted: Optional[str] = None
    signal: Optional[int] = None


def read_cache(path: Path) -> dict[str, frozenset[tuple[int, int]]]:
    """The cached answers by key; a torn last line (a crash mid-write) is cut off, any other bad line stops naming
    ``file:line``."""
    recover_jsonl(path, key="key")
    answers = {}
    for line_no, row, error in iter_jsonl(path) if path.exists() else ():
        if error is None:
            answers[row["key"]] = _cached_pairs(path, line_no, row)
    return answers


def _cached_pairs(path: Path, line_no: int, row: dict) -> frozenset[tuple[int, int]]:
    """One cache row's pairs, checked against its own lists (a hand-edited row must not score a wrong match);
    :class:`~healthai.jsonl.BadRecordError` naming ``file:line`` otherwise."""
    a, b, pairs = row.get("a"), row.get("b"), row.get("pairs")
    ok = isinstance(a, list) and isinstance(b, list) and isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p) and 0 <= p[0] < len(a)
        and 0 <= p[1] < len(b) for p in pairs)  # fmt: skip
    if not ok:
        raise BadRecordError(path, line_no, "not a judge cache row (\"a\", \"b\" and index \"pairs\" within them); "
                                            "delete the line or the file to ask again")  # fmt: skip
    return frozenset((i, j) for i, j in pairs)


class JudgeRun(TeacherRun):
    """The judge's questions in flight: good answers go to ``answers`` and the cache, failures to ``failures``."""

    def __init__(self, settings: JudgeSettings, client: Any, redactor: Redactor, state: JudgeState,
                 answers: dict[str, frozenset[tuple[int, int]]]):  # fmt: skip
        super().__init__(
            client, redactor, state, command="judge", model=settings.model, temperature=JUDGE_TEMPERATURE,
            max_tokens=JUDGE_MAX_TOKENS, json_mode=True, timeout=settings.timeout, concurrency=settings.concurrency,
            options="--judge_base_url, --judge_model",
        )  # fmt: skip
        self.answers = answers
        self.failures: dict[str, Failed] = {}
        self.asked = 0
        """Questions sent this run; a question asked again after an unusable answer counts twice (the client's own
        retries of one request do not)."""
        self.cache: Optional[DurableAppender] = None

    async def judge(self, q: Question) -> frozenset[tuple[int, int]] | Failed | None:
        """Ask one question (once more after an unusable answer)."""
        failure = None
        for _ in range(ASK_ATTEMPTS):
            self.asked += 1
            reply = await self.ask(judge_messages(q.a, q.b))
            if reply is None or isinstance(reply, Failed):
                return reply
            content = reply[0] or ""
            try:
                return parse_judge_reply(content, len(q.a), len(q.b))
            except ValueError as e:
                failure = Failed(f"unusable judge reply: {e}", ASK_ATTEMPTS, raw=self.redactor.cut(content, 500))
        return failure

    async def handle(self, q: Question) -> None:
        outcome = await self.judge(q)
        key = q.key(self.model)
        if outcome is None:
            return
        if isinstance(outcome, Failed):
            if self.bar is not None:
                self.bar.update(1)
            self.failures[key] = outcome
            self.note_give_up(outcome)
            self.log(f"judge: record {q.id!r} failed: {outcome.reason}")
            return
        self.note_success()
        self.answers[key] = outcome
        if self.bar is not None:
            self.bar.update(1)
        assert self.cache is not None
        self.cache.add({"key": key, "id": q.id, "model": self.model, "a": list(q.a), "b": list(q.b),
                        "pairs": sorted(outcome)})  # fmt: skip


async def ask_all(settings: JudgeSettings, api_key: str, redactor: Redactor, questions: list[Question],
                  answers: dict[str, frozenset[tuple[int, int]]]) -> JudgeRun:  # fmt: skip
    """Ask every question whose answer is not in ``answers`` yet; good answers are added to it and to the cache."""
    pending = [q for q in questions if q.key(settings.model) not in answers]
    client = make_client(settings.base_url, api_key, timeout=settings.timeout, max_retries=settings.max_retries,
                         gate=PauseGate())  # fmt: skip
    run = JudgeRun(settings, client, redactor, JudgeState(), answers)
    try:
        settings.cache.parent.mkdir(parents=True, exist_ok=True)
        run.cache = DurableAppender(settings.cache, "a", redactor.writer)
        # On a terminal only (tqdm's disable=None): a report's output stays free of it.
        run.bar = tqdm(total=len(pending), unit="q", desc="judge", disable=None, file=sys.stderr)
        try:
            await run_workers(run, pending)
        finally:
            run.bar.close()
            await run.cache.aclose()
    finally:
        await client.close()
    return run
