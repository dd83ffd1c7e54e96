"""Item 1 (and the host-path part of 8) of issue 10: the server never follows a path the sandbox
can write, and the channel to a sandbox's daemon is one the server made.

Through a real server on both backends: links and a FIFO planted where the server used to open its
log and socket, then an idle stop and wake; a socket swapped for another session's, then a lost
connection; on Docker, the channel folder is read-only and a stranger's dial is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from pathlib import Path

from tests.conftest import make_settings, need_docker
from tests.hostile.support import new_session, shell
from tests.support.server import RunningServer, run_server

REPO = Path(__file__).resolve().parents[2]


async def sleep_and_wake(server: RunningServer, sid: str) -> None:
    """Stop the session's sandbox as the idle reaper does; the next request starts it again."""
    live = server.runtime.sessions.peek(sid)
    assert live is not None
    assert await server.runtime.sessions.sleep(live, idle_for=0)


async def test_planted_links_are_never_followed(backend: str, data_dir: Path) -> None:
    canary = data_dir / "server.env"
    canary.write_text("API_TOKENS=alice=hunter2\n")
    async with run_server(make_settings(data_dir, backend)) as server:
        sid = await new_session(server.client)
        for name in ("executor.log", "executor.sock", "logs"):
            await shell(server.client, sid, f"rm -rf /run/crogia/{name}; ln -sfn {canary} /run/crogia/{name}")
        await sleep_and_wake(server, sid)
        fds = (await shell(server.client, sid, "readlink /proc/[0-9]*/fd/* 2>/dev/null; true"))["output"]
        assert str(canary) not in fds, "a process in the sandbox holds the server's file open"
    assert canary.read_text() == "API_TOKENS=alice=hunter2\n", "the server wrote through the sandbox's link"


async def test_a_fifo_does_not_freeze_starts(backend: str, data_dir: Path) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        sid = await new_session(server.client)
        await shell(server.client, sid, "rm -f /run/crogia/executor.log; mkfifo /run/crogia/executor.log")
        await sleep_and_wake(server, sid)
        try:
            wake = server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": "echo awake"})
            response = await asyncio.wait_for(wake, 15)
            assert response.status_code == 200 and response.json()["output"] == "awake\n"
        finally:  # where a server opened the FIFO (and blocks in a thread), open its other end
            await asyncio.to_thread(_unblock, server.settings.sandbox_state_dir / sid / "executor.log")


def _unblock(fifo: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(fifo.lstat().st_mode):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_swapped_socket_does_not_redirect_a_session(backend: str, data_dir: Path) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        first, second = await new_session(server.client), await new_session(server.client)
        for sid in (first, second):
            await shell(server.client, sid, f"echo {sid} > /workspace/whoami")
        swap = f"ln -sfn ../{second}/executor.sock /run/crogia/x && mv -T /run/crogia/x /run/crogia/"
        swap += "executor.sock"
        await shell(server.client, first, swap)
        live = server.runtime.sessions.peek(first)
        assert live is not None
        await live.sandbox._client.close()  # type: ignore[attr-defined]  # as when a daemon restarts
        assert (await shell(server.client, first, "cat /workspace/whoami"))["output"] == f"{first}\n"


async def test_the_docker_channel_is_read_only_and_refuses_strangers(data_dir: Path) -> None:
    need_docker()
    async with run_server(make_settings(data_dir, "docker")) as server:
        sid = await new_session(server.client)
        tries = "touch /run/crogia-channel/x 2>&-; echo $?; ln -s / /run/crogia-channel/y 2>&-; echo $?"
        assert (await shell(server.client, sid, tries))["output"].split() == ["1", "1"]
        folder = server.settings.sandbox_state_dir / sid
        secret = (folder / "secret").read_text()
        for offered in ("wrong", secret):  # the right secret from outside the container: still refused
            reader, writer = await asyncio.open_unix_connection(folder / "executor.sock")
            hello = {"type": "hello", "version": 2, "secret": offered, "pid": os.getpid()}
            writer.write((json.dumps(hello) + "\n").encode())
            answer = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert json.loads(answer or b"{}").get("type") == "reject", answer
        assert (await shell(server.client, sid, "echo still"))["output"] == "still\n"


async def test_no_server_path_in_the_sandbox_view(backend: str, data_dir: Path) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        sid = await new_session(server.client)
        cmdline = (await shell(server.client, sid, "tr '\\0' ' ' < /proc/1/cmdline"))["output"]
        assert str(data_dir) not in cmdline and str(REPO) not in cmdline, cmdline
        mounts = (await shell(server.client, sid, "cat /proc/self/mountinfo"))["output"]
        if backend == "bubblewrap":  # Docker shows its binds' sources: see the README
            assert str(server.settings.sandbox_state_dir) not in mounts


async def test_planted_links_then_a_server_restart(backend: str, data_dir: Path) -> None:
    canary = data_dir / "server.env"
    canary.write_text("API_TOKENS=alice=hunter2\n")
    settings = make_settings(data_dir, backend)
    async with run_server(settings) as server:
        sid = await new_session(server.client)
        await shell(server.client, sid, f"echo {sid} > /workspace/whoami")
        for name in ("executor.log", "executor.sock"):
            await shell(server.client, sid, f"rm -rf /run/crogia/{name}; ln -sfn {canary} /run/crogia/{name}")
    # Docker: the container lives on and its daemon dials the new server (with the new secret);
    # bubblewrap: the sandbox died with the server and starts afresh around the workspace.
    async with run_server(settings) as server:
        assert (await shell(server.client, sid, "cat /workspace/whoami"))["output"] == f"{sid}\n"
    assert canary.read_text() == "API_TOKENS=alice=hunter2\n", "the server wrote through the sandbox's link"
