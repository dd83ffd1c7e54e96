"""Helpers of the hostile suite: a real server in this process, sessions, and a replaced daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

FAKE_SOURCE = (Path(__file__).parent / "fake_daemon.py").read_text()


def use_fake_daemon(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Sandboxes started from now on run `fake_daemon.py` in `mode` instead of the executor.

    Both backends build their command through the `daemon_command` they imported; today's takes the
    channel's options, an older one took none (its daemon listened on a socket it was told of).
    """
    source = FAKE_SOURCE.replace("MODE_HERE", mode)

    def command(channel: object = None, python: str = "/usr/bin/python3") -> list[str]:
        options = channel if isinstance(channel, list) else ["--socket", "/run/crogia/executor.sock"]
        return ["/usr/bin/python3", "-S", "-c", source, *options]

    monkeypatch.setattr("crogia.sandbox.bubblewrap.daemon_command", command)
    monkeypatch.setattr("crogia.sandbox.docker.daemon_command", command)


async def new_session(client: httpx.AsyncClient) -> str:
    response = await client.post("/api/sessions", json={})
    assert response.status_code == 200, response.text
    sid: str = response.json()["session_id"]
    return sid


async def shell(client: httpx.AsyncClient, sid: str, cmd: str, timeout: float = 30) -> dict[str, Any]:
    response = await client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd, "timeout": timeout})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def rss_mb() -> float:
    """This process's resident memory (the in-process server's), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
