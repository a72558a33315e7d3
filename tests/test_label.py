"""Teacher labelling (`healthai.label`) against a local scripted OpenAI-compatible server (tests/fake_openai_server.py).

Every test talks to 127.0.0.1 only; timeouts and the client's backoff are shrunk so that the whole file runs in
seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fake server lives next to this file

from conftest import output_locked_by_another_process, write_jsonl  # noqa: E402
from fake_openai_server import GOOD_ANSWER, FakeOpenAIServer  # noqa: E402

from healthai.__main__ import main  # noqa: E402
from healthai.errors import ConfigError, InputError  # noqa: E402
from healthai.jsonl import BadRecordError, rejects_path_for  # noqa: E402
from healthai.label import (  # noqa: E402
    LabelSettings,
    Summary,
    failures_path_for,
    label,
    parse_teacher_reply,
    run_labelling,
)
from healthai.redact import Redactor  # noqa: E402
from healthai.teacher import MissingApiKeyError, retry_after_s  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-healthai-LEAKCHECK-7f3a9c51e2"
"""A distinctive key: it must never appear in any file, stream or exception text."""

GOOD_FAULTS = ["ok", "429", "500", "slow", "drop", "fence", "list"]
"""Faults the run recovers from (retries or parsing)."""
BAD_FAULTS = ["500always", "invalid", "missing", "length", "400", "echo_key", "html"]
"""Faults that leave the record failed."""


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HEALTHAI_API_KEY", KEY)
    return KEY


@pytest.fixture(autouse=True)
def fast_client_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The openai client waits 0.5 s, 1 s, ... between retries (it honours Retry-After either way); a tenth of that
    keeps this file fast. Private constants: if a client version renames them, the tests only get slower."""
    import openai._base_client as base_client

    monkeypatch.setattr(base_client, "INITIAL_RETRY_DELAY", 0.05, raising=False)
    monkeypatch.setattr(base_client, "MAX_RETRY_DELAY", 0.2, raising=False)


@pytest.fixture
def server():
    # slow_s is twice the tests' 1 s timeout: the "slow" reply surely times out, a normal one surely does not.
    with FakeOpenAIServer(slow_s=2.0) as srv:
        yield srv


def write_input(path: Path, faults: list[str]) -> dict[int, str]:
    """One record per fault; returns id → fault."""
    with open(path, "w", encoding="utf-8") as f:
        for i, fault in enumerate(faults):
            text = f"性别: 男\n年龄: {40 + i}\n主诉: 病例{i} [[fault:{fault}]]"
            f.write(json.dumps({"id": i, "feature_content": text}, ensure_ascii=False) + "\n")
    return dict(enumerate(faults))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fast_settings(tmp_path: Path, base_url: str, **overrides: Any) -> LabelSettings:
    kwargs: dict[str, Any] = dict(
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out.jsonl"),
        base_url=base_url,
        model="qwen2.5-72b-instruct",
        concurrency=4,
        max_retries=2,
        timeout=1.0,
        progress=False,
    )
    kwargs.update(overrides)
    return LabelSettings(**kwargs)


def run(settings: LabelSettings) -> Summary:
    return asyncio.run(run_labelling(settings))


def assert_no_key(tmp_path: Path, *texts: str) -> None:
    """The key appears in no file under ``tmp_path`` and in none of ``texts``."""
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"API key leaked into {path}"
    for text in texts:
        assert KEY not in text, "API key leaked into output text"


def assert_each_id_once(out: Path, failures: Path, ids: set[int]) -> tuple[set[int], set[int]]:
    """Every id is in ``out`` exactly once or in ``failures`` (with a reason), never both; returns (done, failed)."""
    done = [r["id"] for r in read_rows(out)]
    failed_rows = read_rows(failures)
    failed = [r["id"] for r in failed_rows]
    assert len(done) == len(set(done)), f"duplicate ids in output: {sorted(done)}"
    assert len(failed) == len(set(failed)), f"duplicate ids in failures: {sorted(failed)}"
    assert not set(done) & set(failed)
    assert set(done) | set(failed) == ids
    assert all(isinstance(r["reason"], str) and r["reason"] for r in failed_rows)
    return set(done), set(failed)


# ---------------------------------------------------------------------------------------------------------------------
# parsing and helpers (no server)
# ---------------------------------------------------------------------------------------------------------------------

GOOD = json.dumps(GOOD_ANSWER, ensure_ascii=False)


@pytest.mark.parametrize(
    "reply",
    [
        GOOD,
        f"```json\n{GOOD}\n```",
        f"```\n{GOOD}\n```",
        f"好的，诊断如下：\n```JSON\n{GOOD}\n```\n以上仅供参考。",
        f"```json\n{GOOD}",  # closing fence lost
        f"<think>先看血糖……</think>\n{GOOD}",
        f"诊断结果：{GOOD} 以上。",  # chatter around the object: json_repair
        GOOD[:-1] + ",}",  # trailing comma: json_repair
    ],
)
def test_parse_teacher_reply_accepts(reply: str) -> None:
    assert parse_teacher_reply(reply) == (GOOD_ANSWER["diseases"], GOOD_ANSWER["reason"])


def test_parse_teacher_reply_joins_lists() -> None:
    reply = json.dumps({"diseases": ["2型糖尿病", " 高血压 "], "reason": ["1. 血糖高", "2. 血压高"]}, ensure_ascii=False)
    assert parse_teacher_reply(reply) == ("2型糖尿病；高血压", "1. 血糖高\n2. 血压高")


@pytest.mark.parametrize(
    "reply, why",
    [
        ("", "empty reply"),
        ("对不起，我无法诊断。", "no JSON object"),
        ('{"diseases": "高血压"}', "lacks field(s) ['reason']"),
        ('{"diseases": "", "reason": "x"}', "'diseases' is empty"),
        ('{"diseases": {"a": 1}, "reason": "x"}', "'diseases' is a dict"),
        ('[{"diseases": "a", "reason": "b"}]', "not a JSON object"),
        ("<think>还在想", "no answer"),
    ],
)
def test_parse_teacher_reply_rejects(reply: str, why: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_teacher_reply(reply)
    assert why in str(info.value)


def test_parse_teacher_reply_no_repair_for_cut_replies() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_teacher_reply(GOOD[:30], allow_repair=False)


def test_retry_after_of_a_429() -> None:
    """The shared pause a 429 asks for (the client's own retry honours Retry-After by itself)."""
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "soon"}) == 1.0  # unreadable: the default pause
    assert retry_after_s({}) == 1.0
    assert retry_after_s({"retry-after": "999999"}) == 120.0  # capped


def test_redactor_scrubs_streams_exceptions_and_summaries() -> None:
    redact = Redactor(KEY)
    assert redact(f"Incorrect API key provided: {KEY}.") == "Incorrect API key provided: ***."
    assert Redactor("EMPTY")("EMPTY key") == "EMPTY key"  # a local server's dummy is no secret
    import io

    sink = io.StringIO()
    redact.writer(sink).write(f"x {KEY} y\n")
    assert sink.getvalue() == "x *** y\n"
    with pytest.raises(RuntimeError) as info:
        with redact.guard():
            try:
                raise ValueError(f"inner {KEY}")
            except ValueError as e:
                raise RuntimeError(f"outer {KEY}") from e
    assert str(info.value) == "outer ***" and str(info.value.__cause__) == "inner ***"
    assert redact.scrub_summary(Summary(total=1, aborted=f"HTTP 401: {KEY}")).aborted == "HTTP 401: ***"


# ---------------------------------------------------------------------------------------------------------------------
# runs against the fake server
# ---------------------------------------------------------------------------------------------------------------------


def test_faults_then_rerun_completes_the_set(
    tmp_path: Path, server: FakeOpenAIServer, capsys: pytest.CaptureFixture
) -> None:
    faults = write_input(tmp_path / "in.jsonl", GOOD_FAULTS + BAD_FAULTS)
    out, failures = tmp_path / "out.jsonl", failures_path_for(tmp_path / "out.jsonl")
    settings = fast_settings(tmp_path, server.base_url)

    summary = run(settings)

    done, failed = assert_each_id_once(out, failures, set(faults))
    assert {faults[i] for i in done} == set(GOOD_FAULTS)
    assert {faults[i] for i in failed} == set(BAD_FAULTS)
    assert (summary.done, summary.failed, summary.skipped, summary.ok) == (len(GOOD_FAULTS), len(BAD_FAULTS), 0, False)
    rows = {r["id"]: r for r in read_rows(out)}
    assert all(set(r) == {"id", "feature_content", "diseases", "reason"} for r in rows.values())
    assert all((r["diseases"], r["reason"]) == (GOOD_ANSWER["diseases"], GOOD_ANSWER["reason"]) for r in rows.values())
    fail_rows = {faults[r["id"]]: r for r in read_rows(failures)}
    assert "HTTP 500" in fail_rows["500always"]["reason"] and fail_rows["500always"]["attempts"] == 3
    assert fail_rows["invalid"]["raw"].startswith("对不起")
    assert "reason" in fail_rows["missing"]["reason"] and "raw" in fail_rows["missing"]
    assert "max_tokens" in fail_rows["length"]["reason"]
    assert "HTTP 400" in fail_rows["400"]["reason"] and fail_rows["400"]["attempts"] == 1
    assert "not answer with a chat completion" in fail_rows["html"]["reason"]

    # What the server saw: the key as a bearer token, JSON mode, the training prompt, the retries it was owed.
    assert {r.authorization for r in server.requests} == {f"Bearer {KEY}"}
    assert all(r.response_format == {"type": "json_object"} for r in server.requests)
    assert all(r.user_text.startswith("病历如下：\n性别") for r in server.requests)
    first_429, second_429 = server.attempts_for("429")
    assert second_429.at - first_429.at >= 0.95, "Retry-After: 1 was not honoured"
    assert [r.attempt for r in server.attempts_for("slow")] == [1, 2]
    assert [r.attempt for r in server.attempts_for("drop")] == [1, 2]
    assert len(server.attempts_for("400")) == 1

    # The upstream is fixed: a rerun asks for exactly the failed ids and completes the set, with no duplicate.
    server.healed = True
    n_before = len(server.requests)
    summary2 = run(settings)
    counts2 = (summary2.done, summary2.failed, summary2.skipped, summary2.ok)
    assert counts2 == (len(BAD_FAULTS), 0, len(GOOD_FAULTS), True)
    assert {r.fault for r in server.requests[n_before:]} == set(BAD_FAULTS)
    done2, failed2 = assert_each_id_once(out, failures, set(faults))
    assert done2 == set(faults) and not failed2 and not failures.exists()

    captured = capsys.readouterr()
    assert_no_key(tmp_path, captured.out, captured.err, repr(summary), repr(summary2))


def test_label_command_exit_code_summary_and_no_key(
    tmp_path: Path, server: FakeOpenAIServer, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    write_input(tmp_path / "in.jsonl", ["ok", "echo_key", "invalid"])
    settings = LabelSettings(
        input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"), base_url=server.base_url,
        model="m", timeout=1.0, max_retries=2,
    )  # fmt: skip
    with pytest.raises(SystemExit) as info:
        label(settings)
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert "done 1, failed 2, skipped 0" in captured.out and "elapsed" in captured.out
    fail_rows = {r["id"]: r for r in read_rows(tmp_path / "out.failures.jsonl")}
    assert "Bearer ***" in fail_rows[1]["reason"]  # the key the server echoed is scrubbed

    server.healed = True
    result = label(settings)
    assert (result["done"], result["failed"], result["skipped"]) == (2, 0, 1)
    captured2 = capsys.readouterr()
    assert_no_key(tmp_path, captured.out, captured.err, captured2.out, captured2.err, caplog.text, str(info.value))


def test_missing_key_names_both_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEALTHAI_API_KEY")
    write_input(tmp_path / "in.jsonl", ["ok"])
    with pytest.raises(MissingApiKeyError, match="HEALTHAI_API_KEY.*OPENAI_API_KEY"):
        run(fast_settings(tmp_path, "http://127.0.0.1:9/v1"))
    with pytest.raises(MissingApiKeyError, match="HEALTHAI_API_KEY"):
        label(LabelSettings(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.jsonl"), base_url="http://x/v1",
                            model="m"))  # fmt: skip
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the fallback variable is enough
    with FakeOpenAIServer() as srv:
        assert run(fast_settings(tmp_path, srv.base_url)).done == 1
        assert srv.requests[0].authorization == f"Bearer {KEY}"


def test_json_mode_falls_back_when_server_rejects_it(
    tmp_path: Path, server: FakeOpenAIServer, capsys: pytest.CaptureFixture
) -> None:
    server.reject_response_format = True
    write_input(tmp_path / "in.jsonl", ["ok", "fence", "ok", "ok"] * 2)
    summary = run(fast_settings(tmp_path, server.base_url, concurrency=4))
    assert (summary.done, summary.failed) == (8, 0)
    # The first requests all went out with JSON mode and were refused; each was retried without it.
    with_json = [r for r in server.requests if r.response_format is not None]
    assert 1 <= len(with_json) <= 4 and len(server.requests) == 8 + len(with_json)
    assert capsys.readouterr().err.count("rejected JSON mode") == 1


def test_json_mode_off(tmp_path: Path, server: FakeOpenAIServer) -> None:
    write_input(tmp_path / "in.jsonl", ["ok", "ok"])
    assert run(fast_settings(tmp_path, server.base_url, json_mode=False)).done == 2
    assert all(r.response_format is None for r in server.requests)


def test_bad_key_stops_the_run(tmp_path: Path, server: FakeOpenAIServer) -> None:
    faults = write_input(tmp_path / "in.jsonl", ["auth"] * 20)
    summary = run(fast_settings(tmp_path, server.base_url, concurrency=2))
    assert summary.aborted and "HTTP 401" in summary.aborted and not summary.ok
    assert len(server.requests) <= 2, "kept sending requests after a 401"
    assert summary.failed + summary.not_attempted == len(faults) and summary.done == 0


def test_unreachable_server_stops_after_a_streak_of_give_ups(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    faults = write_input(tmp_path / "in.jsonl", ["ok"] * 40)
    summary = run(fast_settings(tmp_path, dead_url, max_retries=1, concurrency=2))
    assert summary.aborted and "in a row" in summary.aborted
    assert summary.failed >= 10 and summary.failed + summary.not_attempted == len(faults)
    assert all("connection error" in r["reason"] for r in read_rows(failures_path_for(tmp_path / "out.jsonl")))


def test_resume_after_torn_line(tmp_path: Path, server: FakeOpenAIServer) -> None:
    faults = write_input(tmp_path / "in.jsonl", ["ok"] * 6)
    out = tmp_path / "out.jsonl"
    rows = [{"id": i, "feature_content": "x", "diseases": "d", "reason": "r"} for i in (0, 1)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": 2, "feature_con', encoding="utf-8")
    summary = run(fast_settings(tmp_path, server.base_url))
    assert (summary.done, summary.skipped) == (4, 2)
    done, _ = assert_each_id_once(out, failures_path_for(out), set(faults))
    assert done == set(faults)


def test_bad_input_lines(tmp_path: Path, server: FakeOpenAIServer) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": 1, "feature_content": "a"}\n'
        "not json\n"
        '{"id": 2}\n'
        '{"id": 3, "feature_content": "c"}\n',
        encoding="utf-8",
    )
    with pytest.raises(BadRecordError, match=r"in\.jsonl:2: malformed JSON"):
        run(fast_settings(tmp_path, server.base_url))
    summary = run(fast_settings(tmp_path, server.base_url, on_bad_record="skip"))
    assert (summary.done, summary.rejected) == (2, 2)
    assert [r["line"] for r in read_rows(rejects_path_for(tmp_path / "out.jsonl"))] == [2, 3]

    src.write_text('{"id": 1, "feature_content": "a"}\n{"id": 1, "feature_content": "b"}\n', encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"in\.jsonl:2: duplicate id 1 \(first at line 1\)"):
        run(fast_settings(tmp_path, server.base_url, on_bad_record="skip"))
    with pytest.raises(InputError, match="--output .* would overwrite --input"):
        label(LabelSettings(input=str(src), output=str(src), base_url=server.base_url, model="m"))


def test_each_label_is_fsynced_before_the_next_reply_and_every_label_before_the_summary(
    tmp_path: Path, server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kill test above cannot see a missing fsync (a killed process loses nothing of the page cache): observed
    here. One request at a time, so label k is counted before request k+1 is sent; the server holds request k+1 until
    the k labels before it are on disk (an fsync covered their lines; 3 s at most), and notes whether they were."""
    from conftest import FsyncLog

    n = 4
    write_input(tmp_path / "in.jsonl", ["ok"] * n)
    out = tmp_path / "out.jsonl"
    log = FsyncLog(monkeypatch)

    def synced_labels() -> int:
        return out.read_bytes()[: log.synced(FsyncLog.file_id(out))].count(b"\n")

    seen: list[tuple[int, int]] = []
    note = server.note

    def holding_note(body: dict, authorization: str):
        before = len(server.requests)  # labels counted so far (every request here is answered at once, and good)
        deadline = time.monotonic() + (3 if seen == [(k, k) for k in range(len(seen))] else 0)  # held once at most
        while synced_labels() < before and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append((before, synced_labels()))
        return note(body, authorization)

    monkeypatch.setattr(server, "note", holding_note)
    summary = run(fast_settings(tmp_path, server.base_url, concurrency=1, timeout=10.0))
    assert seen == [(k, k) for k in range(n)], seen  # label k on disk before the reply to request k+1 was sent
    assert summary.done == n and len(read_rows(out)) == n
    assert log.synced(FsyncLog.file_id(out)) == out.stat().st_size  # and all of them before the summary


@pytest.mark.slow
def test_killed_run_is_resumed_without_duplicates(tmp_path: Path) -> None:
    """SIGKILL a real `python -m healthai label` mid-way, cut its last line, rerun: every id exactly once."""
    n = 16
    faults = write_input(tmp_path / "in.jsonl", ["ok"] * n)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "HEALTHAI_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    env.pop("OPENAI_API_KEY", None)
    with FakeOpenAIServer(latency=0.25) as server:
        cmd = [
            sys.executable, "-m", "healthai", "label", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
            "--base_url", server.base_url, "--model", "m", "--concurrency", "2", "--timeout", "5",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 45
        while len(read_rows(out)) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no progress before the deadline"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        out1, err1 = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        written = len(read_rows(out))
        assert 3 <= written < n, "the run finished before it could be killed"
        with open(out, "a", encoding="utf-8") as f:  # the torn write a crash can leave
            f.write('{"id": 15, "feature_content": "性别')

        server.latency = 0.0
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert f"skipped {written}" in second.stdout
    done, failed = assert_each_id_once(out, failures_path_for(out), set(faults))
    assert done == set(faults) and not failed
    assert_no_key(tmp_path, out1.decode(), err1.decode(), second.stdout, second.stderr)


def test_help_lists_the_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exited:  # in-process: the same main() the shell's `python -m healthai` runs
        main(["label", "--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    for flag in ("--input", "--output", "--base_url", "--model", "--concurrency", "--max_retries", "--timeout",
                 "--temperature", "--max_tokens", "--json_mode", "--prompt_dir", "--limit"):  # fmt: skip
        assert flag in out
    assert "Requests kept in flight" in out  # the docstring reached the help
    assert KEY not in out + err


def test_key_echoed_in_a_401_body_appears_nowhere(
    tmp_path: Path, server: FakeOpenAIServer, capsys: pytest.CaptureFixture
) -> None:
    """OpenAI's own 401 says "Incorrect API key provided: sk-…"; the run stops on it, and neither its messages, the
    final "stopped early" line, the failures file nor the output hold the key."""
    write_input(tmp_path / "in.jsonl", ["auth_echo"] + ["ok"] * 5)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["label", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--base_url", server.base_url,
              "--model", "m", "--concurrency", "1", "--progress", "false"])  # fmt: skip
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert "stopped early: HTTP 401: Incorrect API key provided: ***." in captured.out
    assert server.requests[0].authorization == f"Bearer {KEY}"  # the server did get the real key
    failures = read_rows(failures_path_for(out))
    assert [r["id"] for r in failures] == [0] and "Incorrect API key provided: ***." in failures[0]["reason"]
    assert_no_key(tmp_path, captured.out, captured.err, str(info.value))


LONG_KEY = "sk-proj-" + "".join(f"{i:02d}Qz" for i in range(30))
"""A project key as OpenAI issues them today: over 100 characters, longer than the cuts of a preview (80) and of a
failure reason's server text (500) where it lands."""


def test_a_long_key_cut_by_a_message_leaks_no_piece_of_itself(
    tmp_path: Path, server: FakeOpenAIServer, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut by this project's own previews (scrubbed before the cut) or by the server itself (a piece of 12 or more
    characters is scrubbed wherever it appears): no stream or file holds any piece of the key."""
    monkeypatch.setenv("HEALTHAI_API_KEY", LONG_KEY)
    write_input(tmp_path / "in.jsonl", ["echo_key_long", "html_key", "key_cut"])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["label", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--base_url", server.base_url,
              "--model", "m", "--concurrency", "1", "--max_retries", "0", "--progress", "false"])  # fmt: skip
    assert info.value.code == 1
    assert server.requests[0].authorization == f"Bearer {LONG_KEY}"
    captured = capsys.readouterr()
    reasons = {r["id"]: r["reason"] for r in read_rows(failures_path_for(out))}
    assert "header was Bearer ***" in reasons[0]
    assert "gateway login for ***" in reasons[1]
    assert reasons[2] == "HTTP 401: Incorrect API key provided: ***"
    texts = [captured.out, captured.err, str(info.value)]
    texts += [p.read_text(encoding="utf-8") for p in tmp_path.rglob("*") if p.is_file()]
    secret = LONG_KEY[len("sk-proj-"):]
    pieces = {secret[i : i + 12] for i in range(len(secret) - 11)}
    assert not [piece for piece in pieces for text in texts if piece in text]


def test_redactor_scrubs_bearer_tokens_and_pieces_of_the_key() -> None:
    redact = Redactor(LONG_KEY)
    assert redact(f"cut: {LONG_KEY[:40]}") == "cut: ***"
    assert redact(f"{LONG_KEY[-30:]} and {LONG_KEY[50:70]} end") == "*** and *** end"
    assert redact("Authorization: Bearer some-other-token, then") == "Authorization: Bearer ***, then"
    assert redact(f"sk-proj- alone and {LONG_KEY[:11]}") == f"sk-proj- alone and {LONG_KEY[:11]}"  # under 12: kept
    assert redact.cut(f"{'x' * 70}{LONG_KEY}", 80) == f"{'x' * 70}***"


def test_a_429_pauses_every_worker(tmp_path: Path) -> None:
    """Rate limits belong to the key: after one record's 429 (Retry-After: 1) no worker sends anything for a second,
    though the other three had records ready (without the pause they would send one every 0.2 s)."""
    write_input(tmp_path / "in.jsonl", ["429"] + ["ok"] * 11)
    with FakeOpenAIServer(latency=0.2) as server:
        summary = run(fast_settings(tmp_path, server.base_url, concurrency=4))
        # The 429 leaves the server 0.2 s after its request came in; requests sent before it reached the client
        # may still arrive a little later, hence the margin at the start of the window.
        answered = server.attempts_for("429")[0].at + 0.2
        during_pause = [r for r in server.requests if answered + 0.25 < r.at < answered + 0.9]
    assert (summary.done, summary.failed) == (12, 0)
    assert not during_pause, f"{len(during_pause)} request(s) sent while the key was rate-limited"


def test_settings_are_checked_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="--concurrency: Not of type PositiveInt: 0 does not conform"):
        fast_settings(tmp_path, "http://127.0.0.1:9/v1", concurrency=0)
    with pytest.raises(SystemExit) as info:
        main(["label", "--input", "in.jsonl", "--output", "o.jsonl", "--base_url", "http://x/v1", "--model", "m",
              "--max_retries", "-1"])  # fmt: skip
    assert info.value.code == 2
    assert capsys.readouterr().err == ('healthai label: error: --max_retries: Not of type NonNegativeInt: '
                                       "-1 does not conform to restriction v>=0\n")


def test_sigterm_keeps_what_is_done_and_says_how_to_resume(tmp_path: Path) -> None:
    """A scheduler's SIGTERM to a real `python -m healthai label` mid-run: exit 143, every written row whole and
    fsync'ed, the summary says how to resume, and the rerun labels exactly the rest."""
    n = 40
    faults = write_input(tmp_path / "in.jsonl", ["ok"] * n)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "HEALTHAI_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    env.pop("OPENAI_API_KEY", None)
    with FakeOpenAIServer(latency=0.2) as server:
        cmd = [
            sys.executable, "-m", "healthai", "label", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
            "--base_url", server.base_url, "--model", "m", "--concurrency", "2", "--progress", "false",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(read_rows(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no progress before the deadline"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 143, stderr
        written = read_rows(out)  # every line parses: nothing torn
        assert 2 <= len(written) < n and out.read_bytes().endswith(b"\n")
        assert "stopped early: interrupted by SIGTERM" in stdout
        left = n - len(written)
        assert f"{len(written)} labels are saved in {out}; rerun the same command to label the {left} left" in stdout
        assert "Traceback" not in stderr

        server.latency = 0.0
        summary = run(fast_settings(tmp_path, server.base_url))
    assert (summary.done, summary.failed, summary.skipped) == (left, 0, len(written))
    done, failed = assert_each_id_once(out, failures_path_for(out), set(faults))
    assert done == set(faults) and not failed


def test_ctrl_c_stops_with_130(tmp_path: Path, server: FakeOpenAIServer, capsys: pytest.CaptureFixture) -> None:
    """SIGINT (Ctrl-C) in-process: the same clean stop, status 130, and what was written stays."""
    import threading

    n = 30
    write_input(tmp_path / "in.jsonl", ["ok"] * n)
    out = tmp_path / "out.jsonl"
    server.latency = 0.1

    def interrupt_after_two_rows() -> None:
        deadline = time.monotonic() + 30
        while len(read_rows(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, where the run's handler is

    threading.Thread(target=interrupt_after_two_rows, daemon=True).start()
    with pytest.raises(SystemExit) as info:
        label(fast_settings(tmp_path, server.base_url, concurrency=2))
    assert info.value.code == 130
    written = len(read_rows(out))
    assert 2 <= written < n
    assert f"rerun the same command to label the {n - written} left" in capsys.readouterr().out


def test_redactor_scrubs_url_encoded_keys_and_any_bearer() -> None:
    """#29 item 2: a key echoed URL-encoded (``%2F``, ``%2B``) is scrubbed, and ``Bearer …`` whatever the key."""
    import urllib.parse

    key = "sk-ab/cd+ef=gh ij"
    redact = Redactor(key)
    for form in (urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key), key):
        assert redact(f"GET /v1?api_key={form} 401") == "GET /v1?api_key=*** 401"
    assert Redactor("EMPTY")("Authorization: Bearer sk-ab7x") == "Authorization: Bearer ***"


def test_short_key_is_refused_before_any_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """#29 item 2: a key under 8 characters cannot be scrubbed safely, so it is never used: one line, no request."""
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-ab7x")
    write_input(tmp_path / "in.jsonl", ["ok"])
    with pytest.raises(MissingApiKeyError, match="7 characters, under 8") as caught:
        run(fast_settings(tmp_path, "http://127.0.0.1:9/v1"))
    assert "sk-ab7x" not in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out.jsonl").exists()
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-密钥-0123456789")  # #29 item 12: a non-ASCII key was a traceback
    with pytest.raises(MissingApiKeyError, match="non-ASCII") as caught:
        run(fast_settings(tmp_path, "http://127.0.0.1:9/v1"))
    assert "密钥" not in str(caught.value)


@pytest.mark.parametrize("overrides,message", [
    ({"temperature": -0.5}, "--temperature"),
    ({"temperature": 2.5}, "--temperature"),
    ({"base_url": "127.0.0.1:8000/v1"}, "--base_url 127.0.0.1:8000/v1: not an http:// or https:// URL"),
])  # fmt: skip
def test_label_options_out_of_range_are_refused_at_start(tmp_path: Path, overrides: dict, message: str) -> None:
    """#29 item 12: a temperature out of [0, 2] was sent unchecked, a URL without a scheme retried for seconds."""
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        fast_settings(tmp_path, overrides.pop("base_url", "http://127.0.0.1:9/v1"), **overrides)
    assert "\n" not in str(caught.value)


def label_main(argv: list[str], capfd: pytest.CaptureFixture) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``python -m healthai label ARGV`` through the real entry point, in process."""
    with pytest.raises(SystemExit) as info:
        main(["label", *argv])
    return info.value.code, capfd.readouterr().err


def test_a_second_run_on_one_output_is_refused_naming_the_holders_pid(tmp_path: Path, server: FakeOpenAIServer,
                                                                      capfd: pytest.CaptureFixture) -> None:  # fmt: skip
    """Two runs on one --output once both labelled everything (115 rows for 60 ids, #29 item 3)."""
    write_input(tmp_path / "in.jsonl", ["ok"] * 3)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 0, "feature_content": "x", "diseases": "d", "reason": "r"}\n{"id": 1, "feat', "utf-8")
    before = out.read_bytes()
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--base_url", server.base_url,
            "--model", "m", "--progress", "false"]  # fmt: skip
    with output_locked_by_another_process(out) as pid:
        code, err = label_main(argv, capfd)
    assert (code, err) == (2, f"healthai label: error: --output {out} is being written by process {pid} (lock "
                              f"{out}.lock); wait for it to finish or stop it, then rerun to resume, or choose another "
                              "output\n")  # fmt: skip
    assert out.read_bytes() == before and server.requests == []  # refused before any work: not even the torn line cut
    # The holder was killed (SIGKILL): the kernel dropped its lock, and the next run takes over and cleans up.
    summary = run(fast_settings(tmp_path, server.base_url))
    assert (summary.done, summary.skipped) == (2, 1)
    assert sorted(r["id"] for r in read_rows(out)) == [0, 1, 2] and not (tmp_path / "out.jsonl.lock").exists()


def test_a_repeated_id_in_the_output_is_an_error_on_rerun(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """An output holding an id twice (5 and "5": one record) was resumed as "skipped", duplicates kept (#29 item 3)."""
    write_input(tmp_path / "in.jsonl", ["ok"] * 6)
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": i, "feature_content": "x", "diseases": "d", "reason": "r"}
                                               for i in (5, 0, "5")])  # fmt: skip
    code, err = label_main(["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--base_url",
                            "http://127.0.0.1:9/v1", "--model", "m", "--progress", "false"], capfd)  # fmt: skip
    assert (code, err) == (2, f"healthai label: error: {out}:3: repeated id '5' (first at {out}:1): a repeated id is "
                              "always an error; keep one of the two rows, then rerun\n")  # fmt: skip
    assert not (tmp_path / "out.jsonl.lock").exists()  # the refusal released and removed the lock
