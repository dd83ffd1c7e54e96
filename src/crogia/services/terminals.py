"""Interactive terminals: the registry of every session's open terminals, and their scrollback.

A terminal lives in its session's sandbox (`Sandbox.pty_*`) and outlives the sockets that show
it: it ends when deleted, when its shell exits, or when its session is deleted. When the
sandbox stops (idleness), its terminals are gone too; they stay listed as `stopped`, and
deleting one is a Conflict (409), until the session is woken (creating a terminal wakes it),
which forgets them. One socket at a time is attached: a newer one replaces it. Output goes
into a bounded ring (`Scrollback`); an attached socket reads the ring at its own pace from its
own offset, so a slow client loses the oldest output, never the server's memory, and a client
that reconnects gets the ring, then live output, without a gap or a repeat.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Literal

from crogia.config import Settings
from crogia.errors import Conflict, CrogiaError, NotFound
from crogia.services.live import LiveSession

log = logging.getLogger(__name__)

TerminalStatus = Literal["starting", "active", "exited", "stopped"]
CLOSE_GRACE = 1.0
"""Seconds between SIGHUP and SIGKILL when a terminal is deleted."""


class Scrollback:
    """The last `limit` bytes of a stream, addressed by absolute offsets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.start = 0
        """Offset of the oldest byte still kept."""

    @property
    def end(self) -> int:
        return self.start + len(self.buf)

    def append(self, data: bytes) -> None:
        self.buf += data
        excess = len(self.buf) - self.limit
        if excess > 0:
            del self.buf[:excess]
            self.start += excess

    def read(self, offset: int, size: int) -> tuple[int, bytes]:
        """Up to `size` bytes from `offset` (moved up to `start` when it fell out); (new offset, bytes)."""
        offset = max(offset, self.start)
        data = bytes(self.buf[offset - self.start : offset - self.start + size])
        return offset + len(data), data


class Attachment:
    """One socket's view of a terminal: its offset in the scrollback, and a wake-up for news."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.news = asyncio.Event()
        self.news.set()  # the scrollback is news to a socket that just came
        self.replaced = False


class Terminal:
    """One interactive terminal (also the `PtyListener` of its pty in the sandbox)."""

    def __init__(self, live: LiveSession, *, scrollback: int, cols: int, rows: int) -> None:
        self.id = "shell_" + secrets.token_hex(12)  # 96 random bits after the original's prefix
        self.live = live
        self.sandbox = live.sandbox
        self.created = datetime.now(UTC)
        self.cols, self.rows = cols, rows
        self.status: TerminalStatus = "starting"
        self.exit_code: int | None = None
        self.tid: int | None = None
        self.ring = Scrollback(scrollback)
        self.attached: Attachment | None = None
        self.on_end: Callable[[Terminal], None] | None = None
        """Called once when its shell exits (the registry forgets it)."""

    @property
    def ended(self) -> bool:
        return self.status in ("exited", "stopped")

    def on_output(self, data: bytes) -> None:
        self.ring.append(data)
        self.live.touch()  # output flowing is activity (a build in a terminal keeps the sandbox up)
        if self.attached is not None:
            self.attached.news.set()

    def on_exit(self, exit_code: int | None) -> None:
        self.end("exited", exit_code)
        if self.on_end is not None:
            self.on_end(self)

    def on_lost(self) -> None:
        self.end("stopped", None)

    def end(self, status: TerminalStatus, exit_code: int | None) -> None:
        if not self.ended:
            self.status, self.exit_code = status, exit_code
        if self.attached is not None:
            self.attached.news.set()

    def attach(self) -> Attachment:
        """A new socket: it replaces the attached one and starts at the oldest kept output."""
        if self.attached is not None:
            self.attached.replaced = True
            self.attached.news.set()
        self.attached = Attachment(self.ring.start)
        return self.attached

    def detach(self, attachment: Attachment) -> None:
        if self.attached is attachment:
            self.attached = None


class TerminalService:
    """Every open terminal of this server, by id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._all: dict[str, Terminal] = {}

    def active_count(self) -> int:
        return sum(1 for t in self._all.values() if t.status == "active")

    def of_session(self, session_id: str) -> list[Terminal]:
        return [t for t in self._all.values() if t.live.id == session_id]

    def get(self, shell_id: str, *, tenant: str | None) -> Terminal:
        """NotFound for an unknown terminal and for another tenant's."""
        term = self._all.get(shell_id)
        if term is None or (tenant is not None and term.live.tenant != tenant):
            raise NotFound(f"Shell session {shell_id} not found.", shell_id=shell_id)
        return term

    def find(self, shell_id: str) -> Terminal | None:
        return self._all.get(shell_id)

    async def create(self, live: LiveSession, *, cols: int, rows: int) -> Terminal:
        """Open a terminal in the (running) session's sandbox; Conflict past TERMINALS_PER_SESSION."""
        await self.woke(live)  # in case the hook has not run: their sandbox is gone
        limit = self.settings.terminals_per_session
        if len(self.of_session(live.id)) >= limit:
            raise Conflict(f"This session already has {limit} terminals; delete one first.", limit=limit)
        term = Terminal(live, scrollback=self.settings.terminal_scrollback_bytes, cols=cols, rows=rows)
        self._all[term.id] = term  # counted against the limit while it opens
        term.on_end = self._forget_exited
        try:
            term.tid = await term.sandbox.pty_open(cols=cols, rows=rows, listener=term)
        except BaseException:
            self._all.pop(term.id, None)
            raise
        if term.status == "starting":
            term.status = "active"
        log.info("session %s: terminal %s opened (pid %s)", live.id, term.id, term.tid)
        return term

    async def write(self, term: Terminal, data: bytes) -> None:
        if term.status != "active" or term.tid is None:
            return
        await term.sandbox.pty_input(term.tid, data)

    async def resize(self, term: Terminal, *, cols: int, rows: int) -> None:
        if term.status == "active" and term.tid is not None:
            term.cols, term.rows = cols, rows
            await term.sandbox.pty_resize(term.tid, cols=cols, rows=rows)

    async def delete(self, term: Terminal) -> None:
        """End the terminal and every process it started, and forget it.

        Conflict for a terminal of a stopped session: it answers 409 until the session is woken.
        """
        if term.status == "stopped" and term.live.asleep:
            raise Conflict(
                f"Shell session {term.id} is stopped with its session; create a terminal to wake it.",
                shell_id=term.id,
            )
        self._all.pop(term.id, None)
        code = None
        if term.status == "active" and term.tid is not None:
            try:
                code = await term.sandbox.pty_close(term.tid, grace=CLOSE_GRACE)
            except CrogiaError as exc:  # the sandbox went meanwhile: so did the terminal
                log.info("closing terminal %s: %s", term.id, exc.message)
        term.end("exited", code)

    async def woke(self, live: LiveSession) -> None:
        """A session's sandbox came up (an `on_sandbox` hook): its stopped terminals are gone."""
        self._forget(t for t in self.of_session(live.id) if t.status == "stopped")

    def end_session(self, session_id: str) -> None:
        """The session is being deleted: its terminals end with it (called by `Runtime.delete_session`).

        No pty_close: the sandbox, and every process in it, is removed right after.
        """
        for term in self.of_session(session_id):
            self._all.pop(term.id, None)
            term.end("exited", None)

    def close(self) -> None:
        """Server shutdown: the sockets still attached are told the terminals ended."""
        self._forget(list(self._all.values()))

    def _forget_exited(self, term: Terminal) -> None:
        self._all.pop(term.id, None)

    def _forget(self, terms: Iterable[Terminal]) -> None:
        for term in list(terms):
            self._all.pop(term.id, None)
            term.end("stopped", None)
