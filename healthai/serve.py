"""``python -m healthai serve``: the tuned model behind HTTP, on LitServe, decoding exactly as ``predict`` does.

One LitServe worker holds one copy of the model. Its requests come from two routes that share one queue, so requests
from both are batched together (``max_batch_size`` / ``batch_timeout``):

* ``POST /predict`` ``{"feature_content": "...", "id": ...}`` → ``{"diseases", "reason", "parse_status"}`` (+ ``id``),
  ``parse_status`` as predict writes it (``ok`` | ``repaired`` | ``truncated`` | ``failed``);
* ``POST /v1/chat/completions``: LitServe's OpenAI spec, so any OpenAI client (``healthai label --base_url``) works;
  the case record is read from the last user message (see :func:`case_from_messages`). The reply's ``usage`` counts
  the prompt's and the answer's real tokens, and ``finish_reason`` is ``length`` where the token budget
  (``--generation.max_new_tokens``) ended the answer, ``stop`` otherwise (see :func:`finish_reason`), streamed or not;
* ``GET /``: a small page for a person; ``GET /health``: 200 once the model is loaded.

Why one LitAPI with an extended spec rather than two LitAPIs (``api_path="/predict"`` + an OpenAI one): LitServe gives
every LitAPI its own worker process, i.e. a second copy of the 7B model, and batches each route on its own.

The batch is built and decoded by the predict path itself: the prompt saved in the adapter folder, tokenised and
trimmed by :func:`healthai.encoding.fit_case_text`, left-padded by :class:`healthai.batching.PromptCollator`, generated
and parsed by :meth:`healthai.model.DiagnosisLoRA.generate_answers` with its :class:`GenerationSettings`.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal, Optional

from healthai.errors import require_extra

# litserve (and the fastapi it brings) is the serve extra: without it this command alone cannot run.
require_extra("litserve", extra="serve", needed_by="healthai serve")

import litserve as ls
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from litserve.loops import BatchedStreamingLoop
from litserve.specs.openai import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage
from litserve.specs.openai import OpenAISpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from healthai import accesslog
from healthai.decoding import ParsedAnswer
from healthai.generation import GenerationSettings
from healthai.errors import ConfigError, NonNegativeFloat, PositiveInt, UnprivilegedPort, check_declared
from healthai.errors import check_model_source
from healthai.prompts import DEFAULT_USER_TEMPLATE, PromptStyle
from healthai.records import check_record
from healthai.serve_checks import check_device, check_port

log = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
OPEN_PATHS = frozenset({"/", "/health"})
"""Routes served without the API key: the page (it asks for the key itself) and the load balancer's health check."""

KEY_HELP = "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')"

FinishReason = Literal["stop", "length"]
"""OpenAI's ``finish_reason`` of a chat answer: ``length`` where the token budget ended it, ``stop`` otherwise."""


# ---------------------------------------------------------------------------------------------------------------------
# The key and malformed bodies: one rule for every route, LitServe's and FastAPI's own (/docs, /openapi.json) alike
# ---------------------------------------------------------------------------------------------------------------------


def key_matches(headers: Any, api_key: str) -> bool:
    """The key from ``Authorization: Bearer`` (OpenAI clients) or ``X-API-Key``, compared in constant time."""
    given = headers.get("x-api-key") or ""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer":
        given = token.strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


class ApiKeyMiddleware:
    """Answers 401 to any HTTP request without the key except on :data:`OPEN_PATHS`. A middleware rather than
    LitServe's ``authorize`` hook, which guards only LitServe's own routes (FastAPI's /docs and /openapi.json, and
    any route added later, would be open). The key is never logged."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            from starlette.datastructures import Headers

            if not key_matches(Headers(scope=scope), self.api_key):
                response = JSONResponse({"detail": KEY_HELP}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's answer to a body that fails the OpenAI request model, as ``/predict`` answers: 400 and one line for
    a body that is not a JSON object, 422 and one line naming the fields otherwise (not pydantic's list)."""
    errors = exc.errors() or [{"loc": ("body",), "msg": "invalid request", "type": ""}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return JSONResponse({"detail": f"the body is not valid JSON: {detail}"}, status_code=400)
    if all(str(part) == "body" for part in first.get("loc", ())):
        return JSONResponse({"detail": f"the body must be a JSON object: {first.get('msg')}"}, status_code=400)
    fields = "; ".join(
        f"field {'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')!r}: {e.get('msg')}" for e in errors
    )
    return JSONResponse({"detail": fields}, status_code=422)


# ---------------------------------------------------------------------------------------------------------------------
# Requests → case text (run in the HTTP processes, so a bad request never reaches the model's queue)
# ---------------------------------------------------------------------------------------------------------------------


def check_case(text: Any, max_chars: int, field: str = "feature_content") -> str:
    """``text`` if it is a usable case record, else an HTTPException: 422 (wrong type, empty), 413 (too long)."""
    problem = check_record({"id": "", "feature_content": text}, labelled=False)  # the rules every stage shares
    if problem is not None:
        raise HTTPException(422, problem.replace("'feature_content'", repr(field)))
    if len(text) > max_chars:
        raise HTTPException(413, f"field {field!r} has {len(text)} characters, over the limit of {max_chars}")
    return text


def _refuse_lone_surrogates(obj: Any) -> None:
    """400 for a string holding a lone surrogate (``"\\ud800"``): JSON lets it through, UTF-8 cannot encode it, so
    it would fail later as a 500 (#29 item 10). Only the top level and its direct values are strings we use."""
    values = obj.values() if isinstance(obj, dict) else [obj]
    for value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise HTTPException(400, f"the body is not valid JSON text: lone surrogate {e.object[e.start]!r} "
                                         f"at character {e.start}") from None  # fmt: skip


def predict_payload(body: bytes, max_chars: int) -> dict[str, Any]:
    """The validated ``/predict`` body: ``{"feature_content": str}`` plus ``id`` if given (int or string)."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # deeply nested arrays/objects under the size limit (#29 item 10): the client's mistake
        raise HTTPException(400, "the body is not valid JSON: nested too deeply") from None
    _refuse_lone_surrogates(obj)
    if not isinstance(obj, dict):
        got = type(obj).__name__
        raise HTTPException(400, f'the body must be a JSON object {{"feature_content": "..."}}, got {got}')
    if "feature_content" not in obj:
        raise HTTPException(422, "missing field 'feature_content'")
    payload = {"feature_content": check_case(obj["feature_content"], max_chars)}
    if "id" in obj:  # optional here; when given, the id rule every stage shares
        problem = check_record({"id": obj["id"], **payload}, labelled=False)
        if problem is not None:
            raise HTTPException(422, problem)
        payload["id"] = obj["id"]
    return payload


def _message_text(message: ChatMessage) -> str:
    if isinstance(message.content, list):  # OpenAI's content parts: keep the text ones
        return "".join(part.text for part in message.content if getattr(part, "text", None) is not None)
    return message.content or ""


def case_from_messages(messages: list[ChatMessage], prompt: PromptStyle) -> str:
    """The case record in a chat request: the last user message, unwrapped from the user template.

    Clients such as ``healthai label`` send this project's whole chat prompt (system message + the user template around
    the case). The server renders its own prompt (the adapter's) around the case text in any case, so the template is
    taken off again: first the served prompt's, else the default one (``label`` without ``--prompt_dir``). A message
    matching neither is taken as the case text itself. Other messages (system, earlier turns) are not used.
    """
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise HTTPException(422, "messages hold no user message with the case record")
    text = _message_text(users[-1])
    for template in (prompt.user_template, DEFAULT_USER_TEMPLATE):
        head, _, tail = template.partition("{case}")
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
            return text[len(head) : len(text) - len(tail)]
    return text


# ---------------------------------------------------------------------------------------------------------------------
# The spec: OpenAI's chat route plus /predict, both feeding the one model queue
# ---------------------------------------------------------------------------------------------------------------------


class DiagnosisSpec(OpenAISpec):
    """LitServe's OpenAI spec, with requests checked before they are queued and a ``/predict`` route beside it."""

    def __init__(self, prompt: PromptStyle, max_chars: int):
        super().__init__()
        self.prompt = prompt
        self.max_chars = max_chars

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        super().pre_setup(lit_api)  # registers /v1/chat/completions
        self.add_endpoint(PREDICT_PATH, self.predict_endpoint, ["POST"])

    def populate_context(self, context: dict, request: Any) -> None:
        if isinstance(request, dict):  # from /predict
            context["route"] = PREDICT_PATH
            return
        super().populate_context(context, request)
        context["route"] = self.api_path

    async def chat_completion(self, request: ChatCompletionRequest, background_tasks: BackgroundTasks):
        check_case(case_from_messages(request.messages, self.prompt), self.max_chars, field="the user message")
        return await super().chat_completion(request, background_tasks)

    # LitServe (0.2.19) takes ``usage`` from the token counts in the items the model worker sends (:func:`encode_answer`
    # sets them) but writes ``finish_reason: "stop"`` for every choice. The two overrides below run its code as it is
    # and only put each answer's own reason (carried in its item too) in place of that "stop".

    async def non_streaming_completion(self, request: ChatCompletionRequest, generator_list: list[AsyncIterator]
                                       ) -> ChatCompletionResponse:  # fmt: skip
        reasons: list[FinishReason] = ["stop"] * len(generator_list)
        pipes = [_noting_finish_reason(pipe, reasons, i) for i, pipe in enumerate(generator_list)]
        response = await super().non_streaming_completion(request, pipes)
        for choice in response.choices:
            choice.finish_reason = reasons[choice.index]
        return response

    async def streaming_completion(self, request: ChatCompletionRequest, pipe_responses: list[AsyncIterator]
                                   ) -> AsyncIterator[str]:  # fmt: skip
        reasons: list[FinishReason] = ["stop"] * len(pipe_responses)
        pipes = [_noting_finish_reason(pipe, reasons, i) for i, pipe in enumerate(pipe_responses)]
        async for event in super().streaming_completion(request, pipes):
            yield _with_finish_reasons(event, reasons)

    async def predict_endpoint(self, request: Request) -> JSONResponse:
        """``POST /predict``: queue one record and wait for its row (LitServe's worker sends it as one stream item)."""
        payload = predict_payload(await request.body(), self.max_chars)
        rid = payload.pop("id", None)
        uid, items, event = uuid.uuid4(), deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=items)
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), payload))
            row = None
            async for data, status in self.data_streamer(items, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    if isinstance(data, HTTPException):  # e.g. 504: waited in the queue past --timeout
                        raise data
                    raise HTTPException(500, "the model failed on this request; see the server log")
                row = json.loads(data)
        finally:
            self.response_buffer.pop(uid, None)
        if row is None:
            raise HTTPException(500, "the model returned nothing for this request")
        return JSONResponse(row if rid is None else {"id": rid, **row})


async def _noting_finish_reason(pipe: AsyncIterator, reasons: list[FinishReason], index: int) -> AsyncIterator:
    """``pipe`` (one choice's ``(data, status)`` items from the model worker) passed through unchanged, noting in
    ``reasons[index]`` the ``finish_reason`` its answer carries."""
    async for data, status in pipe:
        if status == LitAPIStatus.OK:
            reasons[index] = json.loads(data).get("finish_reason", "stop")
        yield data, status


def _with_finish_reasons(event: str, reasons: list[FinishReason]) -> str:
    """A server-sent event of LitServe's chat stream; its closing chunk (the only one with a ``finish_reason``, which
    it sets to ``stop``) rewritten with each choice's own reason. Content chunks, errors and ``[DONE]`` pass as they
    are."""
    try:
        chunk = ChatCompletionChunk.model_validate_json(event.removeprefix("data: "))
    except ValueError:  # pydantic's ValidationError: "[DONE]" or an error event
        return event
    if not any(choice.finish_reason for choice in chunk.choices):
        return event
    for choice in chunk.choices:
        choice.finish_reason = reasons[choice.index]
    return f"data: {chunk.model_dump_json(by_alias=True)}\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# The model worker
# ---------------------------------------------------------------------------------------------------------------------


class DiagnosisAPI(ls.LitAPI):
    """Loads :class:`~healthai.model.DiagnosisLoRA` once and answers batches of case texts with the predict path."""

    def __init__(
        self,
        model_name_or_path: str,
        adapter_path: Optional[str],
        dtype: str,
        attn_implementation: str,
        generation: GenerationSettings,
        prompt: PromptStyle,
        max_length: int,
        max_chars: int,
        max_batch_size: int,
        batch_timeout: float,
        allow_base_mismatch: bool = False,
        merge_for_inference: bool = True,
    ):
        # The batched loop also for max_batch_size 1, so predict always sees a list of records.
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         spec=DiagnosisSpec(prompt, max_chars), loop=BatchedStreamingLoop())  # fmt: skip
        self.model_args = dict(model_name_or_path=model_name_or_path, adapter_path=adapter_path, dtype=dtype,
                               attn_implementation=attn_implementation, generation=generation,
                               allow_base_mismatch=allow_base_mismatch,
                               merge_for_inference=merge_for_inference)  # fmt: skip
        self.prompt = prompt
        self.max_length = max_length
        self.module = None

    def authorize(self, request: Request) -> None:
        """LitServe's per-route hook, left empty: :class:`ApiKeyMiddleware` checks the key on every route. (Without
        this hook LitServe would apply its own ``LIT_SERVER_API_KEY`` check, a second key.)"""

    def setup(self, device: str) -> None:
        from healthai import quiet

        quiet.install_unless_verbose()  # LitServe's worker is a spawned process: healthai.__main__ never ran in it
        from healthai.model import DiagnosisLoRA

        module = DiagnosisLoRA(gradient_checkpointing=False, **self.model_args)
        module.configure_model()
        self.module = module.to(device).eval()
        self.module.merge_lora_for_inference()  # the server only generates: the adapter's weights stay folded in
        self.module.constraint()  # compile the answer schema now, not during the first request

    def decode_request(self, request: Any, context: dict) -> str:
        if isinstance(request, dict):
            return request["feature_content"]
        return case_from_messages(request.messages, self.prompt)

    def batch(self, texts: list[str]) -> dict[str, Any]:
        """Tokenise and left-pad exactly as predict's data module does (trimming over-long case texts)."""
        from healthai.batching import PromptCollator
        from healthai.encoding import fit_case_text

        tokenizer = self.module.tokenizer
        examples = []
        for order, text in enumerate(texts):
            ids, _ = fit_case_text(tokenizer, self.prompt, text, self.max_length)
            examples.append({"input_ids": ids, "prompt_len": len(ids), "record": None, "order": order})
        return PromptCollator(tokenizer.pad_token_id)(examples)

    def predict(self, batch: dict[str, Any]):
        device = self.module.device
        yield self.module.generate_answers(batch["input_ids"].to(device), batch["attention_mask"].to(device))

    def encode_response(self, outputs, context: list[dict]):
        budget = self.module.generation.budget  # resolved: the adapter's where --generation.max_new_tokens is null
        for answers in outputs:
            yield [encode_answer(answer, ctx["route"], budget) for answer, ctx in zip(answers, context)]


def finish_reason(answer: ParsedAnswer, budget: int) -> FinishReason:
    """``length`` where the token budget, not the model, ended ``answer``; else ``stop``. Read off the parse, never off
    the text's length: ``truncated`` is the constrained decoder's own report that the budget closed the answer; an
    answer that used the whole budget and is still not a strict, complete answer (``repaired`` or ``failed``:
    unconstrained decoding cut mid-answer, or a closed answer whose fields could not be read) was cut by it too. An
    answer that is strict JSON when it reaches the budget (``ok``) ended by itself. (The one case the parse cannot tell
    apart: an unconstrained reply that is not strict JSON and whose end-of-turn was exactly its budget-th token; it is
    reported as ``length``.)"""
    if answer.status == "truncated":
        return "length"
    used_budget = answer.completion_tokens is not None and answer.completion_tokens >= budget
    return "length" if answer.status in ("repaired", "failed") and used_budget else "stop"


def encode_answer(answer: ParsedAnswer, route: str, budget: int) -> dict[str, Any]:
    """A ``/predict`` row (as predict writes it: ``raw_output`` only when parsing failed), or a chat message with its
    token counts (LitServe sums them into ``usage``) and :func:`finish_reason` (for :class:`DiagnosisSpec`)."""
    if route == PREDICT_PATH:
        return answer.row_fields()
    prompt_tokens, completion_tokens = answer.prompt_tokens or 0, answer.completion_tokens or 0
    return {"role": "assistant", "content": answer.raw, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "finish_reason": finish_reason(answer, budget)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------

PAGE_FILE = "static/serve.html"
"""The page (package data); ``__KEY_FIELD__`` in it becomes :data:`KEY_FIELD` when the server requires a key."""

KEY_FIELD = '<input id="key" type="password" placeholder="API key" autocomplete="off"> '


def page_html(require_key: bool) -> str:
    page = importlib.resources.files("healthai").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    return page.replace("__KEY_FIELD__", KEY_FIELD if require_key else "")


def _serve_page_at_root(server: ls.LitServer, html: str) -> None:
    """Put the page at ``/`` in place of LitServe's plain-text "litserve running" route (registered first, so it
    would otherwise shadow ours)."""
    server.app.router.routes[:] = [
        r for r in server.app.router.routes
        if not (getattr(r, "path", None) == "/" and "GET" in (getattr(r, "methods", None) or ()))
    ]

    async def index() -> HTMLResponse:
        return HTMLResponse(html)

    server.app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def _stop_on_sigterm() -> None:
    """SIGTERM → the KeyboardInterrupt path of ``LitServer.run``, which stops the HTTP processes (letting requests in
    flight finish) and the model worker. Python's default would kill this process alone and orphan its children."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked child before it installed its own handler: plain SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("serve: SIGTERM received, shutting down")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_startup(
    model_name_or_path: str,
    adapter_path: Optional[str],
    generation: GenerationSettings,
    max_length: int,
    allow_base_mismatch: bool,
) -> PromptStyle:
    """What the model worker would fail on, checked in this process first, each as one line (a
    :class:`~healthai.errors.UserError`): in a worker it ends as LitServe's "One or more workers failed to start".
    Returns the prompt to serve: the adapter's (a folder's prompt.json or a fit ``.ckpt``'s record), else the default
    (with a warning when there is an adapter: :class:`~healthai.adapter.Adapter`'s rule, as in predict and export).
    Nothing heavy is loaded: the base's folder, the adapter and the tokenizer only."""
    from transformers import AutoTokenizer

    from healthai.adapter import Adapter, resolve_base
    from healthai.encoding import prompt_ids
    from healthai.generation import check_answer_budget, resolve_budget

    check_model_source(model_name_or_path, "--model_name_or_path")
    if adapter_path is None:
        prompt, base = PromptStyle(), resolve_base(model_name_or_path, "--model_name_or_path")
        source = base
    else:
        adapter = Adapter.open(adapter_path, "--adapter_path")
        prompt = adapter.prompt  # the rule every command follows, predict's data module included
        base = adapter.resolve_base(model_name_or_path, "--model_name_or_path")
        adapter.check_base(base, allow_base_mismatch, "--allow_base_mismatch")
        source = adapter.tokenizer_source(base)
    tokenizer = AutoTokenizer.from_pretrained(source)
    empty = len(prompt_ids(tokenizer, prompt, ""))
    if empty >= max_length:
        raise ConfigError(f"--max_length {max_length} is too small: the prompt without any case text is {empty} "
                          "tokens; raise it")  # fmt: skip
    recorded = adapter.budget if adapter_path is not None else None
    warning = check_answer_budget(tokenizer, resolve_budget(generation, recorded), recorded,
                                  "--generation.max_new_tokens")  # fmt: skip
    if warning is not None:
        print(f"serve: warning: {warning}", file=sys.stderr, flush=True)
    return prompt


def serve(
    model_name_or_path: str = "Qwen/Qwen2.5-7B-Instruct",
    adapter_path: Optional[str] = None,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    host: str = "127.0.0.1",
    port: UnprivilegedPort = 8000,
    max_batch_size: PositiveInt = 8,
    batch_timeout: NonNegativeFloat = 0.05,
    max_length: PositiveInt = 2048,
    max_chars: PositiveInt = 20000,
    generation: GenerationSettings = GenerationSettings(),
    api_key_env: str = "HEALTHAI_SERVE_API_KEY",
    insecure_no_api_key: bool = False,
    allow_base_mismatch: bool = False,
    merge_for_inference: bool = True,
    timeout: NonNegativeFloat = 300.0,
    attn_implementation: str = "sdpa",
    log_level: Literal["debug", "info", "warning", "error"] = "info",
) -> None:
    """Serve the model over HTTP (LitServe): POST /predict, OpenAI POST /v1/chat/completions, a page at GET /.

    Decodes exactly as `predict` does (same prompt, constrained decoding and parser); GET /health answers 200 once the
    model is loaded; SIGTERM or Ctrl+C stops every process of the server. Every start-up error (a missing model or
    adapter, an option that cannot work, a non-loopback host without a key) is one line and exit status 2, before any
    model worker starts.

    Args:
        model_name_or_path: Base model: a hub id or a local folder (as in predict's --model.model_name_or_path).
        adapter_path: The adapter/ folder written by fit, or a fit .ckpt (as predict takes); its saved prompt (and a
            folder's tokenizer) are used. null = zero-shot base model with the default prompt.
        dtype: Dtype of the base weights: bfloat16 on GPU, float32 on CPU.
        device: Where the model runs: auto (GPU if there is one), cpu or cuda (one GPU, one model copy).
        host: Interface to listen on. 127.0.0.1 (or ::1, localhost) = this machine only. Any other (0.0.0.0, ::, an
            address of this machine) is reachable from the network and needs the API key (see api_key_env), or
            --insecure_no_api_key true.
        port: TCP port.
        max_batch_size: Most requests decoded together in one batch (dynamic batching).
        batch_timeout: Seconds the worker waits for more requests to fill a batch once one has arrived.
        max_length: Longest prompt in tokens; longer case texts have their tail trimmed, as in predict.
        max_chars: Longest accepted case text in characters; longer requests get 413.
        generation: Decoding settings (as predict's --model.generation.*): max_new_tokens (the answer's token
            budget; null: the adapter's), constrained, sampling. Client-sent sampling settings (temperature,
            max_tokens) are ignored: the server decodes as predict does.
        api_key_env: Name of the environment variable holding the API key. When it is set, every route except / and
            /health (the docs and /openapi.json included) needs 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.
            The key is never a flag and never logged.
        insecure_no_api_key: Serve a non-loopback host without an API key: anyone who can reach the port can use
            the model. Off by default; a warning is printed when on.
        allow_base_mismatch: Apply adapter_path even to a base whose fingerprint differs from the one it was trained
            on (as predict's --model.allow_base_mismatch); by default that is refused.
        merge_for_inference: Fold the LoRA weights into the base weights once loaded (as predict's
            --model.merge_for_inference: faster decoding, float32 answers equal); false keeps the LoRA layers.
        timeout: Seconds a request may wait in the queue before it gets 504.
        attn_implementation: Attention kernel passed to transformers (sdpa, flash_attention_2, eager).
        log_level: Server log level.
    """
    check_declared(serve, locals(), "--")  # the CLI checks these too; the port's range is LitServe's
    api_key = os.environ.get(api_key_env, "").strip() or None
    if api_key is None and not is_loopback(host) and not insecure_no_api_key:
        raise ConfigError(f"--host {host} is reachable from the network and no API key is set: put one in "
                          f"${api_key_env}, or pass --insecure_no_api_key true to serve without one")  # fmt: skip
    check_device(device)  # before the address is announced: it was printed, then a traceback (#29 item 14)
    check_port(host, port)
    prompt = check_startup(model_name_or_path, adapter_path, generation, max_length, allow_base_mismatch)
    api = DiagnosisAPI(
        model_name_or_path, adapter_path, dtype, attn_implementation, generation, prompt, max_length, max_chars,
        max_batch_size, batch_timeout, allow_base_mismatch, merge_for_inference,
    )  # fmt: skip
    server = ls.LitServer(
        api, accelerator="cuda" if device == "cuda" else device, devices=1, timeout=timeout,
        # Bytes: a character is up to 3 UTF-8 bytes, or 6 as a JSON \\u escape; chat requests carry the prompt too.
        max_payload_size=6 * max_chars + 65536,
        model_metadata={"model_name_or_path": model_name_or_path, "adapter_path": adapter_path},
        middlewares=[(ApiKeyMiddleware, {"api_key": api_key})] if api_key else None,
    )  # fmt: skip
    server.app.add_exception_handler(RequestValidationError, one_line_validation_error)
    _serve_page_at_root(server, page_html(api_key is not None))
    if api_key is None and not is_loopback(host):
        print(f"serve: WARNING: --insecure_no_api_key: {host}:{port} serves the model to anyone who can reach it, "
              "without a key", file=sys.stderr, flush=True)  # fmt: skip
    print(f"serve: http://{host}:{port}/  (POST {PREDICT_PATH}, POST /v1/chat/completions, GET /health); "
          f"API key {'required, from $' + api_key_env if api_key else 'off'}", flush=True)  # fmt: skip
    _stop_on_sigterm()
    accesslog.install()  # no ?api_key=KEY written verbatim (#29 item 2)
    server.run(host=host, port=port, log_level=log_level, generate_client_file=False)
