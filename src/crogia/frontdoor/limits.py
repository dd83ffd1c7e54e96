"""The front door's limits, how they reach each connection, and the answers it writes itself."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

from crogia.config import Settings
from crogia.frontdoor import fds

log = logging.getLogger("crogia.frontdoor")


@dataclass(frozen=True)
class FrontDoorLimits:
    max_connections: int
    headroom: int
    header_timeout: float
    body_timeout: float
    body_min_rate: int
    max_header_bytes: int
    max_headers: int
    shutdown_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings, budget: fds.FdBudget) -> FrontDoorLimits:
        return cls(
            max_connections=budget.max_connections,
            headroom=budget.headroom,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            body_min_rate=settings.body_min_rate,
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            shutdown_timeout=settings.shutdown_timeout,
        )


class FrontDoorConfig(uvicorn.Config):
    """uvicorn's Config carrying the limits to each connection's protocol."""

    def __init__(self, app: Any, *, front_door: FrontDoorLimits, **options: Any) -> None:
        self.front_door = front_door
        super().__init__(app, **options)


def limits_of(config: uvicorn.Config) -> FrontDoorLimits:
    """The config's limits; under plain `uvicorn --http crogia.frontdoor.http:FrontDoorProtocol`,
    read once from the settings (environment and `.env`)."""
    found: FrontDoorLimits | None = getattr(config, "front_door", None)
    if found is None:
        settings = Settings()
        budget = fds.plan(settings)
        log.info("%s", budget.describe())
        found = FrontDoorLimits.from_settings(settings, budget)
        config.front_door = found  # type: ignore[attr-defined]
    return found


def answer(status: int, reason: str, detail: str, *extra: bytes) -> bytes:
    """A whole HTTP/1.1 response with a JSON `detail`, closing the connection."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}".encode(), b"content-type: application/json"]
    head += [b"content-length: %d" % len(body), b"connection: close", *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


SHUTTING_DOWN = answer(
    503, "Service Unavailable", "The server is shutting down; retry shortly.", b"retry-after: 1"
)
"""A request still unanswered at the shutdown deadline (`SHUTDOWN_TIMEOUT`)."""

AT_CAPACITY_DETAIL = "The server is at its connection limit (MAX_CONNECTIONS); retry shortly."
AT_CAPACITY = answer(503, "Service Unavailable", AT_CAPACITY_DETAIL, b"retry-after: 1")


async def at_capacity(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The ASGI app a connection past the cap gets for anything but `/api/health`."""
    body = json.dumps({"detail": AT_CAPACITY_DETAIL}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(b"connection", b"close"), (b"retry-after", b"1")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
