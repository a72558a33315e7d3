"""A scripted OpenAI-compatible ``/v1/chat/completions`` server for the labelling tests and benchmark.

It listens on 127.0.0.1 only, on a free port the OS picks. What it does with a request is decided by a marker in the
user message — ``[[fault:NAME]]``, normally part of the record's ``feature_content`` — and by how many times that same
user message has been seen, so every fault is hit deterministically whatever order the client sends records in:

====================  ===============================================================================================
``ok`` / no marker    a good JSON answer
``429``               first attempt: 429 with ``Retry-After: 1``; then good
``500``               first attempt: 500; then good
``500always``         always 500
``slow``              first attempt: sleeps ``slow_s`` before answering (beyond the client's timeout); then good
``drop``              first attempt: the connection is closed without a response; then good
``fence``             a good answer wrapped in a Markdown ```json fence
``list``              ``diseases`` and ``reason`` given as lists
``invalid``           prose, no JSON
``missing``           JSON without ``reason``
``length``            a JSON answer cut mid-string, ``finish_reason: "length"``
``400``               400 Bad Request
``echo_key``          400 whose error message echoes the Authorization header (as some gateways do)
``auth``              401 (a wrong key)
``auth_echo``         401 that echoes the key it was sent, as OpenAI's own does ("Incorrect API key provided: sk-…")
``html``              200 with an HTML page (a wrong base URL, a captive gateway)
``echo_key_long``     400 echoing the Authorization header after 400 characters of text (a long key straddles the
                      500-character cut of failure reasons)
``html_key``          200 with an HTML page that shows the key 30 characters in (straddles the 80-character preview)
``key_cut``           401 quoting the key's first 60 characters only (a server that cut its own message mid-key)
====================  ===============================================================================================

A judge request (``evaluate --judge_base_url``: lists ``A1. name`` / ``B1. name`` as
:func:`healthai.prompts.judge_messages` writes them) that no fault marker spoils is answered ``{"pairs": [...]}`` from
:attr:`FakeOpenAIServer.judge_same` (names that are one disease) and :attr:`~FakeOpenAIServer.judge_one_way` (pairs
it names in one order only, a judge that disagrees with itself).

Setting :attr:`FakeOpenAIServer.healed` makes every later request succeed (the "fixed upstream, rerun" scenario);
:attr:`reject_response_format` makes requests carrying ``response_format`` fail with 400 like servers without JSON mode.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

FAULT_RE = re.compile(r"\[\[fault:([a-z0-9_]+)\]\]")
JUDGE_LINE_RE = re.compile(r"^([AB])(\d+)\. (.*)$", re.M)

GOOD_ANSWER = {"diseases": "2型糖尿病；高血压", "reason": "1. 血糖升高多年；\n2. 有高血压病病史。"}


def good_content() -> str:
    return json.dumps(GOOD_ANSWER, ensure_ascii=False)


@dataclass
class SeenRequest:
    """One request as the server saw it (for assertions)."""

    fault: str
    attempt: int
    at: float
    authorization: str
    response_format: Optional[dict]
    user_text: str


@dataclass
class FakeOpenAIServer:
    """Start with ``with FakeOpenAIServer() as server:``; ``server.base_url`` ends in ``/v1``."""

    latency: float = 0.0
    """Seconds every request waits before it is answered (the benchmark's fixed model latency)."""
    slow_s: float = 1.5
    """How long a ``slow`` request sleeps."""
    retry_after: str = "1"
    """The ``Retry-After`` header value of a ``429``."""
    healed: bool = False
    reject_response_format: bool = False
    judge_same: list[frozenset[str]] = field(default_factory=list)
    """Groups of names the fake judge calls one disease."""
    judge_one_way: set[tuple[str, str]] = field(default_factory=set)
    """``(a, b)``: the fake judge pairs ``a`` with ``b`` only when ``a`` is in list A."""
    requests: list[SeenRequest] = field(default_factory=list)
    _attempts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: Optional[ThreadingHTTPServer] = None
    _thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> "FakeOpenAIServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True  # a sleeping "slow" handler must not hold up shutdown
        # A short poll interval: shutdown() waits up to one interval, once per test.
        serve = functools.partial(self._httpd.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    def note(self, body: dict, authorization: str) -> SeenRequest:
        """Record a request and return it with its fault name and per-message attempt number."""
        user_text = next((m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"), "")
        match = FAULT_RE.search(user_text)
        with self._lock:
            attempt = self._attempts.get(user_text, 0) + 1
            self._attempts[user_text] = attempt
            seen = SeenRequest(
                fault=match.group(1) if match else "ok",
                attempt=attempt,
                at=time.monotonic(),
                authorization=authorization,
                response_format=body.get("response_format"),
                user_text=user_text,
            )
            self.requests.append(seen)
        return seen

    def judge_answer(self, user_text: str) -> Optional[str]:
        """The answer to a judge request, or None when ``user_text`` is not one."""
        lines = JUDGE_LINE_RE.findall(user_text)
        if not lines:
            return None
        a = [(f"A{i}", name) for letter, i, name in lines if letter == "A"]
        b = [(f"B{i}", name) for letter, i, name in lines if letter == "B"]
        pairs = [[la, lb] for la, x in a for lb, y in b
                 if (x, y) in self.judge_one_way or any(x in g and y in g for g in self.judge_same)]
        return json.dumps({"pairs": pairs})

    def attempts_for(self, fault: str) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.fault == fault]


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: when 16 clients connect at once, the SYNs beyond it are dropped and
    # retried a second later, a stall no real server shows.
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server; the client reuses connections
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's delayed ACK (~40 ms),
    # which would swamp the latency the benchmark sets.
    disable_nagle_algorithm = True
    fake: FakeOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Silence the per-request access log."""

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        body = json.loads(raw)
        seen = self.fake.note(body, self.headers.get("Authorization", ""))
        if self.fake.latency:
            time.sleep(self.fake.latency)
        try:
            self._answer(seen, body)
        except (BrokenPipeError, ConnectionResetError):
            # Expected for "slow": the client gave up on the request before the reply was written.
            self.close_connection = True

    # -- behaviours --------------------------------------------------------------------------------------------------

    def _answer(self, seen: SeenRequest, body: dict) -> None:
        fake, fault, first = self.fake, seen.fault, seen.attempt == 1
        if fake.reject_response_format and "response_format" in body:
            self._error(400, "'response_format' of type 'json_object' is not supported by this model")
            return
        if fake.healed:
            fault = "ok"
        if fault == "429" and first:
            self._error(429, "Rate limit reached", headers={"Retry-After": fake.retry_after})
        elif fault == "500" and first or fault == "500always":
            self._error(500, "internal error")
        elif fault == "slow" and first:
            time.sleep(fake.slow_s)
            self._completion(good_content(), body)
        elif fault == "drop" and first:
            # No status line, no headers: the client sees the connection close under it.
            self.close_connection = True
        elif fault == "fence":
            self._completion(f"好的，诊断如下：\n```json\n{good_content()}\n```\n", body)
        elif fault == "list":
            answer = {"diseases": ["2型糖尿病", "高血压"], "reason": ["1. 血糖升高多年；", "2. 有高血压病病史。"]}
            self._completion(json.dumps(answer, ensure_ascii=False), body)
        elif fault == "invalid":
            self._completion("对不起，根据现有信息我无法给出诊断。", body)
        elif fault == "missing":
            self._completion(json.dumps({"diseases": "高血压"}, ensure_ascii=False), body)
        elif fault == "length":
            self._completion(good_content()[:30], body, finish_reason="length")
        elif fault == "400":
            self._error(400, "Input data may contain inappropriate content.")
        elif fault == "echo_key":
            self._error(400, f"invalid request; header was {self.headers.get('Authorization', '')}")
        elif fault == "auth":
            self._error(401, "Incorrect API key provided.")
        elif fault == "auth_echo":
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self._error(401, f"Incorrect API key provided: {key}. You can find your API key at https://example.invalid.")
        elif fault == "echo_key_long":
            self._error(400, f"invalid request; {'x' * 400} header was {self.headers.get('Authorization', '')}")
        elif fault == "html_key":
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self._send(200, f"<html><body>gateway login for {key}</body></html>".encode(), "text/html")
        elif fault == "key_cut":
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self._error(401, f"Incorrect API key provided: {key[:60]}")
        elif fault == "html":
            self._send(200, b"<html><body>gateway login</body></html>", "text/html")
        elif (judged := fake.judge_answer(seen.user_text)) is not None:
            self._completion(judged, body)
        else:
            self._completion(good_content(), body)

    def _completion(self, content: str, body: dict, finish_reason: str = "stop") -> None:
        self._send_json(
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            },
        )

    def _error(self, status: int, message: str, headers: Optional[dict[str, str]] = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": "fake_error", "code": str(status)}}, headers)

    def _send_json(self, status: int, payload: dict, headers: Optional[dict[str, str]] = None) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def main() -> None:
    """Serve until killed, in a process of its own (the benchmark keeps the server off the labeller's GIL).

    Prints the base URL on the first line of stdout once it is listening.
    """
    import argparse

    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible server on 127.0.0.1 (tests/benchmark)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each request waits before its answer")
    args = parser.parse_args()
    server = FakeOpenAIServer(latency=args.latency)
    server.start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
