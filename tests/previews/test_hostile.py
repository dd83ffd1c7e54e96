"""A daemon that lies about ports or tunnels (a real fake daemon in a real sandbox) costs only its session.

Tunnel bytes are binary frames: one over FRAME_MAX, bytes after the stream's end, and a flood that
ignores credit each break the protocol (frames for a stream the server does not know are dropped:
the protocol calls that a race, not a lie)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import websockets
from sqlalchemy import text

from crogia.sandbox import tunnel_socket
from crogia.services import previews
from tests.conftest import make_settings
from tests.hostile.support import new_session, rss_mb, use_fake_daemon
from tests.previews.helpers import APP, serve_app, start, write_file
from tests.previews.test_bad_servers import LIMIT, raw_upload_to_a_deaf_server
from tests.support.server import run_server


@pytest.mark.parametrize("mode", ["tunnel_big", "tunnel_after_end"])
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


@pytest.mark.selector_loop
@pytest.mark.parametrize("lie", ["none", "pipe", "unix", "listener", "elsewhere"])
async def test_a_socket_handed_over_that_is_not_the_one_asked_for_is_closed_unread(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch, lie: str
) -> None:
    """`tunnel_handoff` answered with no fd, a pipe, a unix socket, a listening socket on the port, or
    a socket connected elsewhere: a 502, the channel reset, the fd closed (none kept by the server)."""
    seen: list[str] = []
    check = tunnel_socket.checked_socket

    def spied(fd: int, port: int, local: int) -> socket.socket | None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))  # e.g. "pipe:[123]": what it is, to look for after
        return check(fd, port, local)

    monkeypatch.setattr(tunnel_socket, "checked_socket", spied)  # a spy: the check itself decides
    async with run_server(make_settings(data_dir, backend)) as server:
        good = await new_session(server.client)
        await serve_app(server, good, 8000)
        use_fake_daemon(monkeypatch, f"tunnel_handoff_{lie}")
        bad = await new_session(server.client)
        live = server.runtime.sessions.peek(bad)
        assert live is not None
        response = await server.client.get(f"/api/sessions/{bad}/ports/8000/")
        assert response.status_code == 502, response.text
        assert "broke the protocol" in response.json()["detail"]
        assert live.sandbox._client is None or live.sandbox._client.closed  # type: ignore[attr-defined]
        assert len(seen) == (lie != "none"), seen
        held = {os.readlink(f"/proc/self/fd/{fd}") for fd in _fds()}
        assert not held & set(seen), f"the server kept what it was handed: {seen}"
        assert (await server.client.get(f"/api/sessions/{good}/ports/8000/")).status_code == 200


def _fds() -> list[str]:
    names = os.listdir("/proc/self/fd")
    return [n for n in names if os.path.exists(f"/proc/self/fd/{n}")]


async def test_a_daemon_sending_past_its_credit_is_cut_off_in_bounded_memory(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        use_fake_daemon(monkeypatch, "tunnel_flood")
        bad = await new_session(server.client)
        live = server.runtime.sessions.peek(bad)
        assert live is not None
        sandbox = live.sandbox
        before = rss_mb()
        async with server.client.stream("GET", f"/api/sessions/{bad}/ports/8000/") as response:
            # The head was honest. Whether it reaches the client before the flood cuts the channel
            # depends on how much one read takes (uvloop reads more at once): 200 or 502, nothing more.
            assert response.status_code in (200, 502), response.status_code
            deadline = time.monotonic() + 30
            while not sandbox._client.closed:  # type: ignore[attr-defined]  # we read nothing: no credit
                assert time.monotonic() < deadline, "the flood past the window was not cut off"
                await asyncio.sleep(0.02)  # polling a condition with a deadline
        assert rss_mb() - before < 100, "a flooding daemon grew the server"


async def test_a_daemon_that_stops_reading_costs_only_that_request(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_server(make_settings(data_dir, backend, preview_timeout=1.0)) as server:
        use_fake_daemon(monkeypatch, "tunnel_deaf")
        bad = await new_session(server.client)
        started = time.monotonic()
        status = await raw_upload_to_a_deaf_server(server, f"/api/sessions/{bad}/ports/8000/upload")
        assert status.startswith(b"HTTP/1.1 504"), status  # its writes backed up: given up, not hung
        assert time.monotonic() - started < LIMIT
        assert (await server.client.get("/api/health")).status_code == 200
    # leaving `run_server` shut the server down: nothing of that request held it


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


async def test_a_sandbox_that_never_says_its_ports_holds_back_no_other_sessions_events(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port watcher reads every watched session's ports each PREVIEW_POLL_SECONDS, and a daemon
    is the sandbox's: one that never answers must cost only its own session, not make every other
    session wait out its timeout (5 s) before its ports are read."""
    async with run_server(make_settings(data_dir, backend, preview_poll_seconds=0.2)) as server:
        honest = await new_session(server.client)
        use_fake_daemon(monkeypatch, "ports_silent")
        silent = await new_session(server.client)
        await write_file(server, honest, "app.py", APP)
        async with (
            websockets.connect(f"{server.ws_url}/ws/{silent}") as watched,  # someone cares: it is read
            websockets.connect(f"{server.ws_url}/ws/{honest}") as ws,
        ):
            for each in (watched, ws):
                await each.recv()  # connection_established

            async def opened(port: int) -> float:
                began = time.monotonic()
                await start(server, honest, f"python3 app.py {port}")
                async with asyncio.timeout(30):
                    while True:
                        event = json.loads(await ws.recv())
                        if event["type"] == "port_opened" and event["port"] == port:
                            return time.monotonic() - began

            await opened(8001)  # seen right after a read of the honest session's ports
            took = await opened(8002)  # so this one waits for the next read: one poll, not 5 s
        assert took < 2.5, f"the honest session's port was seen after {took:.1f} s"


FLIPPER = r"""
import socket, sys, time
count, until = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    held = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        held.append(s)
    time.sleep(0.05)
    for s in held:
        s.close()
    time.sleep(0.05)
"""
"""Opens `count` listening ports on fresh numbers, closes them, and again, for that many seconds."""


async def test_a_sandbox_flipping_its_ports_gets_a_bounded_number_of_port_events(
    backend: str, data_dir: Path
) -> None:
    """Every port event is stored for good, and the ports are the sandbox's to open: 200 fresh ones
    opened and closed ten times a second, looked at ten times a second, must not turn into thousands
    of stored events. What the stream says is at most PORT_EVENTS_BURST at once, then
    PORT_EVENTS_PER_SECOND; GET /ports tells the truth at any moment. And a rate is not a total: the
    store keeps only the newest SANDBOX_EVENTS_KEPT of them (and the agent's events all)."""
    settings = make_settings(data_dir, backend, preview_poll_seconds=0.1, sandbox_events_kept=20)
    async with run_server(settings) as server:
        sid = await new_session(server.client)
        wrote = await server.client.post(
            f"/api/sessions/{sid}/files/content", json={"path": "flip.py", "content": FLIPPER}
        )
        assert wrote.status_code == 200, wrote.text
        seen = 0
        async with websockets.connect(f"{server.ws_url}/ws/{sid}") as ws:
            await ws.recv()  # connection_established
            began = time.monotonic()
            flipping = {"cmd": "python3 flip.py 200 4"}
            started = await server.client.post(f"/api/sessions/{sid}/processes", json=flipping)
            assert started.status_code == 200, started.text
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(4):
                    while True:
                        event = json.loads(await ws.recv())
                        seen += event["type"] in ("port_opened", "port_closed")
            took = time.monotonic() - began
        assert seen > 20, "the flipper's ports were never seen: the test shows nothing"
        budget = previews.PORT_EVENTS_BURST + previews.PORT_EVENTS_PER_SECOND * took
        assert seen <= budget, (seen, budget)
        runtime = server.runtime
        await runtime.bus.flush()
        async with runtime.db.session() as db:
            kinds = (
                await db.execute(text("SELECT type FROM events WHERE session_id = :s"), {"s": sid})
            ).all()
        stored = [kind for (kind,) in kinds]
        assert 20 <= stored.count("port_opened") + stored.count("port_closed") <= 22, stored
        assert stored.count("process_started") == 1


def test_port_events_past_the_budget_wait_and_coalesce() -> None:
    budget = previews._Budget()
    budget.tokens = 2.0
    assert budget.spend(frozenset(), frozenset({1, 2, 3})) == {1, 2}  # 3 waits for a token
    assert budget.spend(frozenset({1, 2}), frozenset({1})) == {1, 2}  # no token: 2 still said open
    budget.at -= 1 / previews.PORT_EVENTS_PER_SECOND  # a token's worth of time later
    assert budget.spend(frozenset({1, 2}), frozenset({1})) == {1}
    budget.at -= 100.0  # long after: the bucket is full again, never fuller
    assert budget.spend(frozenset({1}), frozenset({1})) == {1}  # (3 opened and closed meanwhile: nothing)
    assert budget.tokens == previews.PORT_EVENTS_BURST
