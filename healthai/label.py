"""Teacher labelling: ``python -m healthai label`` through any OpenAI-compatible chat endpoint.

A large teacher model (Qwen2.5-72B-Instruct on DashScope's OpenAI-compatible mode, or a vLLM / Ollama server) writes a
diagnosis and its reasons for every case record; the student is then fine-tuned on those labels.

How a run works:

* The prompt comes from :class:`healthai.prompts.PromptStyle` — the same rendering the student is trained on — and JSON
  output mode (``response_format={"type": "json_object"}``) is requested unless ``--json_mode false``.
* ``concurrency`` workers keep that many requests in flight. 429, 5xx, timeouts and dropped connections are retried
  with exponential backoff and jitter, never sooner than the server's ``Retry-After``; a 429 also pauses every worker,
  because rate limits belong to the key, not to one record. Any other 4xx fails the record at once, and 401/403/404
  (bad key, no access, unknown model: every record would fail the same way) stop the run.
* Each good result is appended to the output file and fsync'ed as it arrives (off the event loop, see
  :class:`DurableAppender`). Failures go to
  ``<output>.failures.jsonl`` (this run's only) and are not "done": a rerun labels exactly the ids that are not in the
  output yet — the failed ones and the ones a crash never reached — after cutting a torn last line off the output.
* The API key is read from ``HEALTHAI_API_KEY`` (else ``OPENAI_API_KEY``) and is never an argument, so it cannot end up
  in a saved config; every text this module writes is scrubbed of it as well (some servers echo the key back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import openai
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from healthai.jsonl import (
    BadRecordError,
    OnBadRecord,
    Rejects,
    append_rows,
    recover_jsonl,
    rejects_path_for,
)
from healthai.decoding import answer_fields, load_answer_json
from healthai.records import read_records as read_input_records
from healthai.prompts import PromptStyle

API_KEY_ENV_VARS = ("HEALTHAI_API_KEY", "OPENAI_API_KEY")
"""Where the key is looked for, in this order. It is never a command-line flag."""

FATAL_STATUSES = frozenset({401, 403, 404})
"""Statuses that mean the run is misconfigured (key, access, model name), not that one record is bad."""

MIN_GIVE_UP_STREAK = 10
"""The run stops when this many records in a row (at least twice ``concurrency``) ran out of retries with no success
in between: the server is down or the quota is spent, and hammering it with every remaining record helps nobody."""

MAX_RETRY_AFTER_S = 600.0
"""Upper bound on a server's ``Retry-After``, so a bogus header cannot stall the run for hours."""

MIN_SECRET_CHARS = 8
"""Keys at least this long are treated as secrets and scrubbed from what the run writes."""

MAX_MESSAGE_CHARS = 500
"""Server error bodies are cut to this length in failure reasons."""


class MissingApiKeyError(RuntimeError):
    """Neither key variable is set."""


class InputError(ValueError):
    """The run cannot start with these files or settings (e.g. the input file is the output file)."""


class BadResponseError(Exception):
    """The server answered 200 with something that is not a chat completion (an HTML page, broken JSON): most likely
    a wrong ``--base_url`` or a gateway in the way, so the record fails at once and counts towards stopping the run."""


# ---------------------------------------------------------------------------------------------------------------------
# Parsing the teacher's reply
# ---------------------------------------------------------------------------------------------------------------------

def parse_teacher_reply(text: str, *, allow_repair: bool = True) -> tuple[str, str]:
    """Return ``(diseases, reason)`` from a teacher reply, or raise :class:`ValueError` saying why it is unusable.

    The same reading as a model's answer (:mod:`healthai.decoding`: fences and reasoning blocks stripped, strict JSON,
    else json-repair), plus what a training label needs: both fields non-empty. Repair is turned off for replies cut
    at ``max_tokens``: it would "fix" them into a silently truncated reason.
    """
    if not text or not text.strip():
        raise ValueError("empty reply")
    try:
        obj, _ = load_answer_json(text, allow_repair=allow_repair)
        diseases, reason = answer_fields(obj)
    except ValueError as e:
        raise ValueError(f"reply {e}") from None
    for key, value in (("diseases", diseases), ("reason", reason)):
        if not value.strip():
            raise ValueError(f"field {key!r} is empty")
    return diseases.strip(), reason.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Settings, inputs and the summary
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSettings:
    """Everything a run needs except the API key (kept out so that no repr or saved config can show it)."""

    input: str
    output: str
    base_url: str
    model: str
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 120.0
    temperature: float = 0.2
    max_tokens: int = 1024
    json_mode: bool = True
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    prompt_dir: Optional[str] = None
    on_bad_record: OnBadRecord = "error"
    limit: Optional[int] = None
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "concurrency must be >= 1": self.concurrency >= 1,
            "max_retries must be >= 0": self.max_retries >= 0,
            "timeout must be > 0": self.timeout > 0,
            "max_tokens must be >= 1": self.max_tokens >= 1,
            "backoff_base must be >= 0": self.backoff_base >= 0,
            "backoff_max must be >= backoff_base": self.backoff_max >= self.backoff_base,
            "limit must be >= 0": self.limit is None or self.limit >= 0,
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise InputError("; ".join(problems))


@dataclass(frozen=True)
class Record:
    id: int | str
    text: str


@dataclass
class Summary:
    """What a run did. ``ok`` is false when anything is left to redo."""

    total: int
    """Valid records in the input."""
    done: int = 0
    """Labelled and written by this run."""
    failed: int = 0
    """Given up on by this run (see the failures file)."""
    skipped: int = 0
    """Already in the output before the run started."""
    rejected: int = 0
    """Bad input lines skipped (``on_bad_record: skip``)."""
    not_attempted: int = 0
    """Left unlabelled because the run stopped early (``--limit`` or a fatal error)."""
    elapsed_s: float = 0.0
    output: str = ""
    failures: Optional[str] = None
    """The failures file, when there were failures."""
    aborted: Optional[str] = None
    """Why the run stopped early, when it did."""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.aborted is None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        text = (
            f"label: done {self.done}, failed {self.failed}, skipped {self.skipped} (already in {self.output}), "
            f"rejected {self.rejected}, not attempted {self.not_attempted}; "
            f"elapsed {self.elapsed_s:.1f}s ({rate:.2f} rec/s)"
        )
        if self.failures:
            text += f"\nlabel: failures written to {self.failures}; rerun the same command to retry them"
        if self.aborted:
            text += f"\nlabel: stopped early: {self.aborted}"
        return text


def failures_path_for(output: str | Path) -> Path:
    """``data/labels.jsonl`` → ``data/labels.failures.jsonl`` (same naming as the rejects file)."""
    path = Path(output)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".failures.jsonl")


def api_key_from_env() -> str:
    """The API key from the first set variable of :data:`API_KEY_ENV_VARS`."""
    for name in API_KEY_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    raise MissingApiKeyError(
        f"no API key: set {API_KEY_ENV_VARS[0]} (or {API_KEY_ENV_VARS[1]}) in the environment; "
        "for a local server that needs none (vLLM, Ollama) any dummy value will do"
    )


def read_records(path: str | Path, on_bad_record: OnBadRecord, rejects: Rejects) -> list[Record]:
    """The input records, read and validated by the rules every stage shares (:mod:`healthai.records`)."""
    rows = read_input_records(path, labelled=False, on_bad_record=on_bad_record, rejects=rejects)
    return [Record(r["id"], r["feature_content"]) for r in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Talking to the server
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiFailure:
    """One failed request, classified."""

    reason: str
    retryable: bool
    status: Optional[int] = None
    retry_after: Optional[float] = None


def parse_retry_after(headers: Any) -> Optional[float]:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``Retry-After`` as seconds or as an HTTP date."""
    if headers is None:
        return None
    seconds = _as_float(headers.get("retry-after-ms"))  # OpenAI's finer-grained variant
    if seconds is not None:
        seconds /= 1000.0
    else:
        value = headers.get("retry-after")
        if not value:
            return None
        seconds = _as_float(value)
        if seconds is None:  # the other RFC 9110 form: an HTTP date
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None  # unreadable: fall back to plain backoff
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _as_float(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


_ERROR_CODE_PREFIX = re.compile(r"^Error code: \d+ - ")


def classify_error(exc: BaseException, timeout: float) -> ApiFailure:
    """Sort a request error into retryable (429, 5xx, timeout, connection) or not (any other 4xx or API error)."""
    # asyncio.TimeoutError: from wait_for (the builtin TimeoutError only from Python 3.11 on).
    if isinstance(exc, (asyncio.TimeoutError, openai.APITimeoutError)):
        return ApiFailure(f"timed out after {timeout:g}s", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        return ApiFailure(f"connection error ({detail})", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        # The client prefixes "Error code: 429 - "; the status is in our own prefix already.
        message = _ERROR_CODE_PREFIX.sub("", str(exc.message))[:MAX_MESSAGE_CHARS]
        retryable = status == 429 or status >= 500
        retry_after = parse_retry_after(exc.response.headers) if retryable else None
        return ApiFailure(f"HTTP {status}: {message}", retryable=retryable, status=status, retry_after=retry_after)
    # APIResponseValidationError and friends: the server answered, but not with a chat completion.
    return ApiFailure(f"{type(exc).__name__}: {str(exc)[:MAX_MESSAGE_CHARS]}", retryable=False)


def backoff_delay(retry_no: int, base: float, cap: float, retry_after: Optional[float] = None) -> float:
    """Delay before retry ``retry_no`` (1-based): exponential with "equal jitter", but never below ``retry_after``.

    Half of the exponential step is fixed and half random, so retries spread out (no thundering herd after a shared
    failure) while still growing.
    """
    step = min(cap, base * 2 ** (retry_no - 1))
    delay = step / 2 + random.uniform(0, step / 2)
    return max(delay, retry_after or 0.0)


class PauseGate:
    """A shared "no requests before" time: a 429 pauses every worker, not just the one that was told off."""

    def __init__(self) -> None:
        self._until = 0.0

    def pause(self, seconds: float) -> None:
        self._until = max(self._until, time.monotonic() + seconds)

    async def wait(self) -> None:
        while (remaining := self._until - time.monotonic()) > 0:
            await asyncio.sleep(remaining)


@dataclass
class Labelled:
    diseases: str
    reason: str
    attempts: int


@dataclass
class Failed:
    reason: str
    attempts: int
    raw: Optional[str] = None
    server_trouble: bool = False
    """Says something about the server rather than the record: out of retries, or not a chat completion at all."""


class DurableAppender:
    """Appends rows to a JSONL file with :func:`~healthai.jsonl.append_rows` (flush + fsync) from a worker thread.

    Why a thread: an fsync takes milliseconds (tens on a network disk) and on the event loop it would stall every
    request in flight. Why batches: rows that finish while one fsync runs are written and fsync'ed together right
    after it (group commit), so one slow fsync does not queue up one more per row. A row is on disk once its batch is;
    a crash before that leaves it out of the output, and the rerun labels it again — never twice.
    """

    def __init__(self, path: str | Path, mode: str):
        self.path = Path(path)
        self._file = open(self.path, mode, encoding="utf-8")
        self._pending: list[dict] = []
        self._drain: Optional[asyncio.Future] = None

    def add(self, row: dict) -> None:
        if self._drain is not None and self._drain.done():
            self._drain.result()  # re-raise a failed write (disk full) now, not at the end of the run
            self._drain = None
        self._pending.append(row)
        if self._drain is None:  # else the running drain picks the row up after its current batch
            self._drain = asyncio.ensure_future(self._write_pending())

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            # One batch at a time, so rows never interleave and the file keeps whole lines in arrival order.
            await asyncio.to_thread(append_rows, self._file, batch)

    async def aclose(self) -> None:
        """Write what is still pending, then close the file."""
        try:
            if self._drain is not None:
                await self._drain
        finally:
            self._file.close()


class _Run:
    """State shared by the workers of one run. The event loop is single-threaded, so no locks are needed."""

    def __init__(
        self, settings: LabelSettings, prompt: PromptStyle, client: openai.AsyncOpenAI, api_key: str, summary: Summary
    ):
        self.settings = settings
        self.client = client
        self.api_key = api_key
        self.summary = summary
        self.prompt = prompt
        self.json_mode = settings.json_mode
        self.gate = PauseGate()
        self.out: Optional[DurableAppender] = None
        self.failures: Optional[DurableAppender] = None
        self.bar: Optional[tqdm] = None
        self.give_up_streak = 0
        self.give_up_limit = max(MIN_GIVE_UP_STREAK, 2 * settings.concurrency)

    # -- the API -----------------------------------------------------------------------------------------------------

    async def request(self, record: Record, json_mode: bool) -> tuple[Optional[str], Optional[str]]:
        """One chat completion: ``(content, finish_reason)``."""
        s = self.settings
        kwargs: dict[str, Any] = {}
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        create = self.client.chat.completions.create(
            model=s.model,
            messages=self.prompt.messages(record.text),
            temperature=s.temperature,
            max_tokens=s.max_tokens,
            **kwargs,
        )
        try:
            # wait_for bounds the whole call; the client's own timeout only bounds each read, so a server that
            # trickles bytes could otherwise hold a slot forever.
            response = await asyncio.wait_for(create, s.timeout)
        except json.JSONDecodeError as e:  # the client parses a JSON content-type body without wrapping errors
            raise BadResponseError(f"the server's answer is not valid JSON ({e.msg}); check --base_url") from None
        if not isinstance(response, ChatCompletion):  # a non-JSON body (e.g. an HTML page) comes back as a str
            preview = str(response)[:80]
            raise BadResponseError(f"the server did not answer with a chat completion ({preview!r}); check --base_url")
        if not response.choices:
            return None, None
        choice = response.choices[0]
        return choice.message.content, choice.finish_reason

    async def label_record(self, record: Record) -> Labelled | Failed | None:
        """Label one record, retrying what is worth retrying. None means the run was stopped before it finished."""
        s = self.settings
        attempts = 0
        while True:
            await self.gate.wait()
            if self.summary.aborted:
                return None
            json_mode = self.json_mode
            attempts += 1
            try:
                content, finish_reason = await self.request(record, json_mode)
            except (asyncio.TimeoutError, openai.APIError) as exc:
                failure = classify_error(exc, s.timeout)
                # Checked against this request's json_mode, not the shared flag: with N requests in flight, N may
                # come back refused, and each must retry even though the first one already switched it off.
                if json_mode and _rejects_json_mode(failure):
                    self.disable_json_mode(failure.reason)
                    attempts -= 1  # the server's limitation, not the record's: this try does not count
                    continue
                if failure.status in FATAL_STATUSES:
                    self.abort(f"{failure.reason} (check --base_url, --model and the API key)")
                    return Failed(failure.reason, attempts)
                if not failure.retryable:
                    return Failed(failure.reason, attempts)
                if attempts > s.max_retries:
                    why = f"gave up after {attempts} attempts; last error: {failure.reason}"
                    return Failed(why, attempts, server_trouble=True)
                delay = backoff_delay(attempts, s.backoff_base, s.backoff_max, failure.retry_after)
                if failure.status == 429:
                    self.gate.pause(delay)
                await asyncio.sleep(delay)
                continue
            except BadResponseError as exc:
                return Failed(str(exc), attempts, server_trouble=True)
            return _outcome_from_reply(content, finish_reason, attempts, s.max_tokens)

    def disable_json_mode(self, reason: str) -> None:
        """The server refused ``response_format``: carry on without it for the rest of the run (the prompt still asks
        for JSON, and the parser copes with fences and chatter)."""
        if not self.json_mode:
            return  # another request in flight already switched it off (and said so)
        self.json_mode = False
        self.log(f"label: the server rejected JSON mode ({reason}); continuing without response_format")

    def abort(self, reason: str) -> None:
        if not self.summary.aborted:
            self.summary.aborted = reason
            self.log(f"label: stopping: {reason}")

    # -- output --------------------------------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """Scrub the key out of any text we write: some servers echo the key they were sent in their error bodies.

        Keys shorter than :data:`MIN_SECRET_CHARS` are the dummies local servers take ("EMPTY", "x"); replacing
        those would garble every message for no gain."""
        if len(self.api_key) < MIN_SECRET_CHARS:
            return text
        return text.replace(self.api_key, "***")

    def log(self, message: str) -> None:
        message = self.redact(message)
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def record_outcome(self, record: Record, outcome: Labelled | Failed | None) -> None:
        """Write one finished record: a good row to the output, a failure to the failures file."""
        if outcome is None:
            self.summary.not_attempted += 1
            return
        if isinstance(outcome, Labelled):
            assert self.out is not None
            row = {"id": record.id, "feature_content": record.text}
            row.update(diseases=outcome.diseases, reason=outcome.reason)
            self.out.add(row)
            self.summary.done += 1
            self.give_up_streak = 0
        else:
            self.write_failure(record, outcome)
            self.note_give_up(outcome)
        if self.bar is not None:
            self.bar.update(1)

    def note_give_up(self, failure: Failed) -> None:
        """Stop the run after a streak of records that ran out of retries (see :data:`MIN_GIVE_UP_STREAK`)."""
        if not failure.server_trouble:
            return  # a bad reply or a 4xx says nothing about the server's health
        self.give_up_streak += 1
        if self.give_up_streak >= self.give_up_limit:
            streak = self.give_up_streak
            self.abort(f"{streak} records in a row ran out of retries; the server looks down or over quota")

    def write_failure(self, record: Record, failure: Failed) -> None:
        if self.failures is None:  # created on the first failure, so a clean run leaves no failures file
            self.failures = DurableAppender(failures_path_for(self.settings.output), "w")
            self.summary.failures = str(self.failures.path)
        row: dict[str, Any] = {"id": record.id, "reason": self.redact(failure.reason), "attempts": failure.attempts}
        if failure.raw is not None:
            row["raw"] = self.redact(failure.raw)
        self.failures.add(row)
        self.summary.failed += 1
        if self.bar is not None:
            self.bar.set_postfix(failed=self.summary.failed, refresh=False)
        self.log(f"label: id {record.id!r} failed: {row['reason']}")

    async def aclose(self) -> None:
        """Finish the pending writes and close the files and the progress bar."""
        try:
            for appender in (self.out, self.failures):
                if appender is not None:
                    await appender.aclose()
        finally:
            if self.bar is not None:
                self.bar.close()


def _rejects_json_mode(failure: ApiFailure) -> bool:
    """A 400 that names response_format / JSON mode: the server does not support it (older vLLM, some gateways)."""
    text = failure.reason.lower()
    return failure.status == 400 and ("response_format" in text or "json_object" in text)


def _outcome_from_reply(
    content: Optional[str], finish_reason: Optional[str], attempts: int, max_tokens: int
) -> Labelled | Failed:
    """Parse a reply into a label, or a failure that keeps the raw reply for inspection."""
    cut = finish_reason == "length"
    try:
        diseases, reason = parse_teacher_reply(content or "", allow_repair=not cut)
    except ValueError as e:
        why = f"unusable reply: {e}"
        if cut:
            why += f" (cut off at max_tokens={max_tokens}; raise --max_tokens)"
        return Failed(why, attempts, raw=content)
    return Labelled(diseases, reason, attempts)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _pending_records(settings: LabelSettings, rejects: Rejects) -> tuple[list[Record], int, int]:
    """``(records still to label, valid records in the input, records already in the output)``."""
    if Path(settings.input).resolve() == Path(settings.output).resolve():
        raise InputError(f"--output must differ from --input ({settings.input})")
    records = read_records(settings.input, settings.on_bad_record, rejects)
    done_ids = set(recover_jsonl(settings.output))  # also cuts a torn last line left by a crash
    pending = [r for r in records if r.id not in done_ids]
    return pending, len(records), len(records) - len(pending)


async def _worker(run: _Run, queue: Iterator[Record]) -> None:
    # All workers pull from one iterator; the loop is single-threaded, so next() is never called concurrently.
    for record in queue:
        if run.summary.aborted:
            run.summary.not_attempted += 1
            continue
        run.record_outcome(record, await run.label_record(record))


async def _run_workers(run: _Run, pending: list[Record]) -> None:
    """``concurrency`` workers over one queue; if one dies of a bug, the others are stopped before files close."""
    queue = iter(pending)
    workers = [asyncio.ensure_future(_worker(run, queue)) for _ in range(min(run.settings.concurrency, len(pending)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def run_labelling(settings: LabelSettings, api_key: Optional[str] = None) -> Summary:
    """Label every input record that is not in the output yet and return what happened.

    ``api_key`` defaults to :func:`api_key_from_env`. Raises :class:`MissingApiKeyError`, :class:`InputError` or
    :class:`BadRecordError` before any request is made when the run cannot start.
    """
    started = time.monotonic()
    api_key = api_key if api_key is not None else api_key_from_env()
    # An explicit prompt_dir must hold a prompt.json: silently labelling with the default prompt would be worse.
    prompt = PromptStyle.load(settings.prompt_dir) if settings.prompt_dir else PromptStyle()
    rejects = Rejects(rejects_path_for(settings.output))
    try:
        pending, total, skipped = _pending_records(settings, rejects)
    finally:
        rejects.close()
    summary = Summary(total=total, skipped=skipped, rejected=rejects.count, output=settings.output)
    if rejects.count:
        print(f"label: skipped {rejects.count} bad input line(s); see {rejects.path}", file=sys.stderr)
    if settings.limit is not None and len(pending) > settings.limit:
        summary.not_attempted = len(pending) - settings.limit
        pending = pending[: settings.limit]
    # Previous failures are retried because they are not in the output; the failures file only describes this run.
    failures_path_for(settings.output).unlink(missing_ok=True)

    # max_retries=0: the retry loop above owns retries, so that Retry-After, jitter and the attempt count are ours.
    client = openai.AsyncOpenAI(base_url=settings.base_url, api_key=api_key, timeout=settings.timeout, max_retries=0)
    run = _Run(settings, prompt, client, api_key, summary)
    try:
        Path(settings.output).parent.mkdir(parents=True, exist_ok=True)
        run.out = DurableAppender(settings.output, "a")
        run.bar = tqdm(total=len(pending), unit="rec", desc="label", disable=not settings.progress, file=sys.stderr)
        await _run_workers(run, pending)
    finally:
        try:
            await run.aclose()
        finally:
            await client.close()
    summary.elapsed_s = time.monotonic() - started
    return summary


def label(
    input: str,
    output: str,
    base_url: str,
    model: str,
    concurrency: int = 8,
    max_retries: int = 5,
    timeout: float = 120.0,
    temperature: float = 0.2,
    max_tokens: int = 1024,
    json_mode: bool = True,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    prompt_dir: Optional[str] = None,
    on_bad_record: OnBadRecord = "error",
    limit: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Label case records with a teacher model (OpenAI-compatible API; key from $HEALTHAI_API_KEY or $OPENAI_API_KEY).

    The API key is read from the environment only (any dummy value for a local server that needs none); it is never a
    flag, so it cannot land in a saved config. Rerunning the same command retries exactly the records that are not in
    --output yet. Exits with status 1 when any record failed or the run stopped early.

    Args:
        input: JSONL file of records {"id": int|str, "feature_content": str}.
        output: JSONL file that results are appended to as {"id", "feature_content", "diseases", "reason"}; ids
            already in it are skipped. Failures of this run go to <output>.failures.jsonl; rerun the same command
            to retry them.
        base_url: OpenAI-compatible endpoint, e.g. https://dashscope.aliyuncs.com/compatible-mode/v1 or
            http://127.0.0.1:8000/v1 (vLLM).
        model: Teacher model name, e.g. qwen2.5-72b-instruct.
        concurrency: Requests kept in flight at once.
        max_retries: Retries per record after 429, 5xx, a timeout or a dropped connection (other 4xx fail at once).
        timeout: Seconds allowed for one request.
        temperature: Sampling temperature of the teacher.
        max_tokens: Most tokens the teacher may write per reply; a reply cut at this limit counts as failed.
        json_mode: Request JSON output (response_format json_object). If the server answers 400 naming
            response_format, the run turns it off by itself and carries on.
        backoff_base: Seconds before the first retry; doubles per retry, with jitter, never below Retry-After.
        backoff_max: Most seconds between two retries (a server's Retry-After can ask for more).
        prompt_dir: Folder holding a prompt.json (e.g. an adapter/ folder) to label with that prompt; default
            prompt otherwise.
        on_bad_record: What to do with a bad input line: "error" stops with file:line, "skip" writes it to
            <output>.rejects.jsonl. A duplicate id is always an error.
        limit: Label at most this many of the pending records (a trial run).
        progress: Show a progress bar with rate and ETA.
    """
    try:
        settings = LabelSettings(
            input=input, output=output, base_url=base_url, model=model, concurrency=concurrency,
            max_retries=max_retries, timeout=timeout, temperature=temperature, max_tokens=max_tokens,
            json_mode=json_mode, backoff_base=backoff_base, backoff_max=backoff_max, prompt_dir=prompt_dir,
            on_bad_record=on_bad_record, limit=limit, progress=progress,
        )  # fmt: skip
        summary = asyncio.run(run_labelling(settings))
    except (MissingApiKeyError, InputError, BadRecordError, FileNotFoundError) as e:
        # User errors: one clear line instead of a traceback. None of these messages can contain the key.
        raise SystemExit(f"label: error: {e}") from None
    print(summary.format())
    if not summary.ok:
        raise SystemExit(1)
    return summary.as_dict()
