"""`create_app(settings)`: the FastAPI application, its routers, and the runtime's lifespan."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Message, Scope

from crogia import __version__
from crogia.api import errors
from crogia.api.limits import BodyLimit
from crogia.api.preview_fast import PreviewFast
from crogia.api.preview_host import PreviewHost
from crogia.api.routes import (
    conversation,
    files,
    health,
    previews,
    processes,
    search,
    sessions,
    shell,
    shells,
    shells_ws,
    tasks,
    ws,
)
from crogia.api.shutdown import drain_on_signal
from crogia.config import Settings
from crogia.runtime import Runtime

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    tokens = settings.tokens

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not tokens:
            log.warning(
                "API_TOKENS is not set: anyone who can reach this server can run code in its sandboxes"
            )
        runtime = await Runtime.start(settings)
        app.state.runtime = runtime
        await _build_routes(app)
        try:
            async with drain_on_signal(runtime):
                yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="Crogia",
        version=__version__,
        description="Sessions, sandboxes and an autonomous coding agent behind a REST + WebSocket API.",
        lifespan=lifespan,
        debug=False,
    )
    app.state.settings = settings
    app.state.tokens = tokens
    app.state.preview_key = settings.preview_link_key.encode() or secrets.token_bytes(32)
    errors.install(app)
    routes = (
        health,
        sessions,
        tasks,
        conversation,
        processes,
        files,
        search,
        shell,
        shells,
        shells_ws,
        ws,
        previews,
    )
    for module in routes:
        app.include_router(module.router)
    app.add_middleware(PreviewFast, api=app)  # the innermost: previews skip the routing below
    app.add_middleware(
        BodyLimit, max_bytes=settings.request_max_bytes, json_max_bytes=settings.json_max_bytes
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    if settings.preview_domain:
        app.add_middleware(PreviewHost, domain=settings.preview_domain)
    return app


async def _build_routes(app: FastAPI) -> None:
    """Have FastAPI build its route matchers now, not during the first real request.

    FastAPI builds each router's matching state on first use, ~0.1-0.2 s of CPU on the event loop;
    one request that matches nothing builds them all, before the server takes traffic.
    """
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/api/sessions/-/-/-", "raw_path": b"/api/sessions/-/-/-",
        "query_string": b"", "root_path": "", "headers": [], "client": None, "server": None, "state": {},
    }  # fmt: skip

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    await app(scope, receive, send)
