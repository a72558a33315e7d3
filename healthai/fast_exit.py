"""How ``python -m healthai`` ends: as the interpreter ends, without its module teardown.

What the interpreter does at exit is kept, in its order: non-daemon threads joined, atexit handlers run (logging's
flush, multiprocessing's children, temporary folders), Python's and C's standard streams flushed, and the same exit
status (``SystemExit``'s code, a non-integer one printed; an uncaught exception's traceback and 1; death by SIGINT
after an uncaught KeyboardInterrupt). What is skipped is what comes after: freeing, one by one, the ~600k objects
that torch, transformers and Lightning build when imported. That took 1.3-1.9 s of CPU at the end of every command
on a 2-core machine (``fit --help``: 7.0 s → 5.4 s; a 2-step fit of the small model: 12.8 s → 11.0 s), and once more
per DDP/FSDP rank.

Teardown would also have run the finalizers of objects still alive, e.g. flushed a file object that was never
closed. No output of this project waits for that: prediction shards and label outputs are written and fsync'ed per
batch, rejects per row, reports atomically, and Lightning closes its loggers when fit ends.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from typing import Callable, Literal, NoReturn, Union

Status = Union[int, Literal["SIGINT"]]
"""An exit status, or death by SIGINT (how the interpreter ends after an uncaught KeyboardInterrupt)."""


def exit_status(code: object) -> int:
    """The status the interpreter exits with for ``SystemExit(code)``, printing a non-integer code as it does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run(entry: Callable[[], object]) -> Status:
    """Call ``entry`` and return the status the interpreter would exit with after it."""
    try:
        entry()
        return 0
    except SystemExit as exc:
        _flush_python_streams()  # what was printed before comes before the message, as the interpreter orders them
        return exit_status(exc.code)
    except KeyboardInterrupt:
        _flush_python_streams()
        sys.excepthook(*sys.exc_info())
        return "SIGINT"
    except BaseException:  # noqa: BLE001 - reported as the interpreter reports an uncaught exception
        _flush_python_streams()
        sys.excepthook(*sys.exc_info())
        return 1


def finish(status: Status) -> NoReturn:
    """End the process with ``status`` after what the interpreter's shutdown does before its module teardown."""
    threading._shutdown()  # joins non-daemon threads (and runs what threading._register_atexit queued), as at exit
    atexit._run_exitfuncs()
    _flush_python_streams()
    _flush_c_streams()
    if status == "SIGINT":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def run_then_exit(entry: Callable[[], object]) -> NoReturn:
    """``entry()`` as the program: then end as the interpreter would, without tearing down the loaded modules."""
    finish(run(entry))


def _flush_python_streams() -> None:
    for stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # none, closed, or a reader gone: nothing more can be written
            pass


def _flush_c_streams() -> None:
    """``fflush(NULL)``: what C libraries printed into a pipe's stdio buffer (exit() flushes it, ``os._exit`` not)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to load by that name (not Linux/macOS): nothing buffered there
        pass
