"""`WS /ws/shells/{shell_id}`: one interactive terminal, its scrollback replayed, then live.

Server -> client: `shell_connected`, then `shell_output` (`data`: text, UTF-8 decoded across
reads), `shell_exited` (`exit_code`) when the shell ends. With `?binary=1` the output comes as
binary frames of raw terminal bytes instead (the other messages stay JSON text).
Client -> server: `shell_input` (`data`), `shell_resize` (`rows`, `cols` within 1..1000), `ping`;
a binary frame is input as raw bytes. Anything else is ignored; a frame over 64 KiB closes 1009.
Close codes: 1008 unknown terminal, 4404 another tenant's, 4401 bad token, 4409 its session's
sandbox was stopped (create a terminal to wake it), 1000 replaced by a newer socket or ended.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from crogia.api.deps import ws_tenant
from crogia.bus import iso_now
from crogia.errors import CrogiaError, NotFound, Unauthorized
from crogia.runtime import Runtime
from crogia.services.terminals import Attachment, Terminal, TerminalService

log = logging.getLogger(__name__)
router = APIRouter(tags=["terminals"])

FRAME_MAX = 64 * 1024
SEND_CHUNK = 64 * 1024
CLOSE_NOT_FOUND, CLOSE_TOO_BIG, CLOSE_NORMAL = 1008, 1009, 1000
CLOSE_UNAUTHORIZED, CLOSE_OTHER_TENANT, CLOSE_STOPPED = 4401, 4404, 4409
Close = tuple[int, str]


@router.websocket("/ws/shells/{shell_id}")
async def shell_socket(websocket: WebSocket, shell_id: str) -> None:
    runtime: Runtime = websocket.app.state.runtime
    await websocket.accept()  # then close with a code: browsers cannot read a refused handshake's status
    refused = _refusal(websocket, runtime.terminals, shell_id)
    if refused is not None:
        await websocket.close(code=refused[0], reason=refused[1])
        return
    term = runtime.terminals.find(shell_id)
    assert term is not None
    binary = websocket.query_params.get("binary", "") in ("1", "true", "yes")
    hello = {"type": "shell_connected", "shell_id": term.id, "session_id": term.live.id,
             "timestamp": iso_now(), "message": f"Connected to {term.id}", "binary": binary}  # fmt: skip
    await websocket.send_text(json.dumps(hello))
    attachment = term.attach()
    lock = asyncio.Lock()
    with term.live.in_use():  # a terminal someone looks at keeps its sandbox up
        try:
            close = await _serve(websocket, runtime.terminals, term, attachment, binary, lock)
        finally:
            term.detach(attachment)
    if close is not None and websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, CrogiaError):
            await websocket.close(code=close[0], reason=close[1])


def _refusal(websocket: WebSocket, terminals: TerminalService, shell_id: str) -> Close | None:
    try:
        terminals.get(shell_id, tenant=ws_tenant(websocket))
    except Unauthorized as exc:
        return CLOSE_UNAUTHORIZED, exc.message[:120]
    except NotFound:
        term = terminals.find(shell_id)
        return (CLOSE_NOT_FOUND if term is None else CLOSE_OTHER_TENANT), "Shell session not found"
    term = terminals.find(shell_id)
    if term is None or term.status == "exited":
        return CLOSE_NOT_FOUND, "Shell session not found"
    if term.status == "stopped":
        return CLOSE_STOPPED, "The session is stopped; create a terminal to wake it"
    return None


async def _serve(
    websocket: WebSocket, terminals: TerminalService, term: Terminal, att: Attachment, binary: bool,
    lock: asyncio.Lock,
) -> Close | None:  # fmt: skip
    sender = asyncio.create_task(_send_output(websocket, term, att, binary, lock))
    receiver = asyncio.create_task(_receive(websocket, terminals, term, lock))
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, receiver):
            task.cancel()
        results = await asyncio.gather(sender, receiver, return_exceptions=True)
    for task, result in zip((sender, receiver), results, strict=True):
        if task in done and isinstance(result, tuple):
            return result
    return None  # the client went away


async def _send_output(
    websocket: WebSocket, term: Terminal, att: Attachment, binary: bool, lock: asyncio.Lock
) -> Close:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        await att.news.wait()
        att.news.clear()
        while not att.replaced:
            att.offset, data = term.ring.read(att.offset, SEND_CHUNK)
            if not data:
                break
            text = None if binary else decoder.decode(data)
            async with lock:
                if text is None:
                    await websocket.send_bytes(data)
                elif text:
                    await websocket.send_text(
                        json.dumps({"type": "shell_output", "data": text, "shell_id": term.id})
                    )
        if att.replaced:
            return CLOSE_NORMAL, "Replaced by new connection"
        if term.ended:
            ended = {"type": "shell_exited", "exit_code": term.exit_code, "shell_id": term.id,
                     "reason": "exited" if term.status == "exited" else "sandbox stopped"}  # fmt: skip
            async with lock:
                await websocket.send_text(json.dumps(ended))
            return CLOSE_NORMAL, "Shell exited" if term.status == "exited" else "Session stopped"


async def _receive(
    websocket: WebSocket, terminals: TerminalService, term: Terminal, lock: asyncio.Lock
) -> Close | None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text, data = message.get("text"), message.get("bytes")
        if (len(data) if data is not None else len(text or "")) > FRAME_MAX or (
            text is not None and len(text.encode("utf-8", "replace")) > FRAME_MAX
        ):
            return CLOSE_TOO_BIG, f"Input frame over {FRAME_MAX} bytes"
        try:
            if data is not None:
                await terminals.write(term, data)
            elif text is not None:
                await _handle(websocket, terminals, term, text, lock)
        except CrogiaError as exc:  # the sandbox went: the sender closes once the terminal says so
            log.debug("terminal %s input failed: %s", term.id, exc.message)


async def _handle(
    websocket: WebSocket, terminals: TerminalService, term: Terminal, text: str, lock: asyncio.Lock
) -> None:
    try:
        msg: Any = json.loads(text)
    except (ValueError, RecursionError):
        return  # ignored, as the original did: a stray frame never closes a terminal
    if not isinstance(msg, dict):
        return
    kind = msg.get("type")
    if kind == "shell_input" and isinstance(msg.get("data"), str):
        await terminals.write(term, msg["data"].encode("utf-8", "replace"))
    elif kind == "shell_resize" and _size_ok(msg.get("cols")) and _size_ok(msg.get("rows")):
        await terminals.resize(term, cols=msg["cols"], rows=msg["rows"])
    elif kind == "ping":
        async with lock:
            await websocket.send_text(json.dumps({"type": "pong", "timestamp": iso_now()}))


def _size_ok(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000
