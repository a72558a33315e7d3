"""Start ``python -m healthai …`` (or a test script) without paying for its imports each time.

A command's own work on the small model takes a second or two; starting the interpreter that runs it takes 5-6 s of
CPU here, nearly all of it ``import lightning.pytorch`` (torch, torch._dynamo, torchmetrics, scipy), and a DDP or
FSDP launch pays it once per rank. The tests that need a real process (signals, exit statuses, one process per rank)
start one from a *fork server*: one Python process for the session (both test workers connect to it) that imports
what the commands import, once, and then forks a child per command. The child is a real process with its own pid,
environment, working folder, stdout and stderr files; it runs the same ``healthai.__main__`` (through :mod:`runpy`, as
``-m`` does) and ends as the interpreter ends (its exit status, non-daemon threads joined, atexit handlers run,
standard streams flushed, death by SIGINT after an uncaught KeyboardInterrupt) but without tearing down every
preloaded module, which costs a forked child 2.4-4 s of CPU here: as ``python -m healthai`` ends
(healthai/fast_exit.py). Signal behaviour is a fresh process's.

What differs from a fresh interpreter, and why it does not matter to what the tests check:

* The modules are imported before the child's environment is set, so a variable read *at import time* would see
  the server's environment (the test worker's). The commands read theirs at run time. OpenMP reads
  ``OMP_NUM_THREADS`` when torch loads: the child sets the thread count its own environment asks for.
* The server never runs a tensor operation or opens a process group before forking: the child starts with no
  thread pool and no sockets of its parent's, as a fresh process does.
* The small model's tokenizer is loaded, and its answer grammar compiled, in the server (:func:`_preload_tokenizers`):
  a child's ``from_pretrained`` of that unchanged folder returns the loaded object, as in the test processes
  (tests/shared_tokenizers.py), and its grammar is found compiled. Any other folder (an adapter's copy, a node's
  own base) loads from its files. A test of what a fresh process prints while loading asks for ``preloaded=False``.

The protocol is one JSON object per line on a connection to the server's socket (a Linux abstract socket named after
the session's base temporary folder), answered by one line:
``{"op": "start", "argv", "env", "cwd", "stdout", "stderr", "new_session", "preloaded"}`` → ``{"pid"}``, and
``{"op": "poll", "pid"}`` → ``{"returncode"}`` (``null`` while it runs). ``{"op": "exit"}`` (the session's end) or
the end of the session's process ends the server.

This module is both sides: run as a script it is the server (:func:`serve`); imported (by ``tests/conftest.py``'s
``forkserver`` fixture) it gives the tests :class:`ForkServer` and the ``Popen``-like :class:`Forked`.
"""

from __future__ import annotations

import atexit
import fcntl
import gc
import hashlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from healthai import fast_exit
from shared_tokenizers import SharedTokenizers

REPO = Path(__file__).resolve().parents[1]

PRELOAD = ("lightning.pytorch", "transformers.models.qwen2.modeling_qwen2", "peft", "xgrammar",
           "torch.distributed.fsdp")  # fmt: skip
"""What the commands import besides ``healthai`` itself (every module of which is loaded): each child starts with
them in ``sys.modules``."""


def _preload(tokenizer_folders: list[str]) -> None:
    import_what_commands_import()
    _preload_tokenizers(tokenizer_folders)


def import_what_commands_import() -> None:
    """Every ``healthai`` module and :data:`PRELOAD`."""
    import importlib
    import pkgutil

    import healthai

    for module in pkgutil.iter_modules(healthai.__path__):
        if module.name != "__main__":  # run by each child, as ``-m`` runs it
            importlib.import_module(f"healthai.{module.name}")
    for name in PRELOAD:
        importlib.import_module(name)


def _preload_tokenizers(folders: list[str]) -> None:
    """Each folder's tokenizer and the copy of it fit saves beside an adapter (``save_pretrained``, as
    ``healthai.adapter_saver`` does), loaded through :class:`~shared_tokenizers.SharedTokenizers` (which the children
    keep: their ``from_pretrained`` of a folder holding the same files returns one of these objects, as in the test
    processes), and the answer grammar compiled for each and the model's vocabulary (``healthai.decoding`` keeps it
    per tokenizer object). A command's start then costs the fork, not the ~1 s of parsing ``tokenizer.json`` and
    ~1.4 s of compiling over the 152k vocabulary it would cost a fresh process. Neither runs a tensor operation nor
    leaves a thread behind (xgrammar's compiler joins its threads when it is freed, below)."""
    from transformers import AutoConfig, AutoTokenizer

    from healthai.decoding import JsonConstraint
    from healthai.encoding import end_of_turn_id

    SharedTokenizers.install()
    for folder in folders:
        vocab_size = AutoConfig.from_pretrained(folder).vocab_size
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with tempfile.TemporaryDirectory() as saved:
            tokenizer.save_pretrained(saved)
            for loaded in (tokenizer, AutoTokenizer.from_pretrained(saved)):
                JsonConstraint(loaded, vocab_size, end_of_turn_id(loaded))


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
    if not request.get("preloaded", True):
        SharedTokenizers.forget()  # load the tokenizer (and compile its grammar) as a fresh process does
    sys.stdin = open(0, closefd=False)  # the server's stdin buffer held its requests, not the command's input
    argv = request["argv"]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has it
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy sets argv[0] to the module's file, as -m does
        sys.path[0] = os.getcwd()  # the working folder first, as ``python -m``
        status = fast_exit.run(lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True))
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # a script's folder first, as ``python script``
        status = fast_exit.run(lambda: runpy.run_path(argv[0], run_name="__main__"))
    # Threads joined, atexit handlers run, streams flushed, then out without the module teardown that costs a forked
    # child 2.4-4 s of CPU here (healthai/fast_exit.py).
    fast_exit.finish(status)


def load_uncollected() -> None:
    """No garbage collection until :func:`freeze_what_is_loaded`: importing torch, transformers and lightning builds
    ~600k long-lived objects, and the collector walked all of them again at each of the ~8 full collections those
    imports trigger (1.5-2 s of a process's start)."""
    gc.disable()


def freeze_what_is_loaded() -> None:
    """The objects alive now (the imported modules': ~600k) out of the garbage collector's sight (:func:`gc.freeze`):
    a full collection walked them every time, 0.3 s each. In the fork server's children it also spares the
    copy-on-write of every page they live on. What is created later is collected as before; at exit they are
    collectable again, so that the interpreter's last collection frees them as it would have (nanobind, which
    xgrammar and triton use, reports every object of its own still alive then as leaked)."""
    gc.collect()
    gc.freeze()
    gc.enable()
    atexit.register(gc.unfreeze)


def serve(address: str, session_pid: int, tokenizer_folders: list[str]) -> None:
    """Answer every test process of the session that connects to ``address``; end when asked (``{"op": "exit"}``)
    or when the process ``session_pid`` is gone (a session killed before it could ask)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\0" + address)  # first: a test process that connects now waits for the replies, not for the bind
    listener.listen()
    load_uncollected()
    _preload(tokenizer_folders)
    freeze_what_is_loaded()
    clients = selectors.DefaultSelector()
    clients.register(listener, selectors.EVENT_READ)
    while True:
        ready = clients.select(timeout=1.0)
        if not ready and not _alive(session_pid):
            return
        for key, _ in ready:
            if key.fileobj is listener:
                connection, _ = listener.accept()
                clients.register(connection, selectors.EVENT_READ, connection.makefile("rb"))
                continue
            # One request at a time per client (each waits for its reply), so a readable client has one whole line.
            line = key.data.readline()
            if not line:  # that test process has ended
                clients.unregister(key.fileobj)
                _close(key)
                continue
            request = json.loads(line)
            if request["op"] == "exit":
                return
            key.fileobj.sendall((json.dumps(_answer(request, clients)) + "\n").encode())


def _answer(request: dict, clients: selectors.BaseSelector) -> dict:
    if request["op"] == "start":
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for key in list(clients.get_map().values()):  # the server's sockets are not the command's
                _close(key)
            clients.close()
            _child(request)
        return {"pid": pid}
    done, status = os.waitpid(request["pid"], os.WNOHANG)  # "poll"
    return {"returncode": os.waitstatus_to_exitcode(status) if done else None}


def _close(key: selectors.SelectorKey) -> None:
    if key.data is not None:
        key.data.close()  # the socket's file: its descriptor stays open while this is
    key.fileobj.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the tests' side -------------------------------------------------------------------------------------------------


class Forked:
    """A command started by :class:`ForkServer`: the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]):
        self.server, self.pid, self.args, self.returncode = server, pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The test's side: starts commands as real processes forked from one pre-imported interpreter (this module's
    docstring says how and what differs from a fresh one): an interpreter start costs 5-6 s of CPU here, a fork a few
    milliseconds. One server serves the session's test processes (both pytest-xdist workers): the first to need it
    starts it; it ends with :func:`stop_server` at the session's end, or by itself when the session's process is
    gone."""

    def __init__(self, folder: Path, session_pid: int, tokenizer_folders: tuple[Path, ...] = ()):
        """``folder``: the session's own folder (its base temporary folder), where the server's log is written and
        which names the server; ``session_pid``: the process that ends the session (the xdist controller, or this
        process); ``tokenizer_folders``: tokenizers the children find loaded, and their grammar compiled
        (:func:`_preload_tokenizers`)."""
        self._log = Path(folder) / "forkserver.log"
        self._children: list[Forked] = []
        with open(Path(folder) / "forkserver.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter: the other worker waits, then connects to that server
            self._sock = _connect(server_address(folder))
            if self._sock is None:
                self._sock = _start_server(folder, session_pid, tokenizer_folders, self._log)
        self._replies = self._sock.makefile("rb")

    def ask(self, request: dict) -> dict:
        self._sock.sendall((json.dumps(request) + "\n").encode())
        line = self._replies.readline()
        if not line:
            raise RuntimeError(f"the fork server ended: {self._log.read_text()[-4000:]}")
        return json.loads(line)

    def start(self, argv: list[str], *, env: dict | None = None, cwd: Path = REPO, stdout: Path | None = None,
              stderr: Path | str | None = None, new_session: bool = False, preloaded: bool = True) -> Forked:  # fmt: skip
        """``python *argv`` as ``subprocess.Popen`` would start it; ``stdout``/``stderr`` are files (``None``:
        discarded; ``stderr="stdout"``: into stdout's file). ``env`` defaults to this process's, with the repository
        importable. ``preloaded=False``: the child loads its tokenizers from their files, as a fresh process."""
        env = dict(os.environ, PYTHONPATH=str(REPO)) if env is None else env
        request = {"op": "start", "argv": [str(a) for a in argv], "env": env, "cwd": str(cwd),
                   "stdout": None if stdout is None else str(stdout),
                   "stderr": stderr if stderr in (None, "stdout") else str(stderr),
                   "new_session": new_session, "preloaded": preloaded}  # fmt: skip
        child = Forked(self, self.ask(request)["pid"], request["argv"])
        self._children.append(child)
        return child

    def run(self, argv: list[str], *, env: dict | None = None, cwd: Path = REPO, timeout: float = 300,
            preloaded: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
        """``subprocess.run(["python", *argv], capture_output=True, text=True, timeout=timeout)``."""
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            child = self.start(argv, env=env, cwd=cwd, stdout=out, stderr=err, preloaded=preloaded)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise
            return subprocess.CompletedProcess(child.args, child.returncode, out.read_text(), err.read_text())

    def run_ranks(self, argv: list[str], nprocs: int = 2, timeout: float = 300) -> list[subprocess.CompletedProcess]:
        """``python *argv`` as ``nprocs`` processes of one process group on this machine, started as Lightning's
        launcher starts the ranks after the first (``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``/``LOCAL_RANK``/
        ``WORLD_SIZE``; the strategy sees processes created externally and launches none). One thread each. Every
        rank must exit 0; returns each rank's result, rank 0 first."""
        with socket.socket() as sock:  # a free port for the group's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as folder:
            ranks = []
            for rank in range(nprocs):
                env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                           WORLD_SIZE=str(nprocs))  # fmt: skip
                out, err = Path(folder) / f"stdout{rank}", Path(folder) / f"stderr{rank}"
                ranks.append((self.start(argv, env=env, stdout=out, stderr=err), out, err))
            deadline = time.monotonic() + timeout
            codes = [None]
            while None in codes and not any(codes) and time.monotonic() < deadline:
                time.sleep(0.02)
                codes = [child.poll() for child, _, _ in ranks]
            for child, _, _ in ranks:  # a rank that failed (or hung) leaves its peers waiting for it: stop them
                if child.poll() is None:
                    child.kill()
                    child.wait()
            timed_out = time.monotonic() >= deadline
            results = [subprocess.CompletedProcess(c.args, c.returncode, o.read_text(), e.read_text())
                       for c, o, e in ranks]  # fmt: skip
        for rank, result in enumerate(results):
            status = f"timed out after {timeout} s" if timed_out else f"exit status {result.returncode}"
            assert result.returncode == 0, f"rank {rank}, {status}: " + result.stdout[-2000:] + result.stderr[-4000:]
        return results

    def close(self) -> None:
        """Stop what this process's tests left running; the server goes on serving the session."""
        for child in self._children:  # what a failed test left running
            if child.poll() is None:
                child.kill()
                child.wait()
        self._replies.close()
        self._sock.close()


def server_address(folder: Path) -> str:
    """The name of the session's server: a Linux abstract socket (``"\\0" + name``) named after ``folder`` (no file
    to clean up, no path length limit)."""
    return "healthai-forkserver-" + hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]


def _connect(address: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect("\0" + address)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    return sock


def _start_server(folder: Path, session_pid: int, tokenizer_folders: tuple[Path, ...], log: Path) -> socket.socket:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    address = server_address(folder)
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, __file__, address, str(session_pid), *map(str, tokenizer_folders)],
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)  # fmt: skip
    deadline = time.monotonic() + 120
    while (sock := _connect(address)) is None:  # it binds before it imports
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the fork server did not start: {log.read_text()[-4000:]}")
        time.sleep(0.02)
    return sock


def stop_server(folder: Path) -> None:
    """End the session's server, if one was started."""
    sock = _connect(server_address(folder))
    if sock is not None:
        with sock:
            sock.sendall(b'{"op": "exit"}\n')


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
    os._exit(0)  # without tearing down the preloaded modules (2-4 s of CPU); its children are on their own
