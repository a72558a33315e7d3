"""healthai serve: the real LitServe server on a loopback port with the small model — answers equal predict's under
concurrent load, bad requests get 4xx and the server carries on, `healthai label` works against it, the page works in
headless Chromium, SIGTERM stops every process. One server for the whole module (it takes a while to start)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO, read_jsonl, seed_records, write_jsonl
from forkserver import Forked
from healthai.prompts import DEFAULT_USER_TEMPLATE, PromptStyle

KEY = "test-serve-key-0123456789"
KEY_ENV = "HEALTHAI_TEST_SERVE_KEY"
MAX_CHARS = 4000
# A prompt unlike the default one (and with text after the case), saved in the adapter: server, predict and label
# must all use it.
PROMPT = PromptStyle(system="你是临床医生。只输出JSON。", user_template="病例：\n{case}\n请给出诊断。")
BUDGET = 48  # tokens: small, so the tests stay fast, and the random model's answers are mostly closed by it
GENERATION = ["--generation.max_new_tokens", str(BUDGET)]
START_TIMEOUT_S = 300  # the model worker imports torch/transformers in a fresh process: slow on a loaded 2-core box
REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter folder as fit writes it (weights, tokenizer, prompt.json), with non-zero LoRA weights so that
    it changes the answers; beside it, ``adapter.ckpt``: the same adapter as a fit checkpoint holds it (LoRA settings
    in the hyperparameters, weights in the state dict, base and prompt in the record predict reads)."""
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from healthai.adapter import CKPT_KEY, base_record

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    PROMPT.save(out)
    hparams = {"lora_r": 4, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
               "target_modules": ["q_proj", "v_proj"], "adapter_path": None}  # fmt: skip
    weights = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    torch.save({"state_dict": weights, "hyper_parameters": hparams,
                CKPT_KEY: {"base": base_record(str(tiny_model_dir)), "prompt": dataclasses.asdict(PROMPT)}},
               out.parent / "adapter.ckpt")  # fmt: skip
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body=None, key: str | None = KEY, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, object]:
    """``(status, parsed JSON body or text)``; ``body`` bytes are sent as they are, anything else as JSON."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


BATCH_PROBE = """\
import os

if os.environ.get("HEALTHAI_TEST_BATCH_LOG"):
    from healthai import serve

    _batch = serve.DiagnosisAPI.batch

    def _noting_batch(self, texts):
        with open(os.environ["HEALTHAI_TEST_BATCH_LOG"], "a", encoding="utf-8") as f:
            f.write(f"{len(texts)}\\n")
        return _batch(self, texts)

    serve.DiagnosisAPI.batch = _noting_batch
"""
"""A ``sitecustomize`` for the server's processes: LitServe's model worker is a spawned interpreter (it runs site, so
this), and nothing it answers tells how requests were batched; this notes each batch's size in a file. Only fresh
interpreters the server starts run it (its model worker); the server's own process, forked by tests/forkserver.py
after site ran, is unchanged."""


class Server:
    """The server process, started by the fixture; :meth:`ready` waits (bounded) until it answers /health.
    ``batch_log`` gets one line per batch the model worker decodes: its number of requests (:data:`BATCH_PROBE`)."""

    def __init__(self, proc: Forked, url: str, log: Path, batch_log: Path):
        self.proc, self.url, self.log, self.batch_log = proc, url, log, batch_log
        self.deadline = time.monotonic() + START_TIMEOUT_S
        self.healthy = False

    def log_tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def batch_sizes(self) -> list[int]:
        """The size of every batch the model worker has decoded so far, in order."""
        text = self.batch_log.read_text(encoding="utf-8") if self.batch_log.exists() else ""
        return [int(line) for line in text.split()]

    def ready(self) -> "Server":
        while not self.healthy:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log_tail()}"
            assert time.monotonic() < self.deadline, f"server not healthy after {START_TIMEOUT_S}s:\n{self.log_tail()}"
            try:
                self.healthy = request(self.url + "/health", key=None, timeout=5)[0] == 200
            except OSError:
                pass  # not listening yet
            if not self.healthy:
                time.sleep(0.5)
        return self


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, adapter, forkserver):
    """Started, not waited for: a test can do its in-process work while the server loads (tests call ``ready()``).

    It serves the adapter as a fit ``.ckpt``; the tests compare its answers with predict's from the adapter folder."""
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    log, batch_log, probe = folder / "server.log", folder / "batches.txt", folder / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(BATCH_PROBE, encoding="utf-8")
    cmd = ["-m", "healthai", "serve", "--model_name_or_path", str(tiny_model_dir),
           "--adapter_path", str(adapter.parent / "adapter.ckpt"), "--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--max_batch_size", "8", "--batch_timeout", "0.05", "--max_length", "768",
           "--max_chars", str(MAX_CHARS), "--api_key_env", KEY_ENV, *GENERATION]  # fmt: skip
    env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": os.pathsep.join([str(probe), str(REPO)]),
           "HEALTHAI_TEST_BATCH_LOG": str(batch_log)}  # fmt: skip
    # A real process, forked (tests/forkserver.py). Own session: on teardown anything left of it can be found (and
    # killed) by its process group.
    proc = forkserver.start(cmd, env=env, stdout=log, stderr="stdout", new_session=True)
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", log, batch_log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the server left behind; normally nothing
        except ProcessLookupError:
            pass


def predict_rows(tiny_model_dir, adapter, records, tmp_path) -> dict:
    """The `predict` command's rows for ``records``, by id (in-process, same model, adapter and settings)."""
    from healthai.cli import cli_main

    src = write_jsonl(tmp_path / "records.jsonl", records)
    out = tmp_path / "pred.jsonl"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
                  "--model.adapter_path", str(adapter), "--data.predict_file", str(src), "--writer.output_path",
                  str(out), "--writer.progress", "false", "--data.eval_batch_size", "8",
                  *[a.replace("--generation", "--model.generation") for a in GENERATION]])  # fmt: skip
    finally:
        os.chdir(cwd)
    return {row["id"]: row for row in read_jsonl(out)}


CONSTRAINED_STATUSES = ("ok", "truncated")
"""The parse statuses of a constrained answer: always strict JSON, ``truncated`` where the budget closed it."""


def test_concurrent_requests_are_batched_and_answer_as_predict_does(server, tiny_model_dir, adapter, tmp_path):
    records = seed_records(16)  # 8 threads, batches of up to 8: at least two batches, each decoding several requests

    def ask(record):
        return request(server.url + "/predict", {"id": record["id"], "feature_content": record["feature_content"]})

    expected = predict_rows(tiny_model_dir, adapter, records, tmp_path)  # while the server loads
    server.ready()
    before = len(server.batch_sizes())
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, records))
    batches = server.batch_sizes()[before:]
    assert sum(batches) == len(records) and max(batches) > 1, batches  # batched: several requests decoded together
    for record, (status, body) in zip(records, answers):
        assert status == 200, body
        assert body["id"] == record["id"]
        row = expected[record["id"]]
        assert {k: body[k] for k in ("diseases", "reason", "parse_status")} == {
            k: row[k] for k in ("diseases", "reason", "parse_status")
        }, record["id"]
        assert body["parse_status"] in CONSTRAINED_STATUSES  # constrained decoding


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"id": 1}, 422, "missing field 'feature_content'"),
        ({"feature_content": 42}, 422, "must be a string, got int"),
        ({"feature_content": "  \n"}, 422, "is empty"),
        ({"feature_content": "x" * (MAX_CHARS + 1)}, 413, f"over the limit of {MAX_CHARS}"),
        ({"feature_content": "病历", "id": [1]}, 422, "field 'id' must be an integer or a string"),
    ],
)
def test_bad_predict_requests_get_4xx_with_a_message(server, body, status, message):
    server.ready()
    got, detail = request(server.url + "/predict", body)
    assert got == status and message in detail["detail"], (got, detail)


def test_bad_chat_requests_keys_and_huge_bodies_get_4xx_and_the_server_keeps_serving(server):
    chat = server.ready().url + "/v1/chat/completions"
    assert request(chat, {"model": "m", "messages": [{"role": "system", "content": "hi"}]})[0] == 422
    assert request(chat, {"model": "m", "messages": [{"role": "user", "content": " "}]})[0] == 422
    # FastAPI's validation of the OpenAI request model, answered as /predict answers: a status and one line
    assert request(chat, b"{broken") == (400, {"detail": "the body is not valid JSON: Expecting property name "
                                                        "enclosed in double quotes"})  # fmt: skip
    assert request(chat, b"[1, 2]")[0] == 400
    assert request(chat, {"model": "m"}) == (422, {"detail": "field 'messages': Field required"})
    good = {"feature_content": "性别: 男\n年龄: 60\n主诉: 胸痛2小时"}
    status, body = request(server.url + "/predict", good, key=None)
    assert status == 401 and "API key" in body["detail"]
    assert request(server.url + "/predict", good, key="wrong-key-0123456789")[0] == 401
    assert request(chat, {"model": "m", "messages": [{"role": "user", "content": "病历"}]}, key=None)[0] == 401
    # Every route but / and /health needs the key: FastAPI's own pages too, and paths that do not exist.
    for path in ("/docs", "/openapi.json", "/redoc", "/info", "/no-such-route"):
        assert request(server.url + path, key=None)[0] == 401, path
    assert request(server.url + "/openapi.json")[0] == 200
    assert request(server.url + "/health", key=None)[0] == 200  # open for load balancers
    assert request(server.url + "/", key=None)[0] == 200  # the page asks for the key itself
    huge = json.dumps({"feature_content": "x" * (6 * MAX_CHARS + 70000)}).encode()  # over the byte limit
    assert request(server.url + "/predict", huge)[0] == 413
    status, body = request(server.url + "/predict", good)
    assert status == 200 and body["parse_status"] in CONSTRAINED_STATUSES, body
    assert KEY not in server.log.read_text(encoding="utf-8", errors="replace")


def test_healthai_label_against_the_server_writes_labels(server, adapter, tmp_path, monkeypatch):
    from healthai.__main__ import main

    records = seed_records(4, offset=40)
    server.ready()
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda r: request(server.url + "/predict", r), records))
    direct = {r["id"]: body for r, (_, body) in zip(records, replies)}
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "labels.jsonl"
    monkeypatch.setenv("HEALTHAI_API_KEY", KEY)
    try:
        main(["label", "--input", str(src), "--output", str(out), "--base_url", server.url + "/v1", "--model", "healthai",
              "--prompt_dir", str(adapter), "--concurrency", "4", "--max_retries", "0", "--timeout",
              str(REQUEST_TIMEOUT_S), "--progress", "false"])  # fmt: skip
        code = 0
    except SystemExit as e:
        code = e.code
    # label keeps only answers with both fields non-empty (the small random model sometimes writes "").
    usable = {i: a for i, a in direct.items() if a["diseases"].strip() and a["reason"].strip()}
    assert usable, "no record gave a usable answer; pick other records"
    labelled = {row["id"]: (row["diseases"], row["reason"]) for row in read_jsonl(out)}
    assert labelled == {i: (a["diseases"].strip(), a["reason"].strip()) for i, a in usable.items()}
    assert code == (0 if len(usable) == len(records) else 1)


def sse_data(text: str) -> list:
    """The ``data:`` payloads of a server-sent event stream, in order: parsed JSON, or the text (``[DONE]``)."""
    payloads = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def test_chat_answers_the_budget_closed_finish_with_length_and_real_token_usage(server, tiny_model_dir):
    """An answer the token budget closed (``truncated`` from /predict; the random model rarely ends its strings by
    itself) is ``finish_reason: "length"`` on the OpenAI route, streamed or not, with the prompt's and the answer's
    real token counts in ``usage`` and, though cut, strict JSON equal to /predict's answer."""
    from transformers import AutoTokenizer

    from healthai.encoding import fit_case_text

    records = seed_records(4, offset=70)
    server.ready()
    rows = {r["id"]: request(server.url + "/predict", r)[1] for r in records}
    closed = [r for r in records if rows[r["id"]]["parse_status"] == "truncated"]
    assert closed, f"no answer was closed by the budget ({rows}); pick other records"
    record, row = closed[0], rows[closed[0]["id"]]
    # The prompt as the server renders it around the case text (the adapter's prompt, --max_length 768).
    prompt_tokens = len(fit_case_text(AutoTokenizer.from_pretrained(tiny_model_dir), PROMPT, record["feature_content"],
                                      768)[0])  # fmt: skip
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": BUDGET, "total_tokens": prompt_tokens + BUDGET}
    chat = {"model": "healthai", "messages": PROMPT.messages(record["feature_content"])}

    status, reply = request(server.url + "/v1/chat/completions", chat)
    assert status == 200, reply
    (choice,) = reply["choices"]
    assert choice["finish_reason"] == "length"
    assert reply["usage"] == usage  # completion_tokens: the whole budget, its closing tokens included
    answer = json.loads(choice["message"]["content"])  # strict JSON: the budget closed it
    assert (answer["diseases"], answer["reason"]) == (row["diseases"], row["reason"])

    status, stream = request(server.url + "/v1/chat/completions", {**chat, "stream": True})
    assert status == 200, stream
    *chunks, done = sse_data(stream)
    assert done == "[DONE]"
    # Content chunks first (no finish_reason yet), then LitServe's closing chunk with the reason and the usage.
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["usage"] == usage


def test_the_key_is_read_from_bearer_or_x_api_key():
    from healthai.serve import key_matches

    assert key_matches({"authorization": f"Bearer {KEY}"}, KEY)
    assert key_matches({"authorization": f"bearer  {KEY} "}, KEY)
    assert key_matches({"x-api-key": KEY}, KEY)
    assert not key_matches({"authorization": f"Basic {KEY}"}, KEY)
    assert not key_matches({"x-api-key": KEY[:-1]}, KEY)
    assert not key_matches({}, KEY)


def test_a_network_host_needs_a_key_or_the_loudly_named_opt_out(tiny_model_dir, monkeypatch, capsys):
    """Checked in-process up to the point where LitServe would start listening (its ``run`` is replaced)."""
    import litserve

    from healthai.__main__ import main

    started = []
    monkeypatch.setattr(litserve.LitServer, "run", lambda self, **kwargs: started.append(kwargs["host"]))
    monkeypatch.setattr("healthai.serve._stop_on_sigterm", lambda: None)  # not in the test process
    monkeypatch.delenv(KEY_ENV, raising=False)
    argv = ["serve", "--model_name_or_path", str(tiny_model_dir), "--device", "cpu", "--api_key_env", KEY_ENV]
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--host", host])
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"healthai serve: error: --host {host} is reachable from the network and no API key is set: put one in "
            f"${KEY_ENV}, or pass --insecure_no_api_key true to serve without one")  # fmt: skip
    assert not started
    main([*argv, "--host", "::1"])  # this machine only: no key needed
    main([*argv, "--host", "0.0.0.0", "--insecure_no_api_key", "true"])
    assert "WARNING: --insecure_no_api_key: 0.0.0.0:8000 serves the model to anyone" in capsys.readouterr().err
    monkeypatch.setenv(KEY_ENV, KEY)
    main([*argv, "--host", "0.0.0.0"])
    assert "API key required" in capsys.readouterr().out
    assert started == ["::1", "0.0.0.0", "0.0.0.0"]


def test_each_chat_choice_gets_its_own_finish_reason_streamed_or_not():
    """``finish_reason`` is read off the parsed answer, never its text: ``length`` where the budget ended it
    (``truncated``; or not strict JSON after the whole budget: unconstrained decoding cut), ``stop`` where the model
    did. Then :class:`DiagnosisSpec` (in-process, fed the items the model worker sends) puts each choice's own reason
    and the summed token counts in the reply, where LitServe alone would write ``stop`` and zeros."""
    import asyncio

    from litserve.specs.openai import ChatCompletionRequest
    from litserve.utils import LitAPIStatus

    from healthai.decoding import ParsedAnswer
    from healthai.serve import DiagnosisSpec, encode_answer, finish_reason

    def answer(status: str, completion_tokens: int) -> ParsedAnswer:
        return ParsedAnswer("肺炎", "发热。", status=status, raw='{"diseases": "肺炎", "reason": "发热。"}',
                            prompt_tokens=30, completion_tokens=completion_tokens)  # fmt: skip

    expected = {
        ("ok", 20): "stop",
        ("ok", BUDGET): "stop",  # strict JSON, ended by the model with its last token
        ("truncated", BUDGET): "length",
        ("truncated", BUDGET - 1): "length",  # the decoder's report decides, not the count
        ("repaired", BUDGET): "length",  # unconstrained decoding cut mid-answer
        ("repaired", 20): "stop",  # not strict JSON, but the model ended it
        ("failed", BUDGET): "length",
        ("failed", 3): "stop",
    }
    assert {key: finish_reason(answer(*key), BUDGET) for key in expected} == expected

    spec = DiagnosisSpec(PROMPT, MAX_CHARS)
    natural, closed = answer("ok", 20), answer("truncated", BUDGET)

    async def pipe(a: ParsedAnswer):  # one choice's items, as the model worker sends them (JSON lines)
        yield json.dumps(encode_answer(a, spec.api_path, BUDGET), ensure_ascii=False) + "\n", LitAPIStatus.OK

    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "病历"}], n=2)
    usage = {"prompt_tokens": 60, "completion_tokens": 20 + BUDGET, "total_tokens": 60 + 20 + BUDGET}
    reply = asyncio.run(spec.non_streaming_completion(chat, [pipe(natural), pipe(closed)]))
    assert [c.finish_reason for c in reply.choices] == ["stop", "length"]
    assert [c.message.content for c in reply.choices] == [natural.raw, closed.raw]
    assert reply.usage.model_dump() == usage

    async def stream() -> list[str]:
        return [event async for event in spec.streaming_completion(chat, [pipe(natural), pipe(closed)])]

    *chunks, done = sse_data("".join(asyncio.run(stream())))
    assert done == "[DONE]"
    assert [[c["finish_reason"] for c in chunk["choices"]] for chunk in chunks] == [[None, None], ["stop", "length"]]
    assert [c["delta"]["content"] for c in chunks[0]["choices"]] == [natural.raw, closed.raw]
    assert chunks[-1]["usage"] == usage


def test_case_text_is_taken_out_of_the_projects_chat_prompt():
    from litserve.specs.openai import ChatMessage

    from healthai.serve import case_from_messages

    case = "性别: 女\n年龄: 29\n主诉: 发热"

    def msgs(style: PromptStyle):
        return [ChatMessage(**m) for m in style.messages(case)]

    assert case_from_messages(msgs(PROMPT), PROMPT) == case  # the served (adapter's) prompt
    assert case_from_messages(msgs(PromptStyle()), PROMPT) == case  # label without --prompt_dir: the default
    assert case_from_messages([ChatMessage(role="user", content=case)], PROMPT) == case  # a bare case record
    wrapped = DEFAULT_USER_TEMPLATE.replace("{case}", case)
    parts = [ChatMessage(role="user", content=[{"type": "text", "text": wrapped}])]
    assert case_from_messages(parts, PROMPT) == case
    later = msgs(PROMPT) + [ChatMessage(role="assistant", content="{}"), ChatMessage(role="user", content="另一份病历")]
    assert case_from_messages(later, PROMPT) == "另一份病历"  # the last user message


def test_page_in_headless_chromium_shows_the_diagnosis(server, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the page is not browser-checked")
    case = seed_records(1, offset=50)[0]["feature_content"]
    status, answer = request(server.ready().url + "/predict", {"feature_content": case})
    assert status == 200
    page = request(server.url + "/", key=None)[1]
    assert '<meta charset="utf-8">' in page and "Noto Sans CJK SC" in page
    # ?q= fills and submits the form; the key rides in the fragment, which the browser never sends.
    url = f"{server.url}/?q={urllib.parse.quote(case)}#key={KEY}"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000", "--dump-dom", url]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    assert answer["parse_status"] in CONSTRAINED_STATUSES
    assert f"完成（{answer['parse_status']}）" in dom, dom[-2000:]  # the page shows the status /predict gave
    def shown(list_id: str) -> list[str]:
        inner = re.search(rf'<[ou]l id="{list_id}">(.*?)</[ou]l>', dom, re.DOTALL).group(1)
        return [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", inner, re.DOTALL)]

    def split(text: str, pattern: str) -> list[str]:
        return [s.strip() for s in re.split(pattern, text) if s.strip()]

    assert shown("diseases") == split(answer["diseases"], r"[；;，,、]")
    # The page's numbering pattern (Python and JavaScript read it alike): "1. a；2. b" → ["a", "b"].
    numbering = re.search(r"const numbering = /(.*)/;", page).group(1)
    assert split("1. 乙肝阳性；2. HBV DNA阳性。", numbering) == ["乙肝阳性", "HBV DNA阳性。"]
    assert shown("reasons") == split(answer["reason"], numbering)


def test_sigterm_lets_requests_in_flight_finish_then_stops_every_process(server):
    """16 requests = two batches of 8: once the first reply is in, the second batch is still being decoded."""
    server.ready()
    first_reply, done = threading.Event(), []

    def ask(record):
        status, _ = request(server.url + "/predict", record)
        done.append((status, time.monotonic()))
        first_reply.set()

    threads = [threading.Thread(target=ask, args=(r,)) for r in seed_records(16, offset=60)]
    for t in threads:
        t.start()
    assert first_reply.wait(timeout=REQUEST_TIMEOUT_S)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S)
    assert [status for status, _ in done] == [200] * 16
    assert any(at > sent for _, at in done)  # some were answered after SIGTERM
    assert server.proc.wait(timeout=60) == 0, server.log_tail()
    deadline = time.monotonic() + 30
    while True:  # the model worker and HTTP processes are in the server's process group
        try:
            os.killpg(server.proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the server outlived it"
        time.sleep(0.2)
    with pytest.raises(OSError):
        request(server.url + "/health", key=None, timeout=5)


@pytest.mark.parametrize("merge", [True, False])
def test_the_model_worker_generates_with_the_lora_merged_unless_told_not_to(tiny_model_dir, adapter, merge):
    """The worker's set-up (in-process): ``--merge_for_inference`` (default true) folds the adapter into the base
    weights once loaded, as predict does; false keeps the LoRA layers."""
    from healthai.generation import GenerationSettings
    from healthai.serve import DiagnosisAPI

    api = DiagnosisAPI(str(tiny_model_dir), str(adapter), "float32", "sdpa", GenerationSettings(), PROMPT, 512,
                       MAX_CHARS, 1, 0.0, merge_for_inference=merge)  # fmt: skip
    api.setup("cpu")
    assert api.module.lora_merged() is merge


@pytest.mark.parametrize("body", [
    b"[" * 3000 + b"]" * 3000,  # nested 3,000 deep, far under the size limit
    json.dumps({"feature_content": "\ud800abc"}).encode(),  # a lone surrogate: valid JSON, not encodable text
])  # fmt: skip
def test_predict_payload_answers_400_for_deep_nesting_and_lone_surrogates(body: bytes) -> None:
    """#29 item 10: both were 500s; each is one line and a 400."""
    from fastapi import HTTPException

    from healthai.serve import predict_payload

    with pytest.raises(HTTPException) as caught:
        predict_payload(body, 1000)
    assert caught.value.status_code == 400 and "\n" not in caught.value.detail


def test_access_log_scrubs_query_string_values() -> None:
    """#29 item 2: ``?api_key=KEY`` in a request line is not written verbatim to serve's access log."""
    import logging

    from healthai import accesslog

    accesslog.install()
    record = logging.LogRecord(accesslog.ACCESS_LOGGER, logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/health?api_key=sk-secret%2Bkey&x=1", "1.1", 401), None)  # fmt: skip
    for f in logging.getLogger(accesslog.ACCESS_LOGGER).filters:
        f.filter(record)
    line = record.getMessage()
    assert "sk-secret" not in line and '"GET /health?api_key=***&x=*** HTTP/1.1" 401' in line
