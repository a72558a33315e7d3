"""Keeping secrets out of serve's access log: :class:`QueryStringScrubber` replaces every query-string value in
uvicorn's access lines with ``***`` (a client that sends ``?api_key=KEY`` must not have its key written verbatim,
#29 item 2); the parameter names are kept, so the log still says what was asked.
"""

from __future__ import annotations

import logging
import re

ACCESS_LOGGER = "uvicorn.access"

_QUERY_VALUE_RE = re.compile(r"(?P<name>[?&;][^=&;#\s]*=)[^&;#\s]*")


def scrub_query(path: str) -> str:
    """``path`` with every query-string value replaced by ``***`` (``/x?api_key=K&a=1`` → ``/x?api_key=***&a=***``)."""
    head, sep, query = path.partition("?")
    if not sep:
        return path
    return head + _QUERY_VALUE_RE.sub(r"\g<name>***", "?" + query)


class QueryStringScrubber(logging.Filter):
    """A filter on uvicorn's access logger: its records carry the request path (query string included) as the third
    argument (``client, method, path, http_version, status``); any other string argument is scrubbed the same way."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(scrub_query(a) if isinstance(a, str) and "?" in a else a for a in record.args)
        return True


def install() -> None:
    """Scrub query strings from the access log of every uvicorn server started in this process or forked from it
    (uvicorn's logging config adds handlers but keeps a logger's filters)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, QueryStringScrubber) for f in logger.filters):
        logger.addFilter(QueryStringScrubber())
