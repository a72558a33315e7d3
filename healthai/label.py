"""Teacher labelling: ``python -m healthai label`` through any OpenAI-compatible chat endpoint.

A large teacher model (Qwen2.5-72B-Instruct on DashScope's OpenAI-compatible mode, or a vLLM / Ollama server) writes a
diagnosis and its reasons for every case record; the student is then fine-tuned on those labels.

How a run works:

* The prompt comes from :class:`healthai.prompts.PromptStyle` — the same rendering the student is trained on — and JSON
  output mode (``response_format={"type": "json_object"}``) is requested unless ``--json_mode false``; a server that
  refuses it (400 naming response_format) gets the rest of the run without it.
* ``concurrency`` workers keep that many requests in flight through one ``openai.AsyncOpenAI`` client, which does the
  retrying: 408, 409, 429, 5xx, timeouts and dropped connections are retried ``max_retries`` times with exponential
  backoff and jitter, honouring ``Retry-After``. What the client cannot do is done here: a 429 pauses *every* worker
  (rate limits belong to the key, not to one record; an httpx hook holds each request until the pause ends), 401/403/404
  stop the run (bad key, no access, unknown model: every record would fail alike), and so does a streak of records that
  ran out of retries (the server is down or the quota spent). The client and its error handling are
  :mod:`healthai.teacher`; asking, stopping early and the workers are :mod:`healthai.teacher_run` (shared with
  ``evaluate``'s judge).
* Each good result is appended to the output file and fsync'ed as it arrives (off the event loop, see
  :class:`~healthai.jsonl.DurableAppender`). Failures go to ``<output>.failures.jsonl`` (this run's only) and are
  not "done": a rerun labels exactly the ids that are not in the output yet — the failed ones and the ones a crash or a
  stop never reached — after cutting a torn last line off the output.
* SIGTERM / SIGINT stop the run: requests in flight are dropped (a rerun redoes them), what was labelled is fsync'ed,
  the summary says how to resume, and the exit status is 143 / 130.
* The API key is read from ``HEALTHAI_API_KEY`` (else ``OPENAI_API_KEY``) and is never an argument, so it cannot end up
  in a saved config. Some servers echo it back in error bodies (OpenAI's 401 does), so everything the run prints to
  stdout / stderr, writes to its files, raises or returns passes through one :class:`~healthai.redact.Redactor`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import openai
from tqdm import tqdm

from healthai.decoding import answer_fields, load_answer_json
from healthai.errors import NonNegativeInt, PositiveFloat, PositiveInt, TeacherTemperature
from healthai.errors import check_declared, check_output
from healthai.jsonl import DurableAppender, OnBadRecord, Rejects, recover_jsonl, rejects_path_for
from healthai.paths import check_writable, naming
from healthai.output_lock import OutputLock
from healthai.prompts import PromptStyle
from healthai.records import id_key
from healthai.records import read_records
from healthai.redact import Redactor
from healthai.teacher import PauseGate, check_base_url, checked_api_key, make_client
from healthai.teacher_run import Failed, TeacherRun, run_workers


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
    """Label case records with a teacher model (OpenAI-compatible API; key from $HEALTHAI_API_KEY or $OPENAI_API_KEY).

    The API key is read from the environment only (any dummy value for a local server that needs none); it is never a
    flag, so it cannot land in a saved config, and it is scrubbed from everything the run prints or writes. Rerunning
    the same command labels exactly the records that are not in --output yet. Exits with status 1 when any record
    failed or the run stopped early, 143 / 130 after SIGTERM / SIGINT (rerun to resume).
    """

    input: str
    """JSONL file of records {"id": int|str, "feature_content": str}."""
    output: str
    """JSONL file that results are appended to as {"id", "feature_content", "diseases", "reason"}; ids already in it
    are skipped. Failures of this run go to <output>.failures.jsonl; rerun the same command to retry them."""
    base_url: str
    """OpenAI-compatible endpoint, e.g. https://dashscope.aliyuncs.com/compatible-mode/v1 or http://127.0.0.1:8000/v1
    (vLLM)."""
    model: str
    """Teacher model name, e.g. qwen2.5-72b-instruct."""
    concurrency: PositiveInt = 8
    """Requests kept in flight at once."""
    max_retries: NonNegativeInt = 5
    """Retries per request after 408, 409, 429, 5xx, a timeout or a dropped connection (the openai client's
    exponential backoff with jitter, honouring Retry-After); other 4xx fail the record at once."""
    timeout: PositiveFloat = 120.0
    """Seconds allowed for one request."""
    temperature: TeacherTemperature = 0.2
    """Sampling temperature of the teacher."""
    max_tokens: PositiveInt = 1024
    """Most tokens the teacher may write per reply; a reply cut at this limit counts as failed."""
    json_mode: bool = True
    """Request JSON output (response_format json_object). If the server answers 400 naming response_format, the run
    turns it off by itself and carries on."""
    prompt_dir: Optional[str] = None
    """Folder holding a prompt.json (e.g. an adapter/ folder) to label with that prompt; default prompt otherwise."""
    on_bad_record: OnBadRecord = "error"
    """What to do with a bad input line: "error" stops with file:line, "skip" writes it to <output>.rejects.jsonl.
    A duplicate id is always an error."""
    limit: Optional[NonNegativeInt] = None
    """Label at most this many of the pending records (a trial run)."""
    progress: bool = True
    """Show a progress bar with rate and ETA."""

    def __post_init__(self) -> None:
        check_declared(LabelSettings, vars(self), "--")  # the CLI checks these too; this is for Python callers
        check_base_url("--base_url", self.base_url)


@dataclass(frozen=True)
class Case:
    """One input record as the labeller needs it: its id (written back as read) and its case text."""

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
    """Left unlabelled because the run stopped early (``--limit``, a fatal error, a signal), in flight ones included."""
    elapsed_s: float = 0.0
    output: str = ""
    failures: Optional[str] = None
    """The failures file, when there were failures."""
    aborted: Optional[str] = None
    """Why the run stopped early, when it did."""
    signal: Optional[int] = None
    """The signal that stopped the run (SIGTERM, SIGINT), when one did."""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.aborted is None

    @property
    def exit_code(self) -> int:
        """0 when all is labelled, 128 + the signal after SIGTERM / SIGINT (the shell's convention), else 1."""
        if self.signal is not None:
            return 128 + self.signal
        return 0 if self.ok else 1

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
        if self.signal is not None or (self.aborted and self.not_attempted):
            text += (f"\nlabel: {self.skipped + self.done} labels are saved in {self.output}; rerun the same command "
                     f"to label the {self.failed + self.not_attempted} left")  # fmt: skip
        return text


def failures_path_for(output: str | Path) -> Path:
    """``data/labels.jsonl`` → ``data/labels.failures.jsonl`` (same naming as the rejects file)."""
    path = Path(output)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".failures.jsonl")


def read_cases(path: str | Path, on_bad_record: OnBadRecord, rejects: Rejects) -> list[Case]:
    """The input records as cases to label, read and validated by the rules every stage shares
    (:func:`healthai.records.read_records`)."""
    rows = read_records(path, labelled=False, on_bad_record=on_bad_record, rejects=rejects)
    return [Case(r["id"], r["feature_content"]) for r in rows]


@dataclass
class Labelled:
    diseases: str
    reason: str


class LabelRun(TeacherRun):
    """One ``healthai label`` run in progress: its settings, teacher client, output and failures files, progress bar
    and :class:`Summary`, and what happens to each record (:meth:`label_record` asks the teacher,
    :meth:`record_outcome` writes the result). Asking, JSON mode, stopping early and the workers are
    :class:`~healthai.teacher_run.TeacherRun`'s, shared with ``evaluate``'s judge.
    """

    def __init__(
        self, settings: LabelSettings, prompt: PromptStyle, client: openai.AsyncOpenAI, redactor: Redactor,
        summary: Summary,
    ):  # fmt: skip
        super().__init__(
            client, redactor, summary, command="label", model=settings.model, temperature=settings.temperature,
            max_tokens=settings.max_tokens, json_mode=settings.json_mode, timeout=settings.timeout,
            concurrency=settings.concurrency, options="--base_url, --model",
        )  # fmt: skip
        self.settings = settings
        self.summary = summary
        self.prompt = prompt
        self.out: Optional[DurableAppender] = None
        self.failures: Optional[DurableAppender] = None

    # -- the API -----------------------------------------------------------------------------------------------------

    async def label_record(self, record: Case) -> Labelled | Failed | None:
        """Label one record. None means the run was stopped before it started."""
        reply = await self.ask(self.prompt.messages(record.text))
        if reply is None or isinstance(reply, Failed):
            return reply
        content, finish_reason = reply
        return _outcome_from_reply(content, finish_reason, self.settings.max_tokens)

    async def handle(self, item: Case) -> None:
        self.record_outcome(item, await self.label_record(item))

    # -- output --------------------------------------------------------------------------------------------------------

    def record_outcome(self, record: Case, outcome: Labelled | Failed | None) -> None:
        """Write one finished record: a good row to the output, a failure to the failures file."""
        if outcome is None:
            return
        if isinstance(outcome, Labelled):
            assert self.out is not None
            row = {"id": record.id, "feature_content": record.text}
            row.update(diseases=outcome.diseases, reason=outcome.reason)
            self.out.add(row)
            self.summary.done += 1
            self.note_success()
        else:
            self.write_failure(record, outcome)
            self.note_give_up(outcome)
        if self.bar is not None:
            self.bar.update(1)

    def write_failure(self, record: Case, failure: Failed) -> None:
        if self.failures is None:  # created on the first failure, so a clean run leaves no failures file
            self.failures = DurableAppender(failures_path_for(self.settings.output), "w", self.redactor.writer)
            self.summary.failures = str(self.failures.path)
        row: dict[str, Any] = {"id": record.id, "reason": failure.reason, "attempts": failure.attempts}
        if failure.raw is not None:
            row["raw"] = failure.raw
        self.failures.add(row)
        self.summary.failed += 1
        if self.bar is not None:
            self.bar.set_postfix(failed=self.summary.failed, refresh=False)
        self.log(f"label: id {record.id!r} failed: {failure.reason}")

    async def aclose(self) -> None:
        """Finish the pending writes (fsync'ed) and close the files and the progress bar."""
        try:
            for appender in (self.out, self.failures):
                if appender is not None:
                    await appender.aclose()
        finally:
            if self.bar is not None:
                self.bar.close()


def _outcome_from_reply(content: Optional[str], finish_reason: Optional[str], max_tokens: int) -> Labelled | Failed:
    """Parse a reply into a label, or a failure that keeps the raw reply for inspection."""
    cut = finish_reason == "length"
    try:
        diseases, reason = parse_teacher_reply(content or "", allow_repair=not cut)
    except ValueError as e:
        why = f"unusable reply: {e}"
        if cut:
            why += f" (cut off at max_tokens={max_tokens}; raise --max_tokens)"
        return Failed(why, 1, raw=content)
    return Labelled(diseases, reason)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def check_outputs(settings: LabelSettings) -> None:
    """The files the run writes — the output and, beside it, the rejects and failures files (the failures file is
    deleted at the start) — must not be the input, and the output must not be a folder
    (:class:`~healthai.errors.InputError`)."""
    inputs = {"--input": settings.input}
    check_output("--output", settings.output, inputs)
    check_writable("--output", settings.output)  # read-only, permission denied: before any request (#29 item 8)
    for derived in (failures_path_for(settings.output), rejects_path_for(settings.output)):
        check_output(f"--output's {derived.name.split('.')[-2]} file", derived, inputs)


def _pending_records(settings: LabelSettings, rejects: Rejects) -> tuple[list[Case], int, int]:
    """``(records still to label, valid records in the input, records already in the output)``."""
    records = read_cases(settings.input, settings.on_bad_record, rejects)
    # Also cuts a torn last line left by a crash; a repeated id (two runs before outputs were locked) is an error.
    done = {id_key(i) for i in recover_jsonl(settings.output, unique=True)}
    pending = [r for r in records if id_key(r.id) not in done]
    return pending, len(records), len(records) - len(pending)


async def run_labelling(settings: LabelSettings, api_key: Optional[str] = None) -> Summary:
    """Label every input record that is not in the output yet and return what happened.

    ``api_key`` defaults to :func:`~healthai.teacher.api_key_from_env`. Raises
    :class:`~healthai.teacher.MissingApiKeyError`, :class:`~healthai.errors.InputError` or
    :class:`~healthai.jsonl.BadRecordError` before any request is made when the run cannot start. Everything the run
    prints, writes, raises and returns is scrubbed of the key (:class:`~healthai.redact.Redactor`).
    """
    api_key = checked_api_key(api_key)
    redactor = Redactor(api_key)
    with redactor.guard():
        summary = await _label_pending(settings, api_key, redactor)
    return redactor.scrub_summary(summary)


async def _label_pending(settings: LabelSettings, api_key: str, redactor: Redactor) -> Summary:
    started = time.monotonic()
    # An explicit prompt_dir must hold a prompt.json: silently labelling with the default prompt would be worse.
    prompt = PromptStyle.load(settings.prompt_dir) if settings.prompt_dir else PromptStyle()
    check_outputs(settings)
    # One process per output, from before the output is read to its last row: two runs labelled every id twice.
    with OutputLock(settings.output, "--output"):
        return await _label_locked(settings, api_key, redactor, prompt, started)


async def _label_locked(settings: LabelSettings, api_key: str, redactor: Redactor, prompt: PromptStyle,
                        started: float) -> Summary:  # fmt: skip
    rejects = Rejects(rejects_path_for(settings.output))
    try:
        pending, total, skipped = _pending_records(settings, rejects)
    finally:
        rejects.close()
    summary = Summary(total=total, skipped=skipped, rejected=rejects.count, output=settings.output)
    if rejects.count:
        print(f"label: skipped {rejects.count} bad input line(s); see {rejects.path}", file=sys.stderr)
    to_label = pending if settings.limit is None else pending[: settings.limit]
    # Previous failures are retried because they are not in the output; the failures file only describes this run.
    failures_path_for(settings.output).unlink(missing_ok=True)

    gate = PauseGate()
    client = make_client(
        settings.base_url, api_key, timeout=settings.timeout, max_retries=settings.max_retries, gate=gate
    )
    run = LabelRun(settings, prompt, client, redactor, summary)
    with naming(settings.output):  # a disk that fills mid-run says which file (#29 item 8)
        try:
            Path(settings.output).parent.mkdir(parents=True, exist_ok=True)
            run.out = DurableAppender(settings.output, "a", redactor.writer)
            run.bar = tqdm(total=len(to_label), unit="rec", desc="label", disable=not settings.progress,
                           file=sys.stderr)  # fmt: skip
            await run_workers(run, to_label)
        finally:
            try:
                await run.aclose()
            finally:
                await client.close()
    summary.not_attempted = len(pending) - summary.done - summary.failed
    summary.elapsed_s = time.monotonic() - started
    return summary


def label(settings: LabelSettings) -> dict[str, Any]:
    """Run ``python -m healthai label`` (the flags are :class:`LabelSettings`'s fields): print the summary, and exit
    with status 1 when anything is left to redo, 128 + the signal after SIGTERM / SIGINT. Returns the summary."""
    summary = asyncio.run(run_labelling(settings))
    print(summary.format())
    if summary.exit_code:
        raise SystemExit(summary.exit_code)
    return summary.as_dict()
