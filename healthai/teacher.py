"""The teacher client of ``healthai label``: an ``openai.AsyncOpenAI`` for any OpenAI-compatible chat endpoint, and what
the client itself does not do.

The client retries 408, 409, 429, 5xx, timeouts and dropped connections with exponential backoff and jitter, honouring
``Retry-After``. On top of it, this module

* shares a 429's pause between every request of the run (:class:`PauseGate`, hooked into the client's HTTP requests:
  rate limits belong to the key, not to one record);
* classifies the errors the client gave up on (:func:`classify_error`): fatal for the run (:data:`FATAL_STATUSES`),
  the server's trouble (out of retries) or the record's, and a server refusing JSON mode (:func:`rejects_json_mode`);
* sends one chat completion and checks that what came back is one (:func:`chat_completion`);
* reads the key from the environment (:func:`api_key_from_env`), never from an argument.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import openai
from openai.types.chat import ChatCompletion

from healthai.errors import ConfigError, UserError
from healthai.redact import MIN_SECRET_CHARS, Redactor

API_KEY_ENV_VARS = ("HEALTHAI_API_KEY", "OPENAI_API_KEY")
"""Where the key is looked for, in this order. It is never a command-line flag."""

FATAL_STATUSES = frozenset({401, 403, 404})
"""Statuses that mean the run is misconfigured (key, access, model name), not that one record is bad."""

DEFAULT_PAUSE_S = 1.0
"""How long a 429 without a readable ``Retry-After`` pauses every worker (the client backs off on its own besides)."""

MAX_PAUSE_S = 120.0
"""Upper bound on the shared pause: the client itself does not honour a ``Retry-After`` above two minutes."""

MAX_MESSAGE_CHARS = 500
"""Server error bodies are cut to this length in failure reasons."""


class MissingApiKeyError(UserError):
    """Neither key variable is set."""


class BadResponseError(Exception):
    """The server answered 200 with something that is not a chat completion (an HTML page, broken JSON): most likely
    a wrong ``--base_url`` or a gateway in the way, so the record fails at once and counts towards stopping the run."""


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


def checked_api_key(api_key: Optional[str] = None) -> str:
    """``api_key`` (default: :func:`api_key_from_env`) once it is safe to send and to scrub: every command that talks
    to a teacher (``label``, ``evaluate``'s judge) takes its key through here, so none can send a key it cannot keep
    out of its messages and files."""
    api_key = api_key if api_key is not None else api_key_from_env()
    if len(api_key) < MIN_SECRET_CHARS:  # too short to scrub without garbling every message: never sent (#29 item 2)
        raise MissingApiKeyError(
            f"the API key has {len(api_key)} characters, under {MIN_SECRET_CHARS}: too short to keep out of messages "
            f"and files safely; for a local server that needs none, use a dummy such as 'no-key-needed'"
        )
    if not api_key.isascii():  # an HTTP header cannot carry it: httpx raised a traceback on the first request
        raise MissingApiKeyError("the API key holds non-ASCII characters (a paste gone wrong?): an HTTP header cannot "
                                 "carry it; set the key exactly as the provider gave it")  # fmt: skip
    return api_key


def check_base_url(option: str, url: str) -> None:
    """Refuse a base URL without a scheme (:class:`ConfigError` naming ``option``): the client retried each request
    for seconds before failing (#29 item 12)."""
    if not url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"{option} {url}: not an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)")


@dataclass(frozen=True)
class ApiFailure:
    """One request that failed for good (the client's retries included), classified."""

    reason: str
    status: Optional[int] = None
    server_trouble: bool = False
    """The server's health, not the record, is to blame: out of retries (429, 5xx, timeouts, connections)."""


def classify_error(exc: openai.APIError, timeout: float, redactor: Redactor) -> ApiFailure:
    """Describe a request error the client gave up on (or does not retry: any other 4xx or API error); the server's
    text is scrubbed of the key before it is cut to :data:`MAX_MESSAGE_CHARS`."""
    if isinstance(exc, openai.APITimeoutError):
        return ApiFailure(f"timed out after {timeout:g}s", server_trouble=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        return ApiFailure(f"connection error ({detail})", server_trouble=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        # The client prefixes "Error code: 429 - "; the status is in our own prefix already.
        message = redactor.cut(str(exc.message).removeprefix(f"Error code: {status} - "), MAX_MESSAGE_CHARS)
        retried = status in (408, 409, 429) or status >= 500  # the statuses the client retries
        return ApiFailure(f"HTTP {status}: {message}", status=status, server_trouble=retried)
    # APIResponseValidationError and friends: the server answered, but not with a chat completion.
    return ApiFailure(f"{type(exc).__name__}: {redactor.cut(str(exc), MAX_MESSAGE_CHARS)}")


def attempts_of(exc: openai.APIError) -> int:
    """Requests the client sent for the call that raised ``exc``: it numbers its retries in a header of each."""
    request = getattr(exc, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, ValueError):
        return 1


class PauseGate:
    """A shared "no requests before" time: a 429 pauses every worker, not just the one that was told off."""

    def __init__(self) -> None:
        self._until = 0.0

    def pause(self, seconds: float) -> None:
        self._until = max(self._until, time.monotonic() + seconds)

    async def wait(self) -> None:
        while (remaining := self._until - time.monotonic()) > 0:
            await asyncio.sleep(remaining)

    # httpx event hooks: every request the client sends, its own retries included, passes through these.

    async def hold_request(self, request: Any) -> None:
        await self.wait()

    async def note_response(self, response: Any) -> None:
        if response.status_code == 429:
            self.pause(retry_after_s(response.headers))


def retry_after_s(headers: Any) -> float:
    """The pause a 429 asks for (``retry-after-ms`` or ``Retry-After`` in seconds; the HTTP-date form, which the
    client's own retry honours, pauses the others :data:`DEFAULT_PAUSE_S`)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return min(max(float(headers[name]) * scale, 0.0), MAX_PAUSE_S)
        except (KeyError, TypeError, ValueError):
            continue
    return DEFAULT_PAUSE_S


def make_client(
    base_url: str, api_key: str, *, timeout: float, max_retries: int, gate: PauseGate
) -> openai.AsyncOpenAI:
    """The async client: its retries (``max_retries`` per request, exponential backoff with jitter, honouring
    ``Retry-After``) and ``timeout`` (seconds per request), plus the shared pause hooked into every request."""
    http_client = openai.DefaultAsyncHttpxClient(
        event_hooks={"request": [gate.hold_request], "response": [gate.note_response]}
    )
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
        http_client=http_client,
    )  # fmt: skip


def rejects_json_mode(failure: ApiFailure) -> bool:
    """A 400 that names response_format / JSON mode: the server does not support it (older vLLM, some gateways)."""
    text = failure.reason.lower()
    return failure.status == 400 and ("response_format" in text or "json_object" in text)


async def chat_completion(
    client: openai.AsyncOpenAI, redactor: Redactor, *, model: str, messages: list[dict[str, str]],
    temperature: float, max_tokens: int, json_mode: bool,
) -> tuple[Optional[str], Optional[str]]:
    """One chat completion (the client retries what is worth retrying): ``(content, finish_reason)``. Raises
    :class:`openai.APIError` when the client gave up, :class:`BadResponseError` when the answer is not a completion."""
    kwargs: dict[str, Any] = {}
    if json_mode:
        kwargs["response_format"] = {"type": "json_object"}
    try:
        response = await client.chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=max_tokens, **kwargs,
        )  # fmt: skip
    except json.JSONDecodeError as e:  # the client parses a JSON content-type body without wrapping errors
        raise BadResponseError(f"the server's answer is not valid JSON ({e.msg}); check --base_url") from None
    if not isinstance(response, ChatCompletion):  # a non-JSON body (e.g. an HTML page) comes back as a str
        preview = redactor.cut(str(response), 80)
        raise BadResponseError(f"the server did not answer with a chat completion ({preview!r}); check --base_url")
    if not response.choices:
        return None, None
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason
