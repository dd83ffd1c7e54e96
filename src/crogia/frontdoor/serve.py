"""`crogia serve`: uvicorn with the front door's protocol, timeouts and start-up checks."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn
from uvicorn.supervisors import ChangeReload

from crogia.cli import WS_IMPL
from crogia.config import Settings
from crogia.frontdoor import fds
from crogia.frontdoor.http import FrontDoorProtocol
from crogia.frontdoor.limits import FrontDoorConfig, FrontDoorLimits

log = logging.getLogger("crogia.frontdoor")

WS_MAX_SIZE = 4 * 1024 * 1024
"""Largest WebSocket message a client may send (a bigger one closes that socket with 1009)."""
BACKLOG = 2048
"""Connections the kernel queues before accept(): they hold no descriptor of ours."""
SHUTDOWN_BACKSTOP = 2.0
"""Seconds past SHUTDOWN_TIMEOUT before uvicorn cancels whatever is left itself (a WebSocket's task
that ignores its close, say); the front door has stopped every HTTP request by then."""


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's own knobs for the limits it has (WebSocket pings and size, keep-alive, backlog)."""
    return {
        "http": FrontDoorProtocol,
        "ws": WS_IMPL,
        "ws_max_size": WS_MAX_SIZE,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        "ws_per_message_deflate": settings.ws_compression,
        "timeout_keep_alive": settings.keepalive_timeout,
        "timeout_graceful_shutdown": settings.shutdown_timeout + SHUTDOWN_BACKSTOP,
        "backlog": BACKLOG,
        "h11_max_incomplete_event_size": settings.max_header_bytes,  # if someone picks `--http h11`
        "log_config": None,
    }


def serve(settings: Settings, *, host: str, port: int, loop: str, reload: bool) -> None:
    """Check the descriptor budget, then serve until a signal."""
    budget = fds.plan(settings)
    log.info("%s", budget.describe())
    options = {"host": host, "port": port, "loop": loop, **uvicorn_options(settings)}
    limits = FrontDoorLimits.from_settings(settings, budget)
    if reload:
        config = FrontDoorConfig("crogia.asgi:app", front_door=limits, reload=True, **options)
        ChangeReload(config, target=uvicorn.Server(config).run, sockets=[config.bind_socket()]).run()
        return
    from crogia.app import create_app

    uvicorn.Server(FrontDoorConfig(create_app(settings), front_door=limits, **options)).run()
