"""Log filters: tokens never reach a log line, and a flood of one message cannot fill the disk."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

TOKEN_IN_TEXT = re.compile(r"(?i)((?:^|[?&;\s])(?:access_)?token=)[^&\s\"';]+")
"""`token=...` in a query string (the WebSocket routes accept `?token=`), as logged by uvicorn."""


class RedactTokens(logging.Filter):
    """Rewrites `token=<secret>` as `token=***` in a record's message and string arguments.

    The arguments stay arguments: uvicorn's access formatter unpacks them by position.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            # The template itself names a token (`"token=%s"`): format first, so the value goes too.
            record.msg, record.args = _redact(record.getMessage()), None
        elif isinstance(record.args, tuple) and any(_holds_token(arg) for arg in record.args):
            record.args = tuple(_redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif isinstance(record.args, dict) and any(_holds_token(arg) for arg in record.args.values()):
            record.args = {k: _redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def _holds_token(value: object) -> bool:
    return isinstance(value, str) and "token=" in value.lower()


def _redact(text: str) -> str:
    return TOKEN_IN_TEXT.sub(r"\1***", text)


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
                if dropped:  # the arguments stay: formatters may read them by position
                    record.msg = f"{record.msg} [{dropped} more like this suppressed]"
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
