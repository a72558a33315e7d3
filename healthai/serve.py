"""``python -m healthai serve``: the tuned model behind HTTP, on LitServe, decoding exactly as ``predict`` does.

One LitServe worker holds one copy of the model. Its requests come from two routes that share one queue, so requests
from both are batched together (``max_batch_size`` / ``batch_timeout``):

* ``POST /predict`` ``{"feature_content": "...", "id": ...}`` → ``{"diseases", "reason", "parse_status"}`` (+ ``id``),
  ``parse_status`` as predict writes it (``ok`` | ``repaired`` | ``truncated`` | ``failed``);
* ``POST /v1/chat/completions``: LitServe's OpenAI spec, so any OpenAI client (``healthai label --base_url``) works;
  the case record is read from the last user message (see :func:`case_from_messages`);
* ``GET /``: a small page for a person; ``GET /health``: 200 once the model is loaded.

Why one LitAPI with an extended spec rather than two LitAPIs (``api_path="/predict"`` + an OpenAI one): LitServe gives
every LitAPI its own worker process, i.e. a second copy of the 7B model, and batches each route on its own.

The batch is built and decoded by the predict path itself: the prompt saved in the adapter folder, tokenised and
trimmed by :func:`healthai.data.fit_case_text`, left-padded by :class:`healthai.data.PromptCollator`, generated and
parsed by :meth:`healthai.model.DiagnosisLoRA.generate_answers` with its :class:`GenerationSettings`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
import uuid
from collections import deque
from typing import Any, Literal, Optional

import litserve as ls
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from litserve.loops import BatchedStreamingLoop
from litserve.specs.openai import ChatCompletionRequest, ChatMessage, OpenAISpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from healthai.decoding import GenerationSettings, ParsedAnswer
from healthai.prompts import DEFAULT_USER_TEMPLATE, PromptStyle
from healthai.records import check_record

log = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
OPEN_PATHS = frozenset({"/", "/health"})
"""Routes served without the API key: the page (it asks for the key itself) and the load balancer's health check."""


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


def predict_payload(body: bytes, max_chars: int) -> dict[str, Any]:
    """The validated ``/predict`` body: ``{"feature_content": str}`` plus ``id`` if given (int or string)."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"the body is not valid JSON: {e}") from None
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
        api_key: Optional[str] = None,
    ):
        # The batched loop also for max_batch_size 1, so predict always sees a list of records.
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         spec=DiagnosisSpec(prompt, max_chars), loop=BatchedStreamingLoop())  # fmt: skip
        self.model_args = dict(model_name_or_path=model_name_or_path, adapter_path=adapter_path, dtype=dtype,
                               attn_implementation=attn_implementation, generation=generation)  # fmt: skip
        self.prompt = prompt
        self.max_length = max_length
        self._api_key = api_key
        self.module = None

    def authorize(self, request: Request) -> None:
        """LitServe's hook for every route: the key from ``Authorization: Bearer`` (OpenAI clients) or ``X-API-Key``,
        compared in constant time. Never logged."""
        if self._api_key is None or request.url.path in OPEN_PATHS:
            return
        given = request.headers.get("x-api-key") or ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        if not hmac.compare_digest(given.encode(), self._api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')")

    def setup(self, device: str) -> None:
        from healthai.model import DiagnosisLoRA

        module = DiagnosisLoRA(gradient_checkpointing=False, **self.model_args)
        module.configure_model()
        self.module = module.to(device).eval()
        self.module.constraint()  # compile the answer schema now, not during the first request

    def decode_request(self, request: Any, context: dict) -> str:
        if isinstance(request, dict):
            return request["feature_content"]
        return case_from_messages(request.messages, self.prompt)

    def batch(self, texts: list[str]) -> dict[str, Any]:
        """Tokenise and left-pad exactly as predict's data module does (trimming over-long case texts)."""
        from healthai.data import PromptCollator, fit_case_text

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
        for answers in outputs:
            yield [encode_answer(answer, ctx["route"]) for answer, ctx in zip(answers, context)]


def encode_answer(answer: ParsedAnswer, route: str) -> dict[str, Any]:
    """A ``/predict`` row (as predict writes it: ``raw_output`` only when parsing failed) or a chat message."""
    if route == PREDICT_PATH:
        return answer.row_fields()
    return {"role": "assistant", "content": answer.raw}


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>HealthAI 诊断</title>
<style>
body{font-family:"Noto Sans CJK SC","Source Han Sans SC","PingFang SC","Microsoft YaHei","WenQuanYi Micro Hei",
 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.6;color:#222}
textarea{width:100%;height:14rem;font:inherit}button{font:inherit;padding:.3rem 1.2rem}
#status{color:#666}.error{color:#b00}h2{font-size:1.1rem;margin:1.2rem 0 .3rem}
</style></head><body>
<h1>HealthAI 病历诊断</h1>
<form id="form"><textarea id="case" placeholder="粘贴病历（性别、年龄、主诉、现病史、既往史、体格检查、辅助检查……）"></textarea>
<p>__KEY_FIELD__<button type="submit">诊断</button> <span id="status"></span></p></form>
<div id="result" hidden><h2>诊断</h2><ul id="diseases"></ul><h2>诊断依据</h2><ol id="reasons"></ol></div>
<script>
const $ = (id) => document.getElementById(id);
function items(list, texts) { list.replaceChildren(...texts.map((t) => { const li = document.createElement("li");
  li.textContent = t; return li; })); }
// "1. xx；2. yy" or one reason per line → list items, the numbers dropped (the <ol> numbers them).
const numbering = /(?:^|\\n|[；;。]\\s*)\\s*[(（]?\\d+\\s*[.、．)）]\\s*|\\n/;
const reasons = (r) => r.split(numbering).map((s) => s.trim()).filter(Boolean);
async function diagnose(ev) {
  if (ev) ev.preventDefault();
  const headers = {"Content-Type": "application/json"}, key = $("key");
  if (key && key.value) headers["Authorization"] = "Bearer " + key.value;
  $("status").className = ""; $("status").textContent = "诊断中…"; $("result").hidden = true;
  try {
    const body = JSON.stringify({feature_content: $("case").value});
    const resp = await fetch("predict", {method: "POST", headers, body});
    const answer = await resp.json();
    if (!resp.ok) throw new Error(answer.detail || resp.statusText);
    items($("diseases"), answer.diseases.split(/[；;，,、]/).map((s) => s.trim()).filter(Boolean));
    items($("reasons"), reasons(answer.reason));
    $("status").textContent = "完成（" + answer.parse_status + "）"; $("result").hidden = false;
  } catch (e) { $("status").className = "error"; $("status").textContent = "出错：" + e.message; }
}
$("form").addEventListener("submit", diagnose);
// /?q=<case text> fills the form and submits it: a link to a diagnosis, and what the headless browser test loads.
// A key may come in the fragment (#key=...): browsers never send the fragment, so it stays out of server logs.
const fragmentKey = new URLSearchParams(location.hash.slice(1)).get("key");
if (fragmentKey && $("key")) $("key").value = fragmentKey;
const q = new URLSearchParams(location.search).get("q");
if (q) { $("case").value = q; diagnose(); }
</script></body></html>
"""

KEY_FIELD = '<input id="key" type="password" placeholder="API key" autocomplete="off"> '


def page_html(require_key: bool) -> str:
    return PAGE.replace("__KEY_FIELD__", KEY_FIELD if require_key else "")


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


def serve(
    model_name_or_path: str = "Qwen/Qwen2.5-7B-Instruct",
    adapter_path: Optional[str] = None,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    max_length: int = 2048,
    max_chars: int = 20000,
    generation: GenerationSettings = GenerationSettings(),
    api_key_env: str = "HEALTHAI_SERVE_API_KEY",
    timeout: float = 300.0,
    attn_implementation: str = "sdpa",
    log_level: Literal["debug", "info", "warning", "error"] = "info",
) -> None:
    """Serve the model over HTTP (LitServe): POST /predict, OpenAI POST /v1/chat/completions, a page at GET /.

    Decodes exactly as `predict` does (same prompt, constrained decoding and parser); GET /health answers 200 once the
    model is loaded; SIGTERM or Ctrl+C stops every process of the server.

    Args:
        model_name_or_path: Base model: a hub id or a local folder (as in predict's --model.model_name_or_path).
        adapter_path: The adapter/ folder written by fit; its saved prompt and tokenizer are used. null = zero-shot
            base model with the default prompt.
        dtype: Dtype of the base weights: bfloat16 on GPU, float32 on CPU.
        device: Where the model runs: auto (GPU if there is one), cpu or cuda (one GPU, one model copy).
        host: Interface to listen on. 127.0.0.1 = this machine only; 0.0.0.0 / :: = every interface (set an API key).
        port: TCP port.
        max_batch_size: Most requests decoded together in one batch (dynamic batching).
        batch_timeout: Seconds the worker waits for more requests to fill a batch once one has arrived.
        max_length: Longest prompt in tokens; longer case texts have their tail trimmed, as in predict.
        max_chars: Longest accepted case text in characters; longer requests get 413.
        generation: Decoding settings (as predict's --model.generation.*): max_new_tokens, constrained, the schema's
            max_diseases_chars / max_reason_chars, sampling. Client-sent sampling settings (temperature,
            max_tokens) are ignored: the server decodes as predict does.
        api_key_env: Name of the environment variable holding the API key. When it is set, every route except / and
            /health needs 'Authorization: Bearer KEY' or 'X-API-Key: KEY'. The key is never a flag and never logged.
        timeout: Seconds a request may wait in the queue before it gets 504.
        attn_implementation: Attention kernel passed to transformers (sdpa, flash_attention_2, eager).
        log_level: Server log level.
    """
    if max_batch_size < 1 or batch_timeout < 0 or max_chars < 1:
        raise SystemExit("serve: error: max_batch_size and max_chars must be >= 1 and batch_timeout >= 0")
    try:
        prompt = PromptStyle.load(adapter_path) if adapter_path else PromptStyle()  # as predict's data module
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"serve: error: {e}") from None
    api_key = os.environ.get(api_key_env, "").strip() or None
    api = DiagnosisAPI(
        model_name_or_path, adapter_path, dtype, attn_implementation, generation, prompt, max_length, max_chars,
        max_batch_size, batch_timeout, api_key,
    )  # fmt: skip
    server = ls.LitServer(
        api, accelerator="cuda" if device == "cuda" else device, devices=1, timeout=timeout,
        # Bytes: a character is up to 3 UTF-8 bytes, or 6 as a JSON \\u escape; chat requests carry the prompt too.
        max_payload_size=6 * max_chars + 65536,
        model_metadata={"model_name_or_path": model_name_or_path, "adapter_path": adapter_path},
    )  # fmt: skip
    _serve_page_at_root(server, page_html(api_key is not None))
    print(f"serve: http://{host}:{port}/  (POST {PREDICT_PATH}, POST /v1/chat/completions, GET /health); "
          f"API key {'required, from $' + api_key_env if api_key else 'off'}", flush=True)  # fmt: skip
    _stop_on_sigterm()
    server.run(host=host, port=port, log_level=log_level, generate_client_file=False)
