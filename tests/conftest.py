"""Shared fixtures: the small offline model, real seed records, and labelled records written to tmp files."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Everything the tests read is committed under tests/fixtures/ (see its README): a clone needs nothing beside it.
FIXTURES = REPO / "tests" / "fixtures"
SEED_RECORDS = FIXTURES / "seed_records.jsonl"
EXAMPLE_OUTPUT = FIXTURES / "example_output.jsonl"
GOLDEN = FIXTURES / "golden_chat_template.json"


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh runs 2 workers on the 2 cores CI has), each worker and the processes its
    tests start compute on one thread: two workers of N threads each on N cores oversubscribe them, and OpenMP
    threads spin (burning CPU time) while they wait for a descheduled peer. Tests that compare a run with another
    process's set their threads themselves, as before. Tokenizers of an unchanged folder load once per process
    (:class:`SharedTokenizers`)."""
    SharedTokenizers.install()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI subprocesses (DDP ranks, serve, predict)
        torch.set_num_threads(1)


class SharedTokenizers:
    """``AutoTokenizer.from_pretrained`` of a folder whose tokenizer files are unchanged returns the object it loaded
    before, in this test process.

    Loading the Qwen2.5 tokenizer takes about 0.8 s (transformers parses its 11 MB ``tokenizer.json`` in Python), and
    the suite's commands load the small model's about 110 times: a quarter of the suite's CPU time, spent reading the
    same files. The commands' code is unchanged (they call ``from_pretrained`` as on a GPU); only this process's
    loader answers from memory. A folder is the same when its path, the arguments and every tokenizer file's size and
    modification time are; anything else (another folder, a rewritten file, a hub id, a missing folder) loads as
    usual. healthai never changes a tokenizer it loaded; a test that does so loads its own (:meth:`load_uncached`),
    and one that forgets is caught here: a tokenizer whose template, special tokens, sides, length or vocabulary size
    changed is not handed out again but loaded afresh. Processes the tests start load their own."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "added_tokens.json", "vocab.json", "merges.txt")  # fmt: skip
    _loaded: dict = {}
    load_uncached = None
    """The real ``AutoTokenizer.from_pretrained``."""

    @classmethod
    def install(cls) -> None:
        from transformers import AutoTokenizer

        if cls.load_uncached is not None:
            return
        cls.load_uncached = AutoTokenizer.from_pretrained
        AutoTokenizer.from_pretrained = cls.load

    @staticmethod
    def _state(tokenizer) -> tuple:
        return (tokenizer.chat_template, repr(tokenizer.special_tokens_map), tokenizer.padding_side,
                tokenizer.truncation_side, tokenizer.model_max_length, len(tokenizer))  # fmt: skip

    @classmethod
    def _key(cls, source, kwargs: dict) -> tuple | None:
        folder = Path(source) if isinstance(source, (str, Path)) else None
        if folder is None or not folder.is_dir():
            return None
        files = tuple((name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns)
                      for name in cls.FILES if (folder / name).is_file())  # fmt: skip
        return str(folder.resolve()), repr(sorted(kwargs.items())), files

    @classmethod
    def load(cls, *args, **kwargs):
        key = cls._key(args[0], kwargs) if len(args) == 1 else None
        if key is None:
            return cls.load_uncached(*args, **kwargs)
        source = args[0]
        if key in cls._loaded:
            tokenizer, state = cls._loaded[key]
            if cls._state(tokenizer) == state:
                return tokenizer
        tokenizer = cls.load_uncached(source, **kwargs)
        cls._loaded[key] = tokenizer, cls._state(tokenizer)
        return tokenizer


DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                   "GROUP_RANK")  # fmt: skip
"""What a process group reads from the environment."""


@pytest.fixture(autouse=True)
def _no_process_group_env_from_earlier_tests(monkeypatch):
    """Each test starts without a process group's variables. An in-process run under a distributed strategy leaves
    ``MASTER_PORT`` & co in ``os.environ``; a later test's DDP subprocesses would inherit that port and fail with
    EADDRINUSE while it is still held."""
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _fast_lightning_parser_after_a_dataclass_command():
    """``healthai.__main__`` turns on jsonargparse's attribute-docstring parsing (a process-wide setting) to show a
    dataclass command's field docs (label, serve). A shell runs one command per process; a test process runs
    hundreds, and with the setting left on every later LightningCLI parse reads the source of each class it parses:
    about 1 s more each on the test machine (0.2 s without). Put back what the test found."""
    from jsonargparse import set_parsing_settings
    from jsonargparse._optionals import get_docstring_parse_options

    before = get_docstring_parse_options()["attribute_docstrings"]
    yield
    set_parsing_settings(docstring_parse_attribute_docstrings=before)


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
    """Starts commands as real processes forked from one pre-imported interpreter (tests/forkserver.py says how and
    what differs from a fresh one): an interpreter start costs 5-6 s of CPU here, a fork a few milliseconds."""

    def __init__(self):
        self._log = tempfile.NamedTemporaryFile(prefix="forkserver-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py")], cwd=REPO, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)  # fmt: skip
        self._children: list[Forked] = []

    def ask(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended: {Path(self._log.name).read_text()[-4000:]}")
        return json.loads(line)

    def start(self, argv: list[str], *, env: dict | None = None, cwd: Path = REPO, stdout: Path | None = None,
              stderr: Path | str | None = None, new_session: bool = False) -> Forked:  # fmt: skip
        """``python *argv`` as ``subprocess.Popen`` would start it; ``stdout``/``stderr`` are files (``None``: discarded;
        ``stderr="stdout"``: into stdout's file). ``env`` defaults to this process's, with the repository importable."""
        env = dict(os.environ, PYTHONPATH=str(REPO)) if env is None else env
        request = {"op": "start", "argv": [str(a) for a in argv], "env": env, "cwd": str(cwd),
                   "stdout": None if stdout is None else str(stdout),
                   "stderr": stderr if stderr in (None, "stdout") else str(stderr), "new_session": new_session}  # fmt: skip
        child = Forked(self, self.ask(request)["pid"], request["argv"])
        self._children.append(child)
        return child

    def run(self, argv: list[str], *, env: dict | None = None, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
        """``subprocess.run(["python", *argv], capture_output=True, text=True, timeout=timeout)``."""
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            child = self.start(argv, env=env, cwd=cwd, stdout=out, stderr=err)
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
        import socket

        with socket.socket() as sock:  # a free port for the group's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as folder:
            ranks = []
            for rank in range(nprocs):
                env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs))  # fmt: skip
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
            results = [subprocess.CompletedProcess(c.args, c.returncode, o.read_text(), e.read_text()) for c, o, e in ranks]
        for rank, result in enumerate(results):
            assert result.returncode == 0, f"rank {rank}: " + result.stdout[-2000:] + result.stderr[-4000:]
        return results

    def close(self) -> None:
        for child in self._children:  # what a failed test left running
            if child.poll() is None:
                child.kill()
                child.wait()
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        os.unlink(self._log.name)


@pytest.fixture(scope="session")
def forkserver():
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The small random-weight Qwen2.5-architecture model, rebuilt first if its builder changed since it was written
    (a hash stamp; cheap when current). Configs such as configs/tiny.yaml point at this folder too."""
    path = REPO / "models" / "tiny-qwen2.5"
    path.parent.mkdir(exist_ok=True)
    # One builder at a time: parallel test workers (pytest-xdist) would otherwise both rebuild a stale folder, one
    # writing the files the other is reading. The second waits, then finds the folder current.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--out", str(path), "--if_stale"],
                       check=True)  # fmt: skip
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def seed_records(n: int, offset: int = 0) -> list[dict]:
    """``n`` real case records (id, feature_content) from the committed fixture, starting at ``offset``."""
    out = []
    with open(SEED_RECORDS, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if len(out) == n:
                break
            out.append(json.loads(line))
    if len(out) < n:
        raise ValueError(f"{SEED_RECORDS} holds too few records for seed_records({n}, offset={offset})")
    return out


# Short made-up labels for real records: enough for the small model to overfit.
LABELS = [
    ("慢性乙型病毒性肝炎", "1. 乙肝阳性；2. HBV DNA阳性。"),
    ("2型糖尿病；高血压", "1. 血糖升高多年；2. 有高血压病史。"),
    ("急性上呼吸道感染", "1. 咽痛咳嗽；2. 无发热。"),
    ("胃炎", "1. 上腹痛；2. 反酸。"),
]


def labelled_records(n: int, offset: int = 0) -> list[dict]:
    """Real seed records with made-up short labels."""
    rows = []
    for i, r in enumerate(seed_records(n, offset)):
        diseases, reason = LABELS[i % len(LABELS)]
        rows.append({"id": r["id"], "feature_content": r["feature_content"], "diseases": diseases, "reason": reason})
    return rows


def built_on_one_thread(module):
    """For a module-scoped fixture: ``module`` (a ``DiagnosisLoRA``) built as predict builds it, in eval mode, with
    torch on one thread while the tests use it (on a busy shared CPU a second OpenMP thread makes the small model's
    ops wait), the thread count put back after. ``yield from`` it."""
    import torch

    module.configure_model()
    module.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield module
    finally:
        torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

