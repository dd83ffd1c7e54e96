"""The sandbox swaps folders and files for symlinks to the outside while requests run.

Whatever interleaving happens, nothing outside may be read, listed, searched or
written: every operation either works on the inside content or fails cleanly.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from crogia.errors import CrogiaError
from crogia.sandbox.files import Files
from crogia.workspace import Ripgrep, Workspace
from tests.support.local_daemon import daemon_files, local_daemon

from .conftest import SECRET, Outside, write

RACE_SECONDS = 3.0


def _clear(path: Path) -> None:
    """Remove whatever is at `path`: the code under test may have created a folder there."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _put(make: Callable[[], None], path: Path) -> None:
    """Run `make` (which creates `path`), clearing what got there first if needed."""
    while True:
        try:
            make()
            return
        except OSError:
            _clear(path)


def swap_forever(root: Path, outside: Outside, stop: threading.Event, swaps: list[int]) -> None:
    """Alternate `d` (a folder) and `f.txt` (a file) with symlinks to the outside."""
    folder, parked_folder = root / "d", root / ".d_parked"
    file, parked_file = root / "f.txt", root / ".f_parked"
    while not stop.is_set():
        os.rename(folder, parked_folder)
        _put(lambda: os.symlink(outside.folder, folder), folder)
        os.rename(file, parked_file)
        _put(lambda: os.symlink(outside.secret, file), file)
        time.sleep(0)
        _clear(folder)
        _put(lambda: os.rename(parked_folder, folder), folder)
        _clear(file)
        _put(lambda: os.rename(parked_file, file), file)
        swaps[0] += 1


async def _one_chunk() -> AsyncIterator[bytes]:
    yield b"uploaded"


async def _download(ws: Files, path: str) -> bytes:
    _, chunks = await ws.download(path)
    return b"".join([chunk async for chunk in chunks])


OPERATIONS: list[Callable[[Files], Awaitable[object]]] = [
    lambda ws: ws.read("d/f.txt"),
    lambda ws: ws.read("f.txt"),
    lambda ws: _download(ws, "d/f.txt"),
    lambda ws: _download(ws, "f.txt"),
    lambda ws: ws.write("d/new.txt", "written"),
    lambda ws: ws.write("d/deeper/new.txt", "written"),
    lambda ws: ws.upload("d/up.bin", _one_chunk(), max_bytes=100),
    lambda ws: ws.list("d"),
    lambda ws: ws.list(".", depth=5),
    lambda ws: ws.grep("canary|inside|print"),
    lambda ws: ws.grep("canary|inside|print", "d"),
    lambda ws: ws.grep("canary|inside", "f.txt"),
    lambda ws: ws.search("*"),
    lambda ws: ws.search("*", "d"),
    lambda ws: ws.make_dir("d/made/here"),
    lambda ws: ws.rename("d/new.txt", "d/renamed.txt", overwrite=True),
    lambda ws: ws.remove("d/renamed.txt"),
    lambda ws: ws.remove("d/made", recursive=True),
]


SEARCHES = 5
"""The grep and search rows of OPERATIONS (rows 9-13)."""


async def _hammer(
    ws: Files,
    deadline: float,
    outcomes: dict[str, int],
    operations: list[Callable[[Files], Awaitable[object]]],
) -> None:
    while time.monotonic() < deadline:
        for operation in operations:
            try:
                result = await operation(ws)
            except CrogiaError:
                outcomes["refused"] += 1
                continue
            outcomes["done"] += 1
            shown = repr(result)
            assert SECRET not in shown
            assert "secret.txt" not in shown
            assert "deep.py" not in shown
            assert "leak" not in shown


@pytest.mark.slow
@pytest.mark.parametrize("confine", [True, False], ids=["landlock", "verified"])
async def test_swapping_folders_for_symlinks_never_escapes(
    root: Path, outside: Outside, ripgrep: Ripgrep, unconfined_ripgrep: Ripgrep, confine: bool
) -> None:
    """Both search modes: rg under Landlock, and rg unconfined with results re-checked."""
    await _race(
        Workspace(root, ripgrep=ripgrep if confine else unconfined_ripgrep), root, outside, OPERATIONS
    )


@pytest.mark.slow
async def test_the_daemon_never_follows_a_swapped_symlink(root: Path, outside: Outside) -> None:
    """SANDBOX_FILES=daemon: the daemon's file ops (the real daemon, run on the host so that escaping
    would reach `outside`) hold under the same swaps. Its rg runs unconfined and unchecked: in a
    sandbox an escape reaches only the sandbox's own files, so the searches are left out here."""
    with tempfile.TemporaryDirectory(prefix="cg-logs-") as logs:
        async with local_daemon(root, Path(logs)) as daemon:
            operations = OPERATIONS[:9] + OPERATIONS[9 + SEARCHES :]
            await _race(daemon_files(daemon), root, outside, operations)


async def _race(
    ws: Files, root: Path, outside: Outside, operations: list[Callable[[Files], Awaitable[object]]]
) -> None:
    for i in range(100):  # many outside files make an escaped rg walk likely to report one
        (outside.folder / "sub" / f"leak{i}.txt").write_text(f"{SECRET}\n")
    write(root, "d/f.txt", "inside\n")
    write(root, "f.txt", "inside\n")
    (outside.folder / "f.txt").write_text(f"{SECRET}\n")
    os.utime(outside.folder / "f.txt", (1_600_000_000, 1_600_000_000))
    before = outside.snapshot()
    stop, swaps = threading.Event(), [0]
    swapper = threading.Thread(target=swap_forever, args=(root, outside, stop, swaps))
    swapper.start()
    outcomes = {"done": 0, "refused": 0}
    try:
        deadline = time.monotonic() + RACE_SECONDS
        await asyncio.gather(*(_hammer(ws, deadline, outcomes, operations) for _ in range(6)))
    finally:
        stop.set()
        swapper.join()
    assert outside.snapshot() == before
    assert swaps[0] > 50
    assert outcomes["done"] > 50
    assert outcomes["refused"] > 10
