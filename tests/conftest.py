"""Shared fixtures: the small offline model, real seed records, and labelled records written to tmp files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forkserver import (REPO, ForkServer, freeze_what_is_loaded, import_what_commands_import, load_uncollected,
                        stop_server)
from healthai import fast_exit
from shared_tokenizers import SharedTokenizers

# Everything the tests read is committed under tests/fixtures/ (see its README): a clone needs nothing beside it.
FIXTURES = REPO / "tests" / "fixtures"
SEED_RECORDS = FIXTURES / "seed_records.jsonl"
EXAMPLE_OUTPUT = FIXTURES / "example_output.jsonl"
GOLDEN = FIXTURES / "golden_chat_template.json"

pytest_plugins = ["file_costs"]  # the order the files run in (tests/file_costs.py)


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh runs 2 workers on the 2 cores CI has), each worker and the processes its
    tests start compute on one thread: two workers of N threads each on N cores oversubscribe them, and OpenMP
    threads spin (burning CPU time) while they wait for a descheduled peer. Tests that compare a run with another
    process's set their threads themselves, as before. Tokenizers of an unchanged folder load once per process
    (:class:`SharedTokenizers`)."""
    if is_xdist_controller(config):  # it runs no test: none of this is its business
        return
    load_uncollected()  # until the test modules are imported (pytest_collection_finish)
    SharedTokenizers.install()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI subprocesses (DDP ranks, serve, predict)
        torch.set_num_threads(1)


def pytest_collection_finish(session):
    """Once the test modules (and with them torch, transformers, lightning and healthai) are imported, with what the
    commands import lazily (as the fork server does), their objects leave the garbage collector's sight (about 25
    full collections per worker over the suite walked them: 10 s of CPU a worker)."""
    import_what_commands_import()
    freeze_what_is_loaded()


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


@pytest.fixture(scope="session")
def forkserver(tiny_model_dir, tmp_path_factory):
    """The session's :class:`forkserver.ForkServer`, started at the first use by either worker, with the small
    model's tokenizer preloaded. It serves both workers, and ends with the session (:func:`pytest_unconfigure`)."""
    folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # its base folder is in the controller's, which owns the session
        folder, session_pid = folder.parent, os.getppid()
    else:
        session_pid = os.getpid()
    server = ForkServer(folder, session_pid, tokenizer_folders=(tiny_model_dir,))
    yield server
    server.close()
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        stop_server(folder)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The xdist controller ends the session's fork server once both workers are done. A worker, its results sent
    (xdist sends them as its session finishes), leaves as ``python -m healthai`` does, without the teardown of the
    modules it imported (healthai/fast_exit.py): the controller waits for both exits, 3 s at the end of every run."""
    if is_xdist_controller(config):
        stop_server(config._tmp_path_factory.getbasetemp())
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        fast_exit.finish(0)


def is_xdist_controller(config) -> bool:
    """Whether this process hands the tests to pytest-xdist workers rather than running them."""
    return bool(getattr(config.option, "numprocesses", None)) and not os.environ.get("PYTEST_XDIST_WORKER")


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


@contextlib.contextmanager
def output_locked_by_another_process(output: Path, option: str = "--output"):
    """A second process (a plain interpreter, not a fork: a real other pid) holding ``output``'s lock
    (:class:`healthai.output_lock.OutputLock`) until the block ends; yields its pid."""
    code = ("import sys; from healthai.output_lock import OutputLock; "
            "OutputLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); sys.stdin.read()")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(output), option], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def disk_full_after(n_bytes: int):
    """Inside the block, every file :mod:`healthai.atomic` writes takes ``n_bytes`` bytes, then fails with ENOSPC
    (``No space left on device``) in the middle of a write, as a full disk does."""
    import errno

    from healthai import atomic

    real_fdopen = os.fdopen

    class Filling:
        def __init__(self, f):
            self._f, self._left = f, n_bytes

        def write(self, data):
            if len(data) > self._left:
                self._f.write(data[: self._left])  # what fitted: the file on disk is torn here
                self._f.flush()
                self._left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._left -= len(data)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(atomic.os, "fdopen", lambda *args, **kwargs: Filling(real_fdopen(*args, **kwargs)))
        yield


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class FsyncLog:
    """``os.fsync`` observed: each call's file (device and inode, so a file renamed or removed after is still known)
    and its size when the fsync returned, in order with the events a test notes (:meth:`note`). What an fsync covered
    is on disk; what was only written (even flushed) is in the page cache, which a killed process does not lose but a
    power cut or kernel crash does — so durability is asserted here, not left to a kill test."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, tuple[int, int] | None, int]] = []
        real = os.fsync

        def fsync(fd):
            real(fd)
            stat = os.fstat(fd)
            self.events.append(("fsync", (stat.st_dev, stat.st_ino), stat.st_size))

        monkeypatch.setattr(os, "fsync", fsync)

    @staticmethod
    def file_id(path: Path) -> tuple[int, int] | None:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def note(self, kind: str, path: Path) -> None:
        """Note an event (``kind``) with ``path``'s identity and size now (None and 0 where it does not exist)."""
        file = self.file_id(path)
        self.events.append((kind, file, os.stat(path).st_size if file is not None else 0))

    def synced(self, file: tuple[int, int] | None, before: int | None = None) -> int:
        """The most bytes of ``file`` an fsync covered among the first ``before`` events (all by default)."""
        sizes = [size for kind, f, size in self.events[:before] if kind == "fsync" and f == file]
        return max(sizes, default=0)
