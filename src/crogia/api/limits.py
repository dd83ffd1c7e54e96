"""A pure-ASGI request body cap: 413 before a handler reads more than the limit."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

STREAMED_UPLOAD = "/files/raw"
PREVIEW = re.compile(r"/api/sessions/[^/]+/ports/\d+/")
"""Proxied to the sandbox as they arrive (previews): streamed too."""


class BodyLimit:
    """`max_bytes` for streamed uploads (`PUT .../files/raw`, written to disk as they arrive);
    `json_max_bytes` for every other body, which is held in memory whole, parsed, and copied."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, json_max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.json_max_bytes = min(max_bytes, json_max_bytes or max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streamed = scope["method"] == "PUT" and scope["path"].endswith(STREAMED_UPLOAD)
        streamed = streamed or PREVIEW.match(scope["path"]) is not None
        limit = self.max_bytes if streamed else self.json_max_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit, streamed)
            return
        await self._counted(scope, receive, send, limit, streamed)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int, streamed: bool) -> None:
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(send, limit, streamed)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int, streamed: bool) -> None:
    detail = f"Request body is larger than the limit of {limit} bytes."
    if not streamed:
        detail += " Upload large files with PUT .../files/raw (streamed, up to REQUEST_MAX_BYTES)."
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
