"""The file-descriptor budget, checked at start-up: connections get what sandboxes and the store leave.

Every connection is a descriptor; so are each session's executor socket, its sandbox's pipes and
pidfds, the database and the logs. When accept() runs out of them, asyncio logs a traceback per
attempt and nothing else works, `/api/health` included. So the soft RLIMIT_NOFILE is raised to the
hard limit, a reserve is kept for MAX_SESSIONS sessions and the rest, and the connection cap is what
is left (at most MAX_CONNECTIONS), less a headroom where `/api/health` and clear 503s are answered.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from crogia.config import Settings

log = logging.getLogger(__name__)

BASE_FDS = 128
"""Descriptors the server needs whatever the load: database, logs, listeners, the Docker client, threads."""
FDS_PER_SESSION = 8
"""A session's executor connection (1 measured per idle session), plus log follows and streams."""
SESSIONS_WHEN_UNCAPPED = 256
"""The reserve assumes this many sessions when MAX_SESSIONS is 0."""


@dataclass(frozen=True)
class FdBudget:
    raised_from: int
    """The soft limit the process started with."""
    limit: int
    """The soft limit now."""
    reserved: int
    """Kept for sandboxes, the store and logs."""
    max_connections: int
    """Open connections served normally."""
    headroom: int
    """Connections past `max_connections` waiting to say what they want: `/api/health` is served, the
    rest get 503. A new one past the headroom evicts the oldest waiting one; past twice the headroom
    (requests in flight on such connections), new ones get 503 at once."""

    def describe(self) -> str:
        raised = f" (soft limit raised from {self.raised_from})" if self.raised_from < self.limit else ""
        return (
            f"file descriptors: limit {self.limit}{raised}; {self.reserved} kept for sandboxes, the "
            f"database and logs; up to {self.max_connections} connections (+{self.headroom} for "
            "/api/health and 503 answers)"
        )


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def plan(settings: Settings) -> FdBudget:
    """Raise the soft limit and split it; warns when MAX_CONNECTIONS or MAX_SESSIONS do not fit."""
    before, limit = raise_soft_limit()
    sessions = settings.max_sessions or SESSIONS_WHEN_UNCAPPED
    reserved = BASE_FDS + sessions * FDS_PER_SESSION
    if limit - reserved < limit // 2:
        log.warning(
            "RLIMIT_NOFILE is %d: too few descriptors for %d sessions and their connections; "
            "raise it (ulimit -n, systemd LimitNOFILE=) or lower MAX_SESSIONS",
            limit,
            sessions,
        )
        reserved = limit // 2
    available = limit - reserved
    headroom = max(8, min(256, min(settings.max_connections, available) // 8))
    cap = min(settings.max_connections, available - 2 * headroom)
    if cap < settings.max_connections:
        log.warning(
            "MAX_CONNECTIONS lowered from %d to %d to fit RLIMIT_NOFILE %d",
            settings.max_connections,
            cap,
            limit,
        )
    return FdBudget(
        raised_from=before, limit=limit, reserved=reserved, max_connections=cap, headroom=headroom
    )
