"""Log filters: tokens never reach a log line, and a flood of one message cannot fill the disk."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

TOKEN_IN_TEXT = re.compile(r"(?i)((?:^|[?&;\s])(?:access_)?token=)[^&\s\"';]+")
"""`token=...` in a query string (the WebSocket routes accept `?token=`), as logged by uvicorn."""


class RedactTokens(logging.Filter):
    """Rewrites `token=<secret>` as `token=***` in a record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _mentions_token(record):
            return True
        record.msg = TOKEN_IN_TEXT.sub(r"\1***", record.getMessage())
        record.args = None
        return True


def _mentions_token(record: logging.LogRecord) -> bool:
    # Cheap test first: the access log calls this for every request.
    if "token=" in str(record.msg).lower():
        return True
    args = record.args if isinstance(record.args, tuple) else ()
    return any(isinstance(arg, str) and "token=" in arg.lower() for arg in args)


@dataclass
class _Window:
    start: float
    seen: int = 0
    suppressed: int = 0


class RepeatLimiter(logging.Filter):
    """Lets `burst` records of one kind (logger, message template, exception type) through per
    `interval` seconds, then drops the rest of that window; the next one through says how many went.

    Only WARNING and above are limited: those are what a flood of failures (EMFILE on accept, a broken
    client in a loop) produces, and each can carry a traceback.
    """

    def __init__(self, *, burst: int = 10, interval: float = 10.0, max_kinds: int = 1024) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.max_kinds = max_kinds
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._lock = threading.Lock()  # worker threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, str(record.msg), exc)
        with self._lock:
            window = self._windows.get(key)
            if window is None or record.created - window.start >= self.interval:
                dropped = window.suppressed if window else 0
                self._prune(record.created)
                self._windows[key] = _Window(record.created, seen=1)
                if dropped:
                    record.msg = f"{record.getMessage()} [{dropped} more like this suppressed]"
                    record.args = None
                return True
            window.seen += 1
            if window.seen <= self.burst:
                return True
            window.suppressed += 1
            return False

    def _prune(self, now: float) -> None:
        if len(self._windows) >= self.max_kinds:
            old = [k for k, w in self._windows.items() if now - w.start >= self.interval]
            for key in old or list(self._windows)[: self.max_kinds // 2]:
                del self._windows[key]


def install(loggers: tuple[str, ...] = ("", "uvicorn", "uvicorn.access", "uvicorn.error")) -> None:
    """Add both filters to every handler of these loggers (once), and token redaction to the loggers.

    Handler filters see every record that reaches the handler, propagated ones included; the logger
    filters cover uvicorn's own handlers, which plain `uvicorn main:app` installs before our import.
    """
    redact, limit = RedactTokens(), RepeatLimiter()
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(redact)
        for handler in logger.handlers:
            if not any(isinstance(f, RepeatLimiter) for f in handler.filters):
                handler.addFilter(redact)
                handler.addFilter(limit)
