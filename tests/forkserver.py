"""Start ``python -m healthai …`` (or a test script) without paying for its imports each time.

A command's own work on the small model takes a second or two; starting the interpreter that runs it takes 5-6 s of
CPU here, nearly all of it ``import lightning.pytorch`` (torch, torch._dynamo, torchmetrics, scipy), and a DDP or
FSDP launch pays it once per rank. The tests that need a real process (signals, exit statuses, one process per rank)
start one from a *fork server*: one Python process per test worker that imports what the commands import, once, and
then forks a child per command. The child is a real process with its own pid, environment, working folder, stdout
and stderr files; it runs the same ``healthai.__main__`` (through :mod:`runpy`, as ``-m`` does) and exits through
the interpreter's normal shutdown, so its exit status, atexit handlers and signal behaviour are a fresh process's.

What differs from a fresh interpreter, and why it does not matter to what the tests check:

* The modules are imported before the child's environment is set, so a variable read *at import time* would see
  the server's environment. The commands read theirs at run time; the server is started with the test worker's
  environment (``OMP_NUM_THREADS=1`` included, which OpenMP reads when torch loads).
* The server never runs a tensor operation or opens a process group before forking: the child starts with no
  thread pool and no sockets of its parent's, as a fresh process does.

The protocol is one JSON object per line on the server's stdin, answered by one line on its stdout:
``{"op": "start", "argv", "env", "cwd", "stdout", "stderr", "new_session"}`` → ``{"pid"}``, and
``{"op": "poll", "pid"}`` → ``{"returncode"}`` (``null`` while it runs). The server exits when its stdin closes.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys

PRELOAD = ("lightning.pytorch", "transformers.models.qwen2.modeling_qwen2", "peft", "xgrammar",
           "torch.distributed.fsdp", "tensorboard.backend.event_processing.event_accumulator")  # fmt: skip
"""What the commands import besides ``healthai`` itself (every module of which is loaded): each child starts with
them in ``sys.modules``."""


def _preload() -> None:
    import importlib
    import pkgutil

    import healthai

    for module in pkgutil.iter_modules(healthai.__path__):
        if module.name != "__main__":  # run by each child, as ``-m`` runs it
            importlib.import_module(f"healthai.{module.name}")
    for name in PRELOAD:
        importlib.import_module(name)


def _threads_as_at_start() -> None:
    """OpenMP reads ``OMP_NUM_THREADS`` when torch loads, which for the child was in the server: set the count a fresh
    interpreter with the child's environment would start with."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))


def _child(request: dict) -> None:
    """Become the command: its folder, environment, standard streams and argv, then run it as ``python`` would. Never
    returns normally: the command's ``SystemExit`` (or an exception's traceback and status 1) ends the process."""
    if request.get("new_session"):
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, target in ((1, request["stdout"]), (2, request["stderr"])):
        if target == "stdout":
            os.dup2(1, 2)
        else:
            out = os.open(target or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
    os.close(devnull)
    _threads_as_at_start()
    sys.stdin = open(0, closefd=False)  # the server's stdin buffer held its requests, not the command's input
    argv = request["argv"]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has it
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy sets argv[0] to the module's file, as -m does
        sys.path[0] = os.getcwd()  # the working folder first, as ``python -m``
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # a script's folder first, as ``python script``
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


def serve() -> None:
    _preload()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                replies.close()
                _child(request)
            replies.write(json.dumps({"pid": pid}) + "\n")
        elif request["op"] == "poll":
            done, status = os.waitpid(request["pid"], os.WNOHANG)
            code = os.waitstatus_to_exitcode(status) if done else None
            replies.write(json.dumps({"returncode": code}) + "\n")


if __name__ == "__main__":
    serve()
