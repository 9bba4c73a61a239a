"""Logging for both daemons: text or one JSON object per line, every line of a request carrying its id.

``LUKEWARM_LOG_FORMAT=json`` writes ``{"ts", "level", "logger", "msg", "request_id"?, …}`` per line
(orjson; an exception's traceback in ``exc``); ``text`` (the default) is for people at a terminal.
``LUKEWARM_LOG_LEVEL`` sets the level. The request id is a context variable: the ingress sets it when
a request arrives, the proxy when a chunk does (from the id the ingress sends), and every line logged
while that request is handled — in any module, by any task it starts — carries it.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import time
from typing import Any, ClassVar

import orjson

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("lukewarm_request_id", default="")
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# What LogRecord carries of its own: everything else on a record came from ``extra=`` and is logged.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# A log line is for people and log shippers: a field or message past this is cut.
MAX_FIELD_CHARS = 8192


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (``%(request_id)s`` in text, a field in JSON)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields kept, long values cut."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": _cut(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and value not in ("", None):
                entry[key] = value if isinstance(value, (int, float, bool)) else _cut(str(value))
        if record.exc_info:
            entry["exc"] = _cut(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + "…"


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process (a daemon's ``main``); SystemExit on a bad setting."""
    if fmt not in FORMATS:
        raise SystemExit(f"LUKEWARM_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if level.upper() not in LEVELS:
        raise SystemExit(f"LUKEWARM_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"
                                               "%(request_id_suffix)s"))
        handler.addFilter(_text_suffix)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _text_suffix(record: logging.LogRecord) -> bool:
    request_id = getattr(record, "request_id", "")
    record.request_id_suffix = f" [request {request_id}]" if request_id else ""
    return True


# aiohttp's access log, with the request id the ingress answers in X-Request-Id.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i" request_id=%{X-Request-Id}o'


class AccessLog:
    """A daemon's access lines (one per request), handed to the logging handlers in batches.

    Making a line's ``LogRecord``, formatting and writing it between two requests cost ~65 µs of CPU per
    request in each daemon (``LUKEWARM_LOG_LEVEL=WARNING``, which drops them, saved that in the same
    minutes), and on a keep-alive connection the next request waited for it. ``add`` keeps the line and
    its request id (~1 µs); ``flush`` writes what piled up ``flush_after_s`` later, or at once past
    ``max_pending``, in a row. A line keeps the time and request id it was added with, and shows up at
    most ``flush_after_s`` after the request's other lines; ``flush`` runs at shutdown too.
    """

    _of: ClassVar[dict[str, AccessLog]] = {}

    def __init__(self, logger: logging.Logger, flush_after_s: float = 0.05, max_pending: int = 256) -> None:
        self.logger = logger
        self.flush_after_s = flush_after_s
        self.max_pending = max_pending
        self._pending: list[tuple[float, str, str, dict[str, Any] | None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def of(cls, logger: logging.Logger) -> AccessLog:
        """The one batch of ``logger`` in this process (the lean server and aiohttp's requests share it)."""
        found = cls._of.get(logger.name)
        if found is None or found.logger is not logger:
            found = cls._of[logger.name] = cls(logger)
        return found

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def add(self, message: str, extra: dict[str, Any] | None = None) -> None:
        """One access line (INFO), with the request id of the caller's context and, for JSON, ``extra``."""
        self._pending.append((time.time(), message, REQUEST_ID.get(), extra))
        if len(self._pending) >= self.max_pending:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._timer is None or self._timer_loop is not loop:  # (a timer of a loop closed since never fires)
            # In an empty context: a line without a request id must not take the id of the request that
            # happened to schedule the flush.
            self._timer = loop.call_later(self.flush_after_s, self.flush, context=contextvars.Context())
            self._timer_loop = loop

    def flush(self) -> None:
        """Write every line added so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if pending:
            contextvars.Context().run(self._write, pending)

    def _write(self, pending: list[tuple[float, str, str, dict[str, Any] | None]]) -> None:
        logger = self.logger
        for created, message, request_id, extra in pending:
            record = logger.makeRecord(logger.name, logging.INFO, "(access)", 0, message, (), None, extra=extra)
            record.created, record.msecs = created, (created - int(created)) * 1000
            record.request_id = request_id
            logger.handle(record)
