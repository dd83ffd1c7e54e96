"""A daemon that lies about ports or tunnels (a real fake daemon in a real sandbox) costs only its session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.hostile.support import new_session, rss_mb, use_fake_daemon
from tests.previews.helpers import serve_app
from tests.support.server import run_server


@pytest.mark.parametrize("mode", ["tunnel_big", "tunnel_unknown", "tunnel_flood"])
async def test_lying_tunnel_data_resets_only_that_channel(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        good = await new_session(server.client)
        await serve_app(server, good, 8000)
        use_fake_daemon(monkeypatch, mode)
        bad = await new_session(server.client)
        before = rss_mb()
        response = await server.client.get(f"/api/sessions/{bad}/ports/8000/")
        assert response.status_code == 502, response.text
        assert rss_mb() - before < 100, "a lying daemon grew the server"
        client = server.runtime.sessions.peek(bad)
        assert client is not None
        sandbox = client.sandbox
        assert sandbox._client is None or sandbox._client.closed  # type: ignore[attr-defined]  # reset
        assert (await server.client.get(f"/api/sessions/{good}/ports/8000/")).status_code == 200


@pytest.mark.parametrize("mode", ["ports_range", "ports_many"])
async def test_a_lying_port_listing_is_a_502(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        use_fake_daemon(monkeypatch, mode)
        bad = await new_session(server.client)
        response = await server.client.get(f"/api/sessions/{bad}/ports")
        assert response.status_code == 502, response.text
        assert "protocol" in response.json()["detail"]
