"""The event bus: append with a per-session `seq`, store, then fan out; subscribe = replay, then live.

Publishing assigns the next `seq` at once and queues the event; one owned writer task stores
queued events in batches and only then hands them to subscribers, so every event a client sees
is already in the database. A subscriber registers for live events *before* it reads the stored
ones, and skips any `seq` it has already passed: no gap, no duplicate.

While the database is away, the writer keeps retrying the same batch: events wait in memory
(bounded: `publish` waits for room) and none is dropped, so `seq` has no gap. After DOWN_AFTER
seconds of failures `store_error` says so (health shows it; new tasks get a 503) until it is back.

Each subscriber has a bounded queue. One that falls too far behind is closed with a reason
(and reconnects with `since`), so a slow client never slows the agent or other clients.

The kinds a sandbox sets off at its own pace (`SANDBOX_DRIVEN`) are kept per session only as the
newest `keep_sandbox_events`: after each tenth of that many new ones (and at a session's first
after a start) the writer deletes the older ones, so a session holds at most 1.1x that many.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from datetime import UTC, datetime

from pydantic_core import PydanticSerializationError
from sqlalchemy.exc import DBAPIError, OperationalError

from crogia.events import SANDBOX_DRIVEN, _Event, event_payload
from crogia.store import Database, repo

log = logging.getLogger(__name__)

REPLAY_PAGE = 2000
MAX_PENDING = 100_000
"""Events queued for storage before `publish` waits for the writer."""
RETRY_FIRST, RETRY_MAX = 0.05, 2.0
"""Pauses before storing a batch again after a transient database error (locked, connection lost):
doubling from the first to the longest, for as long as it takes. Nothing is dropped meanwhile."""
DOWN_AFTER = 1.3
"""Seconds of failed attempts after which the store counts as down (`store_error`, health, 503s)."""
DROPPED_MEMORY = 10_000
"""Deleted sessions remembered, so their late events are discarded without a database round trip."""
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""For the rare payload pydantic cannot write as UTF-8 (a lone surrogate from a model): escaped."""
_NOT_PAYLOAD: set[str] = {"type"}
_TRIMMED = frozenset(SANDBOX_DRIVEN)

Pending = tuple[str, int, str, str | None, str]
"""An event on its way to the store: (session_id, seq, type, task_id, json_text)."""


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SubscriptionClosed(Exception):
    """The subscription ended: the client was too slow, the session went away, or the server stops."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    """Yields `(seq, json_text)` of stored events after `after`, then live ones, in order."""

    def __init__(self, bus: EventBus, session_id: str, after: int, upto: int, max_queue: int) -> None:
        self._bus = bus
        self.session_id = session_id
        self.last_seq = after
        self._replay_upto = upto
        self._replay: deque[tuple[int, str]] = deque()
        self._live: deque[tuple[int, str]] = deque()
        self._max_queue = max_queue
        self._wake = asyncio.Event()
        self.closed: str | None = None
        self._ending: str | None = None

    def _deliver(self, seq: int, data: str) -> None:
        if self.closed is not None:
            return
        if len(self._live) >= self._max_queue:
            self.close(f"client fell {self._max_queue} events behind; reconnect with since={self.last_seq}")
            return
        self._live.append((seq, data))
        self._wake.set()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self._live.clear()
            self._replay.clear()
            self._wake.set()
            self._bus._forget(self)

    def end(self, reason: str) -> None:
        """Close with `reason` once every event handed over so far has been yielded."""
        if self.closed is None and self._ending is None:
            self._ending = reason
            self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[int, str]:
        while True:
            if self.closed is not None:
                raise SubscriptionClosed(self.closed)
            if self._replay:
                item = self._replay.popleft()
            elif self.last_seq < self._replay_upto:
                await self._fetch_replay_page()
                continue
            elif self._live:
                item = self._live.popleft()
            elif self._ending is not None:
                self.close(self._ending)
                continue
            else:
                self._wake.clear()
                await self._wake.wait()
                continue
            if item[0] > self.last_seq:
                self.last_seq = item[0]
                return item

    def pending(self) -> int:
        """How many live events are queued for this subscriber."""
        return len(self._live)

    def take_ready(self, limit: int = 512) -> list[str]:
        """Up to `limit` more live events that are already queued, without waiting, in order.

        After an event was yielded, a sender takes the ones queued behind it in one go and writes
        them under one lock: per event, that saves a wake-up of the iterator and of the lock.
        """
        items: list[str] = []
        if self.closed is not None or self._replay or self.last_seq < self._replay_upto:
            return items
        while self._live and len(items) < limit:
            seq, data = self._live.popleft()
            if seq > self.last_seq:
                self.last_seq = seq
                items.append(data)
        return items

    async def _fetch_replay_page(self) -> None:
        async with self._bus.db.session() as db:
            rows = await repo.events_between(
                db, session_id=self.session_id, after=self.last_seq, upto=self._replay_upto, limit=REPLAY_PAGE
            )
        if rows:
            self._replay.extend(rows)
        else:
            self._replay_upto = self.last_seq


class EventBus:
    """Per-session ordered, stored, fanned-out event stream."""

    def __init__(
        self, db: Database, *, batch: int = 5000, client_queue: int = 20_000, keep_sandbox_events: int = 1000
    ) -> None:
        self.db = db
        self._keep = keep_sandbox_events
        self._trim_every = max(1, keep_sandbox_events // 10)
        self._untrimmed: dict[str, int] = {}
        """Sandbox-driven events stored per session since its last trim (absent: none yet this run)."""
        self._stamp: tuple[int, str] = (-1, "")
        """(millisecond, its ISO text): events in a burst share a millisecond, and formatting is costly."""
        self._batch = batch
        self._client_queue = client_queue
        self._next: dict[str, int] = {}
        self._committed: dict[str, int] = {}
        self._subs: dict[str, set[Subscription]] = {}
        self._quoted: dict[str, str] = {}
        """Each session id as JSON text, made once."""
        self._dropped: dict[str, None] = {}
        """Recently deleted sessions, oldest first."""
        self._pending: deque[Pending | asyncio.Future[None]] = deque()
        """Appended by `publish` without an await; taken in batches by the writer."""
        self._has_work = asyncio.Event()
        self._room = asyncio.Event()
        self._init_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self.store_error: str | None = None
        """Why events cannot be stored, once that has lasted DOWN_AFTER seconds; None when they can."""
        self.store_failures = 0
        """Failed attempts to store a batch since the store last answered."""
        self.down_after = DOWN_AFTER

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="crogia-event-writer")

    async def close(self) -> None:
        """Store everything queued, close every subscriber, stop the writer."""
        if self._writer is None:
            return
        await self.flush()
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        self._writer = None
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close("server shutting down; reconnect with since")

    def end_all(self, reason: str) -> None:
        """End every subscription once it has yielded what it holds (a graceful stop)."""
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.end(reason)

    async def publish(self, session_id: str, event: _Event) -> int:
        """Queue `event` for storage and delivery; returns its `seq`."""
        if session_id in self._next:  # the usual case, without a coroutine per event
            seq = self._next[session_id] = self._next[session_id] + 1
        elif session_id in self._dropped:  # a late event of a deleted session: nowhere to go
            return 0
        else:
            seq = await self._next_seq(session_id)
        kind: str = getattr(event, "type")  # noqa: B009 - every concrete event has a literal `type`
        quoted = self._quoted.get(session_id) or self._quoted.setdefault(session_id, json.dumps(session_id))
        head = f'{{"type":"{kind}","session_id":{quoted},"seq":{seq},"timestamp":"{self._timestamp()}"'
        body = _payload_json(event)
        data = head + "}" if body == "{}" else head + "," + body[1:]
        self._pending.append((session_id, seq, kind, event.task_id, data))
        self._has_work.set()
        if len(self._pending) >= MAX_PENDING:  # the writer is behind: wait for room
            self._room.clear()
            await self._room.wait()
        return seq

    async def flush(self) -> None:
        """Wait until every event published so far is stored and delivered."""
        if self._writer is None or self._writer.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(done)
        self._has_work.set()
        await done

    async def subscribe(self, session_id: str, *, after: int = 0) -> Subscription:
        """Stored events with `seq > after`, then live ones."""
        await self._next_seq(session_id, peek=True)
        upto = self._committed.get(session_id, 0)
        sub = Subscription(self, session_id, after, upto, self._client_queue)
        self._subs.setdefault(session_id, set()).add(sub)
        return sub

    def _timestamp(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms != self._stamp[0]:
            second = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
            moment = second.isoformat(timespec="milliseconds")
            self._stamp = (ms, moment.replace("+00:00", "Z"))
        return self._stamp[1]

    def last_seq(self, session_id: str) -> int:
        return self._committed.get(session_id, 0)

    def drop_session(self, session_id: str, reason: str = "session deleted") -> None:
        for sub in list(self._subs.get(session_id, ())):
            sub.close(reason)
        self._subs.pop(session_id, None)
        self._next.pop(session_id, None)
        self._committed.pop(session_id, None)
        self._quoted.pop(session_id, None)
        self._untrimmed.pop(session_id, None)
        self._dropped[session_id] = None
        if len(self._dropped) > DROPPED_MEMORY:
            del self._dropped[next(iter(self._dropped))]

    def subscriber_count(self, session_id: str) -> int:
        return len(self._subs.get(session_id, ()))

    def _forget(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.session_id)
        if subs is not None:
            subs.discard(sub)

    async def _next_seq(self, session_id: str, *, peek: bool = False) -> int:
        if session_id not in self._next:
            async with self._init_lock:
                if session_id not in self._next:
                    async with self.db.session() as db:
                        top = await repo.max_event_seq(db, session_id=session_id)
                    self._next[session_id] = top
                    self._committed[session_id] = top
        if peek:
            return self._next[session_id]
        self._next[session_id] += 1
        return self._next[session_id]

    async def _write_loop(self) -> None:
        pending = self._pending
        while True:
            if not pending:
                self._has_work.clear()
                await self._has_work.wait()
                continue
            batch = [pending.popleft() for _ in range(min(self._batch, len(pending)))]
            if len(pending) < MAX_PENDING:
                self._room.set()
            events = [item for item in batch if isinstance(item, tuple)]
            if events:
                stored = await self._store(events)
                self._fan_out(stored)
                await self._trim(stored)
            for item in batch:
                if isinstance(item, asyncio.Future) and not item.done():
                    item.set_result(None)

    async def _store(self, events: list[Pending]) -> list[Pending]:
        """Store `events`; returns those stored: all but the late ones of deleted sessions."""
        if await self._insert_retrying(events) is None:
            return events
        # A batch fails as a whole: most often it held late events of a session deleted meanwhile.
        live = [event for event in events if event[0] not in self._dropped]
        if not live or (len(live) < len(events) and await self._insert_retrying(live) is None):
            return live
        kept = []
        for event in live:
            error = await self._insert_retrying([event])
            if error is None:
                kept.append(event)
            else:  # not the database being away: this event itself cannot be stored (a bug)
                log.error("event %s/%s (%s) cannot be stored: %s", event[0], event[1], event[2], error)
        return kept

    async def _insert_retrying(self, events: list[Pending]) -> Exception | None:
        """Insert `events`, retrying while the database is away; the error if it refused them."""
        pause, failing_since = RETRY_FIRST, time.monotonic()
        while True:
            error = await self._insert(events)
            if error is None or not _transient(error):
                if self.store_failures:
                    log.info("events are stored again after %d failed attempts", self.store_failures)
                self.store_failures, self.store_error = 0, None
                return error
            self.store_failures += 1
            first_line = str(error).splitlines()[0]
            if self.store_error is None and time.monotonic() - failing_since >= self.down_after:
                self.store_error = f"events cannot be stored: {first_line}"
                log.error("the event store is down (%s); %d events wait", first_line, len(self._pending))
            log.warning("storing %d events failed (%s); retrying", len(events), first_line)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def _insert(self, events: list[Pending]) -> Exception | None:
        """Store `events` in one transaction; the error if that failed."""
        try:
            async with self.db.transaction() as db:
                await repo.insert_events(db, rows=events)
        except Exception as exc:
            return exc
        return None

    async def _trim(self, events: list[Pending]) -> None:
        """Count `events`' sandbox-driven ones; trim each session that has had enough since its last."""
        due: list[str] = []
        for sid, _seq, kind, _task_id, _data in events:
            if kind in _TRIMMED:
                count = self._untrimmed.get(sid, self._trim_every - 1) + 1
                self._untrimmed[sid] = count
                if count == self._trim_every:
                    due.append(sid)
        for sid in due:
            self._untrimmed[sid] = 0
            if sid in self._dropped:
                continue
            try:
                async with self.db.transaction() as db:
                    gone = await repo.trim_sandbox_events(db, session_id=sid, keep=self._keep)
            except Exception as exc:  # the next tenth tries again; the events themselves are stored
                log.warning("trimming session %s's sandbox events failed: %s", sid, str(exc).splitlines()[0])
                continue
            if gone:
                log.debug("session %s: %d older sandbox events deleted", sid, gone)

    def _fan_out(self, events: list[Pending]) -> None:
        for sid, seq, _typ, _task_id, data in events:
            if self._committed.get(sid, 0) < seq:
                self._committed[sid] = seq
            for sub in list(self._subs.get(sid, ())):
                sub._deliver(seq, data)


def _transient(error: Exception) -> bool:
    """A database busy or away for a while (locked, connection lost), not one refusing the rows."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, (OperationalError, OSError))


def _payload_json(event: _Event) -> str:
    """The event's own fields but `type`, as compact JSON text (pydantic's serializer: ~5x `json`)."""
    try:
        raw = type(event).__pydantic_serializer__.to_json(event, exclude_none=True, exclude=_NOT_PAYLOAD)
    except PydanticSerializationError:
        payload = event_payload(event)
        payload.pop("type", None)
        return _ASCII_ENCODER.encode(payload)
    return raw.decode()
