"""How a command forked by tests/forkserver.py ends: as the interpreter would (the same exit status: ``SystemExit``'s
code, or the traceback and 1 for an exception, death by SIGINT after an uncaught KeyboardInterrupt; non-daemon threads
joined, atexit handlers run, standard streams flushed) but without tearing down every loaded module.

A forked child's module teardown touches every object the fork server preloaded (copy-on-write pages), which costs
2.4-4 s of CPU per process on this 2-core machine (measured: a script that only adds two tensors exits in 2.4 s
normally, 0.1-0.2 s this way) while a command's own work on the small model is a few seconds.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading


def exit_status(code: object) -> int:
    """The status the interpreter exits with for ``SystemExit(code)`` (printing a non-integer code, as it does)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run(run_it) -> int:
    """Call ``run_it`` (a ``runpy`` call) and return the status the interpreter would exit with after it."""
    try:
        run_it()
        return 0
    except SystemExit as exc:
        return exit_status(exc.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        return -1  # finish() ends the process by SIGINT, as the interpreter does after an uncaught KeyboardInterrupt
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        sys.excepthook(*sys.exc_info())
        return 1


def finish(status: int) -> None:
    """End the process with ``status`` after what the interpreter's shutdown does before tearing down modules: join
    non-daemon threads, run atexit handlers, flush the standard streams. ``-1``: killed by SIGINT."""
    getattr(threading, "_shutdown", lambda: None)()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if status == -1:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)
