"""rg process handling: kernel confinement, timeouts, cancellation, missing binary."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from crogia.errors import Unavailable
from crogia.workspace import Ripgrep, Workspace
from crogia.workspace._spawn import RgProcess, spawn_in_fresh_thread

from .conftest import SECRET, Outside, write


async def _output(ripgrep: Ripgrep, args: list[str], root: Path) -> bytes:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        process = await ripgrep.start(args, root_fd=fd, cwd_fd=fd, stdin_fd=None)
    finally:
        os.close(fd)
    try:
        return b"".join([chunk async for chunk in process.chunks()])
    finally:
        await process.aclose()


async def test_rg_cannot_read_outside_the_root(ripgrep: Ripgrep, root: Path, outside: Outside) -> None:
    write(root, "inside.txt", f"{SECRET}\n")
    assert SECRET.encode() in await _output(ripgrep, ["--no-config", SECRET, "."], root)
    if not ripgrep.confined:
        pytest.skip("Landlock is not available on this kernel")
    # Even told explicitly to read outside, the kernel refuses.
    assert await _output(ripgrep, ["--no-config", "-s", SECRET, str(outside.folder)], root) == b""
    assert await _output(ripgrep, ["--no-config", "-s", "root", "/etc/passwd"], root) == b""


def _fake_rg(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-rg"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/rg.pid\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _alive(tmp_path: Path) -> bool:
    pid = int((tmp_path / "rg.pid").read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_timeout_kills_rg_and_marks_truncated(root: Path, tmp_path: Path) -> None:
    ripgrep = Ripgrep(_fake_rg(tmp_path, "exec sleep 30"), confine=False, timeout=0.5)
    ws = Workspace(root, ripgrep=ripgrep)
    started = time.monotonic()
    result = await ws.grep("x")
    assert time.monotonic() - started < 5
    assert result.truncated
    assert result.matches == []
    assert not _alive(tmp_path)


async def test_cancelled_search_kills_rg(root: Path, tmp_path: Path) -> None:
    ws = Workspace(root, ripgrep=Ripgrep(_fake_rg(tmp_path, "exec sleep 30"), confine=False))
    task = asyncio.create_task(ws.search("*"))
    for _ in range(500):  # until the fake rg runs (at most 5 s)
        if os.listdir(tmp_path).count("rg.pid"):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _alive(tmp_path)


@pytest.mark.parametrize("point", ["before_popen", "after_popen"])
async def test_a_cancel_during_the_start_returns_with_rg_reaped(point: str) -> None:
    """Cancelled while its thread is still starting rg (before the process exists, or after it
    exists but before it is handed over): when the cancel returns, the process is dead and reaped."""
    reached, go = threading.Event(), threading.Event()
    started: list[subprocess.Popen[bytes]] = []

    def start() -> RgProcess:
        if point == "before_popen":
            reached.set()
            go.wait(10)
        proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE, start_new_session=True)
        started.append(proc)
        if point == "after_popen":
            reached.set()
            go.wait(10)
        return RgProcess(proc, tempfile.TemporaryFile())

    task = asyncio.create_task(spawn_in_fresh_thread(start))
    assert await asyncio.to_thread(reached.wait, 10)
    task.cancel()
    go.set()  # the start goes on while the cancel is handled
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(started) == 1, "the cancel returned before the start it interrupted was over"
    assert started[0].returncode == -signal.SIGKILL, "rg was not killed and reaped when the cancel returned"


@pytest.mark.serial  # loop gaps under 0.25 s: alone
async def test_event_loop_runs_while_rg_works(root: Path, tmp_path: Path) -> None:
    ws = Workspace(root, ripgrep=Ripgrep(_fake_rg(tmp_path, "sleep 1"), confine=False))
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        assert (await ws.grep("x")).matches == []
    finally:
        ticker.cancel()
    assert len(gaps) > 30
    assert max(gaps) < 0.25


async def test_missing_rg_is_unavailable(root: Path, tmp_path: Path) -> None:
    ws = Workspace(root, ripgrep=Ripgrep(str(tmp_path / "no-such-rg")))
    with pytest.raises(Unavailable, match="ripgrep"):
        await ws.grep("x")


async def test_crashing_rg_is_unavailable(root: Path, tmp_path: Path) -> None:
    ws = Workspace(root, ripgrep=Ripgrep(_fake_rg(tmp_path, "exit 3"), confine=False))
    with pytest.raises(Unavailable, match="status 3"):
        await ws.search("*")


async def test_unconfined_mode_gives_the_same_results(
    root: Path, ripgrep: Ripgrep, unconfined_ripgrep: Ripgrep
) -> None:
    write(root, "a.py", "one\nneedle two\nthree\n" + "needle " + "x" * 5000 + "\n")
    write(root, "sub/b.md", "needle\n")
    write(root, "sub/c.txt", "nothing\n")
    confined, plain = Workspace(root, ripgrep=ripgrep), Workspace(root, ripgrep=unconfined_ripgrep)
    for ws in (confined, plain):
        found = await ws.grep("needle", context=1)
        assert [(m.file, m.line) for m in found.matches] == [("a.py", 2), ("a.py", 4), ("sub/b.md", 1)]
        assert found.matches[0].context_before == ("one",)
        assert found.matches[1].content.endswith("[... omitted end of long line]")
        assert (await ws.search("*", file_types="py,md")).matches == ["a.py", "sub/b.md"]
