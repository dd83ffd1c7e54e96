"""`WS_COMPRESSION`: permessage-deflate is offered back to a client that asks, unless switched off."""

from __future__ import annotations

from pathlib import Path

import websockets

from tests.support.subprocess_server import ServerProcess, server_env


async def test_ws_compression_setting_reaches_the_handshake(data_dir: Path) -> None:
    for setting, expected in (("true", True), ("false", False)):
        env = {**server_env(data_dir, "bubblewrap", "http://127.0.0.1:9"), "WS_COMPRESSION": setting}
        server = ServerProcess(data_dir, env)
        await server.start()
        try:
            async with websockets.connect(f"{server.ws_url}/ws/shells/shell_0123abcd") as ws:  # asks for it
                assert ws.response is not None
                negotiated = ws.response.headers.get("Sec-WebSocket-Extensions") or ""
                assert ("permessage-deflate" in negotiated) == expected, (setting, negotiated)
        finally:
            await server.stop()
