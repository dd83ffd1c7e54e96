"""Item 2 of issue 10: the daemon's replies are untrusted input.

Each case starts a session whose sandbox runs `fake_daemon.py` (a real process in a real sandbox,
speaking the protocol badly) through a real server, next to a session with the real daemon.
The bad session gets a clear 502 (then 502/503 while its sandbox comes back), never a 500 and
never more than the server's bounds; the good session and the shutdown are untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_settings
from tests.hostile.support import new_session, rss_mb, shell, use_fake_daemon
from tests.support.server import run_server

BROKEN = ["big", "nonobject", "types", "hugeint", "garbage", "endless"]


@pytest.mark.parametrize("mode", BROKEN)
async def test_a_broken_reply_costs_only_its_session(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        good = await new_session(server.client)
        use_fake_daemon(monkeypatch, mode)
        bad = await new_session(server.client)
        before = rss_mb()
        response = await server.client.post(f"/api/sessions/{bad}/shell", json={"cmd": "echo hi"})
        assert response.status_code == 502, response.text
        assert "protocol" in response.json()["detail"]
        assert rss_mb() - before < 100, "a reply grew the server past its line bound"
        again = await server.client.post(f"/api/sessions/{bad}/shell", json={"cmd": "echo hi"})
        assert again.status_code in (502, 503), again.text
        assert (await shell(server.client, good, "echo fine"))["output"] == "fine\n"


async def test_a_huge_pid_is_a_502(backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        use_fake_daemon(monkeypatch, "hugeint")
        bad = await new_session(server.client)
        response = await server.client.post(f"/api/sessions/{bad}/processes", json={"cmd": "sleep 9"})
        assert response.status_code == 502, response.text
        assert "protocol" in response.json()["detail"]


async def test_an_exit_notice_flood_is_bounded(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        good = await new_session(server.client)
        use_fake_daemon(monkeypatch, "flood")
        bad = await new_session(server.client)
        before = rss_mb()
        body = await shell(server.client, bad, "echo hi", timeout=60)  # 300,000 notices, then the reply
        assert body["output"] == "after the flood\n"
        assert rss_mb() - before < 100, "exit notices grew the server"
        assert (await shell(server.client, good, "echo fine"))["output"] == "fine\n"
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10, "the shutdown waited on the flood"


FILES_BROKEN = {
    "fs_types": ("GET", "/files", None),
    "fs_nul": ("GET", "/files", None),
    "fs_escape": ("GET", "/files", None),
    "fs_nan": ("GET", "/files", None),
    "fs_many": ("GET", "/files", None),
    "fs_huge": ("GET", "/files", None),
    "fs_rg_endless": ("POST", "/search/files", {"pattern": "*"}),
    "fs_rg_context": ("POST", "/search/grep", {"pattern": "x", "context": 2}),
    "fs_overrun": ("GET", "/files/content", None),
}
"""SANDBOX_FILES=daemon: how each lie of `fake_daemon.py` reaches the server (method, route, body)."""


@pytest.mark.parametrize("mode", list(FILES_BROKEN))
async def test_a_lying_file_reply_is_a_502_for_its_request(
    backend: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Wrong types, NULs, `..`, NaN, too many entries, huge lines, endless records, frames past the
    window: each costs its request a 502 (never a 500), and the server's memory stays bounded."""
    async with run_server(make_settings(data_dir, backend, sandbox_files="daemon")) as server:
        good = await new_session(server.client)
        use_fake_daemon(monkeypatch, mode)
        bad = await new_session(server.client)
        method, route, body = FILES_BROKEN[mode]
        before = rss_mb()
        params = {"path": "a.txt"} if route == "/files/content" else None
        response = await server.client.request(
            method, f"/api/sessions/{bad}{route}", json=body, params=params
        )
        assert response.status_code == 502, response.text
        assert "protocol" in response.json()["detail"]
        assert rss_mb() - before < 150, "a file reply grew the server past its bounds"
        listing = await server.client.get(f"/api/sessions/{good}/files")
        assert listing.status_code == 200, listing.text


FILES_SILENT = [
    ("fs_silent", "GET", "/files", None),
    ("fs_silent", "GET", "/files/content", None),
    ("fs_silent", "GET", "/files/raw", None),
    ("fs_silent", "POST", "/files/content", {"path": "a.txt", "content": "hi"}),
    ("fs_stall", "GET", "/files/content", None),
    ("fs_stall", "GET", "/files/raw", None),
]
"""Daemons that never answer, or open a read and stall: (mode, method, route, body)."""


@pytest.mark.parametrize(("mode", "method", "route", "body"), FILES_SILENT)
async def test_a_silent_or_stalled_file_op_is_a_504_within_files_timeout(
    backend: str,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    method: str,
    route: str,
    body: dict[str, str] | None,
) -> None:
    """A daemon that never replies, or sends a few bytes of a read and then nothing, costs that
    request a 504 after FILES_TIMEOUT without progress (not forever); the server serves on."""
    settings = make_settings(data_dir, backend, sandbox_files="daemon", files_timeout=1.0)
    async with run_server(settings) as server:
        good = await new_session(server.client)
        use_fake_daemon(monkeypatch, mode)
        bad = await new_session(server.client)
        params = {"path": "a.txt"} if body is None and route != "/files" else None
        started = time.monotonic()
        if mode == "fs_stall" and route == "/files/raw":  # its head is sent at once: the body is cut short
            got = bytearray()
            cut = False
            async with server.client.stream("GET", f"/api/sessions/{bad}{route}", params=params) as r:
                assert r.status_code == 200
                try:
                    async for chunk in r.aiter_bytes():
                        got += chunk
                except httpx.RemoteProtocolError:
                    cut = True
            assert cut, "the stalled download's body was not cut short"
            assert bytes(got) == b"abcde"
        else:
            response = await server.client.request(
                method, f"/api/sessions/{bad}{route}", json=body, params=params, timeout=30
            )
            assert response.status_code == 504, response.text
            assert "FILES_TIMEOUT" in response.json()["detail"]
        took = time.monotonic() - started
        assert took < 15, f"the request took {took:.1f}s"
        listing = await server.client.get(f"/api/sessions/{good}/files")
        assert listing.status_code == 200, listing.text
