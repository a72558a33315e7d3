"""JSON Lines reading and durable appending, shared by every stage.

Reading never drops a line silently: a bad line raises :class:`BadRecordError` naming ``file:line``, or — when the
caller asks to skip — goes to a rejects file with the reason. Appending flushes and fsyncs, and resuming tolerates the
torn last line a crash (even SIGKILL) can leave behind.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Literal

from healthai.errors import UserError
from healthai.paths import check_input_file, not_json_lines

OnBadRecord = Literal["error", "skip"]

UTF8_BOM = b"\xef\xbb\xbf"


class BadRecordError(UserError, ValueError):
    """A JSONL line that cannot be used; the message names the file and the 1-based line number."""

    def __init__(self, path: str | Path, line_no: int, reason: str):
        self.path, self.line_no, self.reason = str(path), line_no, reason
        super().__init__(f"{path}:{line_no}: {reason}")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line_no, object, None)`` per non-blank line, or ``(line_no, None, reason)`` where it cannot be parsed.

    Lines are decoded one by one so that a non-UTF-8 byte (a GBK file, say) is reported at its own line. A UTF-8 byte
    order mark at the start of the file (Excel and Windows tools write one) is skipped. A missing file raises
    :class:`FileNotFoundError` naming it; a folder, FIFO, device or link loop says what it is
    (:func:`~healthai.paths.check_input_file`). A file that is not JSON Lines at all (CSV, a JSON array) raises
    :class:`BadRecordError` at its first line saying what it looks like, whether or not bad lines are skipped: every
    line of it would be "malformed".
    """
    check_input_file(path)
    first = True
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
                yield line_no, None, f"not valid UTF-8 ({byte}); save the file as UTF-8"
                continue
            if not text.strip():
                continue
            reason = None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                obj, reason = None, f"malformed JSON ({e.msg} at column {e.colno})"
            if first and not isinstance(obj, dict):
                _refuse_other_format(path, line_no, text)
            first = False
            if reason is not None:
                yield line_no, None, reason
                continue
            if not isinstance(obj, dict):
                yield line_no, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield line_no, obj, None


def _refuse_other_format(path: str | Path, line_no: int, first_line: str) -> None:
    """Raise :class:`BadRecordError` when the file's first line shows it is another format (#29 item 14)."""
    what = not_json_lines(first_line)
    if what is not None:
        raise BadRecordError(path, line_no, f"expected JSON Lines (one JSON object per line), but the file looks "
                                            f"like {what}")  # fmt: skip


class Rejects:
    """Collects skipped records into ``<output>.rejects.jsonl``, created only when the first reject arrives."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self._file: IO[str] | None = None

    def add(self, source: str | Path, line_no: int, reason: str, raw: Any = None) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
        row = {"file": str(source), "line": line_no, "reason": reason, "record": raw}
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def rejects_path_for(path: str | Path) -> Path:
    """``data/train.jsonl`` → ``data/train.rejects.jsonl``."""
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".rejects.jsonl")


def append_rows(f: IO[str], rows: Iterable[dict]) -> int:
    """Append rows to an open text file, then flush and fsync, so a crash loses at most the rows being written."""
    n = 0
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    f.flush()
    os.fsync(f.fileno())
    return n


def recover_jsonl(path: str | Path, key: str = "id", unique: bool = False) -> list[Any]:
    """Return the ``key`` of every complete row of an output file being resumed, in file order.

    A crash can leave a torn last line (no newline, or cut mid-object); it is cut off the file so that the record is
    redone and appended cleanly. A bad line anywhere else is not a crash artefact and raises :class:`BadRecordError`,
    and so, when ``unique``, does a row whose ``key`` an earlier row has (by the id rule, ``5`` = ``"5"``): an output
    written once per id holds each once, and a rerun that called the copy "skipped" would keep it for good.
    """
    from healthai.records import id_key  # records imports this module
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    keys: list[Any] = []
    first_line: dict[str, int] = {}
    good_end, line_no = 0, 0
    pos = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    while pos < len(data):
        line_no += 1
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end]
        try:
            row = json.loads(line.decode("utf-8")) if line.strip() else None
            if row is not None and (not isinstance(row, dict) or key not in row):
                raise ValueError(f"row without {key!r}")
        except (ValueError, UnicodeDecodeError) as e:
            if nl < 0 or end == len(data):  # the last line: torn by a crash
                break
            raise BadRecordError(path, line_no, f"cannot resume from this output file: {e}") from None
        if nl < 0:  # complete JSON but no newline: the write was cut before "\n"; redo it
            break
        if row is not None:
            if unique and id_key(row[key]) in first_line:
                raise BadRecordError(path, line_no, f"repeated {key} {row[key]!r} (first at {path}:"
                                                    f"{first_line[id_key(row[key])]}): a repeated id is always an "
                                                    "error; keep one of the two rows, then rerun")  # fmt: skip
            first_line.setdefault(id_key(row[key]), line_no)
            keys.append(row[key])
        good_end = end
        pos = end
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return keys


class DurableAppender:
    """Appends rows to a JSONL file with :func:`append_rows` (flush + fsync) from a worker thread, for asyncio code.

    Why a thread: an fsync takes milliseconds (tens on a network disk) and on the event loop it would stall every
    request in flight. Why batches: rows that finish while one fsync runs are written and fsync'ed together right
    after it (group commit), so one slow fsync does not queue up one more per row. A row is on disk once its batch is;
    a crash before that leaves it out of the file, and a resuming caller (``healthai label``) redoes it — never
    twice.
    """

    def __init__(self, path: str | Path, mode: str, wrap: Callable[[IO[str]], Any] | None = None):
        """Open ``path`` with ``mode`` ("a" to resume, "w" to start over); ``wrap`` puts a filter around the file
        (e.g. :meth:`healthai.redact.Redactor.writer`, which scrubs a key from every write)."""
        self.path = Path(path)
        file = open(self.path, mode, encoding="utf-8")
        self._file = wrap(file) if wrap is not None else file
        self._pending: list[dict] = []
        self._drain: asyncio.Future | None = None

    def add(self, row: dict) -> None:
        if self._drain is not None and self._drain.done():
            self._drain.result()  # re-raise a failed write (disk full) now, not at the end of the run
            self._drain = None
        self._pending.append(row)
        if self._drain is None:  # else the running drain picks the row up after its current batch
            self._drain = asyncio.ensure_future(self._write_pending())

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            # One batch at a time, so rows never interleave and the file keeps whole lines in arrival order.
            await asyncio.to_thread(append_rows, self._file, batch)

    async def aclose(self) -> None:
        """Write what is still pending, then close the file."""
        try:
            if self._drain is not None:
                await self._drain
        finally:
            self._file.close()
