"""API_TOKENS: tokens required, tenants isolated (404 for another tenant's sessions), health open."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import make_settings
from tests.support.server import run_server


async def test_tokens_and_tenants(data_dir: Path) -> None:
    settings = make_settings(data_dir, "bubblewrap", api_tokens="alice=tok-a,bob=tok-b")
    async with run_server(settings, token="tok-a") as alice:
        base = alice.base_url
        async with (
            httpx.AsyncClient(base_url=base) as anon,
            httpx.AsyncClient(base_url=base, headers={"Authorization": "Bearer tok-b"}) as bob,
            httpx.AsyncClient(base_url=base, headers={"Authorization": "Bearer wrong"}) as wrong,
        ):
            assert (await anon.get("/api/health")).status_code == 200
            assert (await anon.get("/api/sessions")).status_code == 401
            assert (await wrong.get("/api/sessions")).status_code == 401
            assert (await anon.post("/api/sessions", json={})).status_code == 401
            sid = (await alice.create_session(task="mine"))["session_id"]
            assert (await bob.get("/api/sessions")).json() == []
            for method, path in [
                ("GET", f"/api/sessions/{sid}"),
                ("DELETE", f"/api/sessions/{sid}"),
                ("POST", f"/api/sessions/{sid}/shell"),
                ("GET", f"/api/sessions/{sid}/files"),
                ("GET", f"/api/sessions/{sid}/processes"),
            ]:
                body = {"cmd": "id"} if path.endswith("shell") else None
                response = await bob.request(method, path, json=body)
                assert response.status_code == 404, (method, path, response.text)
            assert (await alice.client.get(f"/api/sessions/{sid}")).status_code == 200
        async with websockets.connect(f"{alice.ws_url}/ws/{sid}?token=tok-b") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
        async with websockets.connect(f"{alice.ws_url}/ws/{sid}") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        async with websockets.connect(f"{alice.ws_url}/ws/{sid}?token=tok-a") as ws:
            assert json.loads(await ws.recv())["type"] == "connection_established"
        await alice.client.delete(f"/api/sessions/{sid}")


def test_bad_token_setting_is_refused() -> None:
    from crogia.config import parse_tokens

    with pytest.raises(ValueError, match="name=token"):
        parse_tokens("alice")
    assert parse_tokens(" alice = a , bob=b ") == {"a": "alice", "b": "bob"}
