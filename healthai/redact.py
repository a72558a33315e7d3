"""Keeping an API key out of everything a run emits: :class:`Redactor` scrubs it from text, streams, files,
exceptions and result dataclasses.

Used by ``healthai label``, whose key some servers echo back in error bodies (OpenAI's 401 does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import urllib.parse
from typing import Any, Callable, Iterator, Optional, TypeVar

T = TypeVar("T")

MIN_SECRET_CHARS = 8
"""Keys at least this long are treated as secrets and scrubbed; shorter ones are the dummies local servers take
("EMPTY", "x"), and replacing those would garble every message for no gain."""

MIN_FRAGMENT_CHARS = 12
"""A piece of the key this long or longer is scrubbed wherever it appears (a server's message cut mid-key)."""

BEARER_RE = re.compile(r"(?i)\bBearer\s+[^\s\"',;]+")
"""An ``Authorization: Bearer`` token in text: scrubbed whatever key it holds."""


class Redactor:
    """The one place the API key is scrubbed from text (replaced by ``***``).

    :meth:`guard` puts it between the run and everything the run emits: stdout and stderr (summary, progress bar,
    messages), the files it writes (:meth:`writer`), exceptions leaving the run, and the returned summary. So a key
    echoed in a server's error body cannot leak through a message someone adds later either. (A key split across two
    separate ``write`` calls would pass; every line is written whole.)

    Besides the whole key it scrubs any piece of it of :data:`MIN_FRAGMENT_CHARS` or more (a server or a message
    that cut its text mid-key leaves its first characters) and every ``Bearer <token>`` (a gateway echoing the
    header). Text is scrubbed before it is cut (:meth:`cut`), so the cut cannot split the key either.
    """

    def __init__(self, secret: str):
        self._secret = secret if len(secret) >= MIN_SECRET_CHARS else None
        # The forms a server or a URL echoes the key in (``%2F``, ``%2B``, ``+`` for a space), longest first so a
        # form that contains another is replaced whole.
        forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
        self._forms = sorted(forms, key=len, reverse=True)
        n = MIN_FRAGMENT_CHARS
        # Every n-character window of the key (a fragment of n or more characters contains one), looked up only in
        # runs of n or more of the key's own characters: a case record's Chinese text has few such runs.
        self._windows = frozenset(secret[i : i + n] for i in range(len(secret) - n + 1))
        self._runs = re.compile("[" + "".join(re.escape(c) for c in sorted(set(secret))) + "]{%d,}" % n)

    def __call__(self, text: str) -> str:
        # A Bearer token is scrubbed whatever the key's length (#29 item 2): the header is a secret by its name.
        text = BEARER_RE.sub("Bearer ***", text)
        if self._secret is None:
            return text
        for form in self._forms:
            text = text.replace(form, "***")
        return self._scrub_fragments(text)

    def _scrub_fragments(self, text: str) -> str:
        """Replace each run of text covered by windows of the key with ``***``."""
        n, spans = MIN_FRAGMENT_CHARS, []
        for run in self._runs.finditer(text):
            chars = run.group()
            spans += [(run.start() + i, run.start() + i + n) for i in range(len(chars) - n + 1)
                      if chars[i : i + n] in self._windows]  # fmt: skip
        if not spans:
            return text
        merged = [list(spans[0])]
        for start, end in spans[1:]:
            if start <= merged[-1][1]:  # overlapping windows: one fragment
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in reversed(merged):
            text = text[:start] + "***" + text[end:]
        return text

    def cut(self, text: str, limit: int) -> str:
        """``text`` scrubbed, then cut to ``limit`` characters: cutting first could split the key and leave the
        part before the cut unrecognised."""
        return self(text)[:limit]

    def writer(self, stream: Any) -> "_RedactingWriter":
        """``stream`` (a text file or stream) with every write scrubbed."""
        return _RedactingWriter(stream, self)

    def scrub_exception(self, exc: Optional[BaseException]) -> None:
        """Scrub the string arguments of ``exc`` and of the exceptions chained to it, in place."""
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            exc.args = tuple(self(a) if isinstance(a, str) else a for a in exc.args)
            exc = exc.__cause__ or exc.__context__

    def scrub_summary(self, summary: T) -> T:
        """A copy of ``summary`` (a dataclass, e.g. a run's summary) with every string field scrubbed."""
        return dataclasses.replace(summary, **{
            f.name: self(v) for f in dataclasses.fields(summary) if isinstance(v := getattr(summary, f.name), str)
        })  # fmt: skip

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Scrub stdout, stderr and any exception raised inside the block."""
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.writer(out), self.writer(err)
        try:
            yield
        except BaseException as e:
            self.scrub_exception(e)
            raise
        finally:
            sys.stdout, sys.stderr = out, err


class _RedactingWriter:
    """A text stream or file whose writes go through a :class:`Redactor`; everything else is the wrapped object's."""

    def __init__(self, inner: Any, redact: Callable[[str], str]):
        self._inner, self._redact = inner, redact

    def write(self, text: str) -> int:
        return self._inner.write(self._redact(text))

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, close, encoding, ...
        return getattr(self._inner, name)
