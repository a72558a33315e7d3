"""What every run that asks a teacher model many questions shares (``label`` labelling records, ``evaluate``'s judge
comparing diagnosis names): one request with the run's error handling (:meth:`TeacherRun.ask`), and ``concurrency``
workers over one queue that stop on SIGTERM / SIGINT (:func:`run_workers`).

:meth:`TeacherRun.ask` adds to the client's own retrying (:mod:`healthai.teacher`) what belongs to a run: JSON mode
turned off for the rest of the run when the server refuses it, the run stopped on 401/403/404 (every question would
fail alike) and after a streak of questions that ran out of retries (the server is down or the quota spent).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import openai

from healthai.redact import Redactor
from healthai.teacher import FATAL_STATUSES, BadResponseError, attempts_of, chat_completion, classify_error
from healthai.teacher import rejects_json_mode

MIN_GIVE_UP_STREAK = 10
"""The run stops when this many questions in a row (at least twice ``concurrency``) ran out of retries with no success
in between: the server is down or the quota is spent, and hammering it with every remaining one helps nobody."""


@dataclass
class Failed:
    """One question given up on: why, after how many requests, and the raw reply when there was one."""

    reason: str
    attempts: int
    raw: Optional[str] = None
    server_trouble: bool = False
    """Says something about the server rather than the question: out of retries, or not a chat completion at all."""


class RunState(Protocol):
    """Where a run records why it stopped early (``label``'s :class:`~healthai.label.Summary` is one)."""

    aborted: Optional[str]
    signal: Optional[int]


class TeacherRun:
    """A run of questions to one teacher model in progress; subclasses say what one item is (:meth:`handle`).

    The workers of :func:`run_workers` share it; the event loop is single-threaded, so no locks are needed.
    """

    def __init__(
        self, client: openai.AsyncOpenAI, redactor: Redactor, state: RunState, *, command: str, model: str,
        temperature: float, max_tokens: int, json_mode: bool, timeout: float, concurrency: int, options: str,
    ):  # fmt: skip
        """``command`` prefixes every message (``label``, ``judge``); ``state`` receives why the run stopped;
        ``options`` names the URL and model options a 401/403/404 tells the user to check; the other arguments are
        the request settings every question is sent with."""
        self.client = client
        self.redactor = redactor
        self.state = state
        self.command = command
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.timeout = timeout
        self.concurrency = concurrency
        self.options = options
        self.bar: Any = None  # a tqdm bar, when the subclass shows one: messages are written through it
        self.give_up_streak = 0
        self.give_up_limit = max(MIN_GIVE_UP_STREAK, 2 * concurrency)

    async def handle(self, item: Any) -> None:
        """Ask about one item and record the outcome (the subclass's part)."""
        raise NotImplementedError

    async def ask(self, messages: list[dict[str, str]]) -> tuple[Optional[str], Optional[str]] | Failed | None:
        """One question: ``(content, finish_reason)``, a :class:`Failed`, or None when the run was stopped first."""
        while True:
            if self.state.aborted:
                return None
            json_mode = self.json_mode
            try:
                return await chat_completion(
                    self.client, self.redactor, model=self.model, messages=messages, temperature=self.temperature,
                    max_tokens=self.max_tokens, json_mode=json_mode,
                )  # fmt: skip
            except openai.APIError as exc:
                failure = classify_error(exc, self.timeout, self.redactor)
                # Checked against this request's json_mode, not the shared flag: with N requests in flight, N may
                # come back refused, and each must retry even though the first one already switched it off.
                if json_mode and rejects_json_mode(failure):
                    self.disable_json_mode(failure.reason)
                    continue
                attempts = attempts_of(exc)
                if failure.status in FATAL_STATUSES:
                    self.abort(f"{failure.reason} (check {self.options} and the API key)")
                    return Failed(failure.reason, attempts)
                if failure.server_trouble and attempts > 1:
                    why = f"gave up after {attempts} attempts; last error: {failure.reason}"
                    return Failed(why, attempts, server_trouble=True)
                return Failed(failure.reason, attempts, server_trouble=failure.server_trouble)
            except BadResponseError as exc:
                return Failed(str(exc), 1, server_trouble=True)

    def disable_json_mode(self, reason: str) -> None:
        """The server refused ``response_format``: carry on without it for the rest of the run (the prompt still asks
        for JSON, and the parsers cope with fences and chatter)."""
        if not self.json_mode:
            return  # another request in flight already switched it off (and said so)
        self.json_mode = False
        self.log(f"{self.command}: the server rejected JSON mode ({reason}); continuing without response_format")

    def abort(self, reason: str) -> None:
        if not self.state.aborted:
            self.state.aborted = reason
            self.log(f"{self.command}: stopping: {reason}")

    def stop_on_signal(self, signum: int) -> None:
        """SIGTERM / SIGINT: record why; :func:`run_workers` cancels the workers (in-flight requests are dropped)."""
        if self.state.signal is None:
            self.state.signal = signum
            self.abort(f"interrupted by {signal.Signals(signum).name}")

    def note_success(self) -> None:
        self.give_up_streak = 0

    def note_give_up(self, failure: Failed) -> None:
        """Stop the run after a streak of questions that ran out of retries (see :data:`MIN_GIVE_UP_STREAK`)."""
        if not failure.server_trouble:
            return  # a bad reply or a 4xx says nothing about the server's health
        self.give_up_streak += 1
        if self.give_up_streak >= self.give_up_limit:
            streak = self.give_up_streak
            self.abort(f"{streak} requests in a row ran out of retries; the server looks down or over quota")

    def log(self, message: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)


async def _worker(run: TeacherRun, queue: Iterator[Any]) -> None:
    # All workers pull from one iterator; the loop is single-threaded, so next() is never called concurrently.
    for item in queue:
        if run.state.aborted:
            return
        await run.handle(item)


@contextlib.contextmanager
def _on_stop_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """Call ``handler(signum)`` on SIGTERM / SIGINT inside the block (main thread only; elsewhere signals keep their
    default handling)."""
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, handler, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals (Windows)
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def run_workers(run: TeacherRun, items: Iterable[Any]) -> None:
    """``run.concurrency`` workers over one queue, until done, a fatal error or a stop signal. If one worker dies of
    a bug, the others are stopped before the caller closes its files."""
    pending = list(items)
    queue = iter(pending)
    workers = [asyncio.ensure_future(_worker(run, queue)) for _ in range(min(run.concurrency, len(pending)))]

    def stop(signum: int) -> None:
        run.stop_on_signal(signum)
        for worker in workers:  # drop the requests in flight: nothing was written for them, so a rerun redoes them
            worker.cancel()

    try:
        with _on_stop_signals(stop):
            results = await asyncio.gather(*workers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
