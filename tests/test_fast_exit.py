"""``python -m healthai`` ends through :mod:`healthai.fast_exit`: what the interpreter's own exit does before it tears
down the loaded modules is done the same way (exit status, a message or a traceback on stderr, non-daemon threads
joined, atexit handlers, Python's and C's buffered standard output), and the teardown is skipped. Each case runs a
small program twice in a fresh interpreter, once ending as Python ends it and once through the fast exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO

PROGRAM = """\
import atexit, ctypes, os, sys, threading, time

case, fast = sys.argv[1], sys.argv[3] == "fast"
LOG = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND)


def log(word, write=os.write, fd=LOG):  # bound now: the module's names are gone when the teardown finalizes
    write(fd, word.encode() + b"\\n")


class Finalized:
    def __del__(self, log=log):
        log("teardown")


kept = Finalized()  # alive until the interpreter tears the modules down


def program():
    atexit.register(log, "atexit")
    threading.Thread(target=lambda: (time.sleep(0.1), log("thread"))).start()  # still running at the end
    print("python stdout")  # into a pipe: block-buffered, still in the buffer at the end
    ctypes.CDLL(None).printf(b"c stdout\\n")  # C's stdio buffer, also block-buffered into a pipe
    if case == "exit 3":
        sys.exit(3)
    if case == "exit message":
        sys.exit("bad input")
    if case == "exception":
        raise ValueError("boom")
    if case == "ctrl-c":
        raise KeyboardInterrupt


if fast:
    from healthai.fast_exit import run_then_exit

    run_then_exit(program)
else:
    program()
"""


def end(tmp_path, case: str, how: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    program, log = tmp_path / "program.py", tmp_path / f"{how}.log"
    program.write_text(PROGRAM, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONUNBUFFERED", None)  # output into a pipe buffered, as by default
    result = subprocess.run([sys.executable, str(program), case, str(log), how], capture_output=True, text=True,
                            env=env, timeout=60)  # fmt: skip
    return result, log.read_text().splitlines()


@pytest.mark.parametrize(
    "case, status, stderr_end",
    [("return", 0, ""), ("exit 3", 3, ""), ("exit message", 1, "bad input"), ("exception", 1, "ValueError: boom"),
     ("ctrl-c", -signal.SIGINT, "KeyboardInterrupt")],  # fmt: skip
)
def test_the_fast_exit_ends_a_program_as_the_interpreter_does_less_the_module_teardown(tmp_path, case, status,
                                                                                       stderr_end):  # fmt: skip
    plain, plain_log = end(tmp_path, case, "plain")
    fast, fast_log = end(tmp_path, case, "fast")
    assert plain.returncode == fast.returncode == status
    assert plain.stdout == fast.stdout == "python stdout\nc stdout\n"
    for result in (plain, fast):
        assert result.stderr.rstrip("\n").endswith(stderr_end), result.stderr
        assert result.stderr.startswith("Traceback") == (case in ("exception", "ctrl-c")), result.stderr
    # Threads joined before the atexit handlers run, as at any exit; the teardown that finalizes what is still alive
    # is what the fast exit leaves out.
    assert plain_log == ["thread", "atexit", "teardown"]
    assert fast_log == ["thread", "atexit"]
