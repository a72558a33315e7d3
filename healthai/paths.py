"""The paths a user gives, checked as the operating system sees them (#29 items 8, 9, 14).

* :func:`os_error_line`: the one translation of the system's refusals — disk full, read-only, permission denied, an
  immutable file, a loop of symbolic links — into one line naming the path and the cause; ``python -m healthai``
  (:mod:`healthai.__main__`) applies it to whatever command raised it, so no command needs a try/except of its own.
* :func:`check_writable`: an output that cannot be written is refused before any work (export used to find out
  after 27 s of merging), without creating anything (a refused run leaves nothing behind).
* :func:`check_input_file`: an input that is a folder, a FIFO, a device (``/dev/null``) or a symbolic-link loop is
  named as what it is, not "no such file".
* :func:`not_json_lines`: a CSV file or a JSON array given where JSON Lines is expected says so.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from healthai.errors import InputError, UserError

OS_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    # EPERM where root would pass: `chattr +i` (immutable) or `+a` (append-only) files and folders.
    errno.EPERM: "operation not permitted (an immutable or append-only file or folder?)",
    errno.ELOOP: "a loop of symbolic links",
}
"""The system errors that are the user's (or the machine's) to fix, with the cause each line states."""


class UnwritablePathError(UserError, OSError):
    """An output path the system refuses to write (read-only, permission denied, immutable, disk full)."""


def os_error_line(error: BaseException) -> Optional[str]:
    """One line for an :class:`OSError` whose cause the user can fix (:data:`OS_CAUSES`): ``PATH: cause``, or the
    cause alone when the system did not say which file (a failed ``write`` on a full disk); None for anything else,
    which is a bug and keeps its traceback."""
    if not isinstance(error, OSError) or error.errno not in OS_CAUSES:
        return None
    cause = OS_CAUSES[error.errno]
    if error.filename is None:
        return f"cannot write: {cause}"
    return f"{error.filename}: {cause}"


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Give an :class:`OSError` raised inside the block ``path`` as its file when it names none: a ``write`` that
    fills the disk raises ``ENOSPC`` without a file name, and the user's line must say where."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno in OS_CAUSES:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new output would be created in)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_writable(option: str, path: str | Path, folder: bool = False) -> None:
    """Raise :class:`UnwritablePathError` naming ``option``, ``path`` and the cause when ``path`` (a file, or a
    ``folder``) could not be written: its existing file is not writable, or the folder it would be created in is
    read-only, refuses this user or is not a folder. Probed by creating (and removing) a temporary file in that folder,
    as ``os.access`` ignores read-only mounts; nothing is left behind and no folder is created."""
    path = Path(path)
    target = path if folder else path.parent
    where = _nearest_existing(target)
    if not where.is_dir():
        raise UnwritablePathError(f"{option} {path}: {where} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
        if not folder and path.is_file():
            with open(path, "ab"):  # an existing file may be read-only or immutable in a writable folder
                pass
    except OSError as e:
        cause = OS_CAUSES.get(e.errno, e.strerror or str(e))
        raise UnwritablePathError(f"{option} {path}: cannot write in {where} ({cause})") from None


def check_input_file(path: str | Path) -> None:
    """Raise naming ``path`` unless it is a regular file (or a link to one): a missing file or a dangling link is a
    :class:`FileNotFoundError`; a folder, a FIFO, a device or a socket, a link loop, an :class:`InputError` saying
    what it is."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        if p.is_symlink():
            raise FileNotFoundError(f"{path}: a symbolic link to {os.readlink(p)}, which does not exist") from None
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{path}: a loop of symbolic links, not a file") from None
        raise
    what = _kind(mode)
    if what is not None:
        raise InputError(f"{path}: {what}, not a file of records")


def _kind(mode: int) -> Optional[str]:
    """What a path of this ``st_mode`` is, when it is not a regular file."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device (such as /dev/null)"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None


def not_json_lines(text: str) -> Optional[str]:
    """What the first non-blank line of a file, ``text``, shows the file to be when that is not JSON Lines: a JSON
    array, a JSON document spread over several lines, or CSV / TSV (:class:`csv.Sniffer`); None when it may be
    JSON Lines with one bad line."""
    line = text.strip()
    if line.startswith("["):
        return "a JSON array"
    if line == "{":  # pretty-printed: a torn JSON Lines row never ends right after its opening brace
        return "one JSON document over several lines"
    if line.startswith("{"):
        return None
    try:
        dialect = csv.Sniffer().sniff(line, delimiters=",\t;")
    except csv.Error:
        return None
    fields = next(csv.reader([line], dialect))
    if len(fields) < 2:
        return None
    kind = "TSV" if dialect.delimiter == "\t" else "CSV"
    return f"{kind} (first line: {line[:60]!r})"
