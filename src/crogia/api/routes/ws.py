"""`WS /ws/{session_id}`: the session's events, replayed from `?since=N` and then live.

Frames from the client never break the socket: `{"type": "ping"}` gets a pong, anything else
is echoed back as `{"type": "echo", "data": ...}` (the seed's behaviour), oversized text is
refused with a message, and binary frames are ignored with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Query, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from crogia.api.deps import ws_tenant
from crogia.bus import Subscription, SubscriptionClosed, iso_now
from crogia.errors import CrogiaError, NotFound, Unauthorized
from crogia.runtime import SHUTTING_DOWN, Runtime

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"])

MAX_ECHO = 64 * 1024
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_SLOW = 4008
CLOSE_GOING_AWAY = 1001


@router.websocket("/ws/{session_id}")
async def events(
    websocket: WebSocket, session_id: str, since: Annotated[int | None, Query(ge=0)] = None
) -> None:
    runtime: Runtime = websocket.app.state.runtime
    try:
        tenant = ws_tenant(websocket)
        await runtime.sessions.get(session_id, tenant=tenant)
    except (Unauthorized, NotFound) as exc:
        # Accept, then close with a code: browsers cannot read the status of a refused handshake.
        code = CLOSE_UNAUTHORIZED if isinstance(exc, Unauthorized) else CLOSE_NOT_FOUND
        await websocket.accept()
        await websocket.close(code=code, reason=exc.message[:120])
        return
    await websocket.accept()
    if runtime.stopping:
        await websocket.close(code=CLOSE_GOING_AWAY, reason=SHUTTING_DOWN)
        return
    # Registered so a graceful stop (`Runtime.drain`) can wait for this socket to close.
    stream = asyncio.current_task()
    assert stream is not None
    runtime.streams.add(stream)
    try:
        await _stream(websocket, runtime, session_id, since)
    finally:
        runtime.streams.discard(stream)


async def _stream(websocket: WebSocket, runtime: Runtime, session_id: str, since: int | None) -> None:
    after = runtime.bus.last_seq(session_id) if since is None else since
    sub = await runtime.bus.subscribe(session_id, after=after)
    hello = {
        "type": "connection_established",
        "session_id": session_id,
        "message": f"Connected to session {session_id}",
        "timestamp": iso_now(),
        "last_seq": runtime.bus.last_seq(session_id),
    }
    send_lock = asyncio.Lock()
    await websocket.send_text(json.dumps(hello))
    sender = asyncio.create_task(_send_events(websocket, sub, send_lock))
    receiver = asyncio.create_task(_receive(websocket, send_lock))
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sub.close("client disconnected")
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        await _close(websocket, sender)


async def _send_events(websocket: WebSocket, sub: Subscription, lock: asyncio.Lock) -> tuple[int, str]:
    try:
        async for _seq, data in sub:
            async with lock:
                await websocket.send_text(data)
                for more in sub.take_ready():  # what queued up meanwhile, without a wake-up each
                    await websocket.send_text(more)
    except SubscriptionClosed as closed:
        slow = "behind" in closed.reason
        return (CLOSE_TOO_SLOW if slow else CLOSE_GOING_AWAY), closed.reason
    return CLOSE_GOING_AWAY, "stream ended"


async def _receive(websocket: WebSocket, lock: asyncio.Lock) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        reply = _reply_to(message.get("text"), message.get("bytes"))
        async with lock:
            await websocket.send_text(json.dumps(reply))


def _reply_to(text: str | None, data: bytes | None) -> dict[str, object]:
    if text is None:
        return {"type": "error", "message": "Binary frames are not understood; send JSON text."}
    if len(text) > MAX_ECHO:
        return {"type": "error", "message": f"Frame of {len(text)} characters ignored (limit {MAX_ECHO})."}
    with contextlib.suppress(ValueError):
        parsed = json.loads(text)
        if isinstance(parsed, dict) and parsed.get("type") == "ping":
            return {"type": "pong", "timestamp": iso_now()}
    return {"type": "echo", "data": text}


async def _close(websocket: WebSocket, sender: asyncio.Task[tuple[int, str]]) -> None:
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    code, reason = CLOSE_GOING_AWAY, "closing"
    if sender.done() and not sender.cancelled() and sender.exception() is None:
        code, reason = sender.result()
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, CrogiaError):
        await websocket.close(code=code, reason=reason[:120])
    log.debug("websocket closed: %s %s", code, reason)
