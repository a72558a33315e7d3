"""One process per output: the exclusive lock ``label --output`` and predict's ``--writer.output_path`` take before any
work (#29 item 3).

Two runs appending to one output both did all the work, and two labellers wrote every row twice. The lock is the
``filelock`` library's ``flock`` on ``<output>.lock`` beside the output; the holder writes its pid into it (through
filelock's ``on_acquired`` hook, on the locked descriptor), so that a second run is refused in one line naming that
pid. The kernel drops a ``flock`` when its process ends, however it ends (SIGKILL included): a crashed run never
leaves a stale lock, and the file it leaves behind is taken over by the next run. A run that ends normally removes
the file while it still holds the lock, so no run leaves litter; a contender that opened the file just before
that locks a removed inode, sees that the path no longer leads to it, and tries again on the path's new file. The
lock is tried, not waited for: a second run should say so at once, not sit behind the first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout

from healthai.errors import UserError


class OutputBusy(UserError):
    """Another process holds the output's lock: the message names the output, the option and the holder's pid."""


def lock_path_for(output: str | Path) -> Path:
    """``data/train.jsonl`` → ``data/train.jsonl.lock``."""
    output = Path(output)
    return output.with_name(f"{output.name}.lock")


CLAIM_TRIES = 5
"""How often a contender that locked a just-removed lock file tries the path's new one (one retry is the rule)."""


class _RemovedWhileLocking(Exception):
    """The lock file was removed by its releasing holder between this process's open and its lock."""


def _claim(path: Path, fd: int) -> None:
    """filelock's ``on_acquired``: make sure ``fd`` (just locked) is the file at ``path``, then record this process's
    pid in it. Raising rolls the acquisition back."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        raise _RemovedWhileLocking from None
    if not os.path.samestat(os.fstat(fd), current):
        raise _RemovedWhileLocking
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)


def _holder_pid(lock_file: Path) -> Optional[int]:
    """The pid the holder wrote, or None when it cannot be read (the holder is between its lock and its write)."""
    try:
        return int(lock_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


class OutputLock:
    """An exclusive, non-waiting lock on one output file, held from :meth:`acquire` to :meth:`release` (or the end of
    the process)."""

    def __init__(self, output: str | Path, option: str):
        """
        Args:
            output: The output file the run writes (the lock is ``<output>.lock`` beside it).
            option: The option that names it (``--output``, ``--writer.output_path``), as the refusal says it.
        """
        self.output = Path(output)
        self.option = option
        self.path = lock_path_for(self.output)
        self._lock: Optional[FileLock] = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputBusy` naming the process that holds it."""
        lock = FileLock(self.path, timeout=0, on_acquired=lambda fd: _claim(self.path, fd))
        try:
            for _ in range(CLAIM_TRIES):
                try:
                    lock.acquire()
                    break
                except _RemovedWhileLocking:
                    continue
            else:
                raise Timeout(str(self.path))
        except Timeout:
            pid = _holder_pid(self.path)
            holder = f"process {pid}" if pid is not None else "another process"
            raise OutputBusy(
                f"{self.option} {self.output} is being written by {holder} (lock {self.path}); wait for it to finish "
                "or stop it, then rerun to resume, or choose another output"
            ) from None
        except OSError as e:  # a folder that cannot be written: say which, as every path error does
            raise UserError(f"{self.option} {self.output}: cannot create its lock file {self.path} "
                            f"({e.strerror or e})") from None  # fmt: skip
        self._lock = lock

    def release(self) -> None:
        """Remove the lock file and let the next run have the output (a no-op when not held)."""
        if self._lock is not None:
            # Removed while still held, so that no run can find the file unlocked and then lose it (see the module).
            self.path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_on_rank_zero(trainer, output: str | Path, option: str) -> Optional[OutputLock]:
    """Take ``output``'s lock in the process group's rank zero, for the whole run; returns it there (None elsewhere).

    Every rank learns whether rank zero got it (a broadcast every rank joins), so that a refusal stops them all at
    once instead of leaving the other ranks waiting at their next barrier. ``trainer``: the Lightning trainer.
    """
    lock, refusal = None, None
    if trainer.is_global_zero:
        lock = OutputLock(output, option)
        try:
            lock.acquire()
        except UserError as e:
            lock, refusal = None, e
    message = trainer.strategy.broadcast(None if refusal is None else str(refusal), src=0)
    if refusal is not None:
        raise refusal
    if message is not None:
        raise UserError(message)
    return lock
