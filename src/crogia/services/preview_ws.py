"""The preview proxy's WebSocket half: a handshake with the sandbox's server over a tunnel, then a pump.

websockets' sans-I/O client speaks to the server in the sandbox (`previews.PreviewService.open`
gives the tunnel); the client's side is any `WebSocketPeer` (Starlette's `WebSocket` fits).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from crogia.errors import SandboxError, UpstreamTimeout
from crogia.sandbox.tunnel_channel import TunnelClosed
from crogia.sandbox.tunnel_socket import AnyTunnel
from crogia.services.previews import ClientInfo, upstream_headers

log = logging.getLogger(__name__)


class WebSocketPeer(Protocol):
    """The client's side of a proxied WebSocket (Starlette's `WebSocket` fits)."""

    async def accept(self, subprotocol: str | None = None) -> None: ...

    async def receive(self) -> Mapping[str, Any]: ...

    async def send_text(self, data: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class UpstreamRefused(SandboxError):
    """The sandbox's server answered the WebSocket handshake with something other than 101."""


async def _flush(protocol: ClientProtocol, tunnel: AnyTunnel, timeout: float | None = None) -> None:
    """Write what the protocol has to send; a server that reads none of it for `timeout` s is given up."""
    async with asyncio.timeout(timeout):
        for data in protocol.data_to_send():
            if data:
                await tunnel.write(data)


async def websocket_handshake(
    tunnel: AnyTunnel,
    port: int,
    target: str,
    headers: Sequence[tuple[bytes, bytes]],
    info: ClientInfo,
    *,
    timeout: float,
    max_size: int,
) -> tuple[ClientProtocol, list[Frame]]:
    """Open a WebSocket to the sandbox's server over `tunnel`: its protocol and the frames already read."""
    names = {name.lower(): value.decode("latin-1") for name, value in headers}
    offered = [
        Subprotocol(p.strip()) for p in names.get(b"sec-websocket-protocol", "").split(",") if p.strip()
    ]
    origin = names.get(b"origin")
    protocol = ClientProtocol(
        parse_uri(f"ws://localhost:{port}{target}"),
        origin=Origin(origin) if origin else None,
        subprotocols=offered or None,
        max_size=max_size,
    )
    request = protocol.connect()
    for name, value in upstream_headers(headers, port, info, ws=True):
        text = name.decode("latin-1")
        if text not in ("host", "origin", "user-agent"):
            request.headers[text] = value.decode("latin-1")
    protocol.send_request(request)
    try:
        async with asyncio.timeout(timeout):
            await _flush(protocol, tunnel)
            while True:
                data = await tunnel.read()
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                events = protocol.events_received()
                if events or not data:
                    break
    except TimeoutError:
        raise UpstreamTimeout(
            f"The server on port {port} in the sandbox did not answer within {timeout:g} s."
        ) from None
    except TunnelClosed:
        raise SandboxError(f"The server on port {port} in the sandbox closed the connection.") from None
    if protocol.handshake_exc is not None or not events or not isinstance(events[0], WsResponse):
        raise UpstreamRefused(
            f"The server on port {port} in the sandbox refused the WebSocket: {protocol.handshake_exc}"
        )
    return protocol, [e for e in events[1:] if isinstance(e, Frame)]


async def pump_websocket(
    protocol: ClientProtocol, tunnel: AnyTunnel, peer: WebSocketPeer, early: list[Frame], *, timeout: float
) -> None:
    """Carry messages both ways until either side closes; closes the tunnel.

    A server that stops reading holds a write up for at most `timeout` s: then both sides are
    closed (1011), so a deaf server never wedges the proxy (or its shutdown)."""
    closing = asyncio.Event()

    async def upstream_to_client() -> None:
        parts: list[bytes] = []
        kind = Opcode.TEXT
        pending = list(early)
        while True:
            for frame in pending:
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    kind, parts = frame.opcode, [bytes(frame.data)]
                elif frame.opcode is Opcode.CONT:
                    parts.append(bytes(frame.data))
                elif frame.opcode is Opcode.CLOSE:
                    await _flush(protocol, tunnel, timeout)
                    code = protocol.close_rcvd.code if protocol.close_rcvd else 1000
                    await peer.close(code if 1000 <= code < 5000 and code not in (1005, 1006, 1015) else 1000)
                    return
                else:
                    continue
                if frame.fin:
                    message = b"".join(parts)
                    parts = []
                    if kind is Opcode.TEXT:
                        await peer.send_text(message.decode("utf-8", "replace"))
                    else:
                        await peer.send_bytes(message)
            await _flush(protocol, tunnel, timeout)  # pongs
            data = await tunnel.read()
            if not data:
                protocol.receive_eof()
                await peer.close(1011 if not closing.is_set() else 1000)
                return
            protocol.receive_data(data)
            pending = [e for e in protocol.events_received() if isinstance(e, Frame)]

    async def client_to_upstream() -> None:
        while True:
            message = await peer.receive()
            if message["type"] == "websocket.disconnect":
                closing.set()
                code = message.get("code", 1000)
                protocol.send_close(code if 1000 <= code < 5000 and code not in (1005, 1006, 1015) else 1000)
                await _flush(protocol, tunnel, timeout)
                return
            if message.get("text") is not None:
                protocol.send_text(message["text"].encode())
            elif message.get("bytes") is not None:
                protocol.send_binary(message["bytes"])
            await _flush(protocol, tunnel, timeout)

    try:
        tasks = [
            asyncio.create_task(upstream_to_client(), name="preview-ws-down"),
            asyncio.create_task(client_to_upstream(), name="preview-ws-up"),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, TunnelClosed | ConnectionError):
                log.info("preview WebSocket on the sandbox's side ended: %r", result)
    finally:
        await tunnel.close()
