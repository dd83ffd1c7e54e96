"""Functional behaviour of the file operations on a real folder."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path

import pytest

from crogia.errors import Conflict, InvalidInput, NotFound, TooLarge
from crogia.sandbox.files import Files
from tests.support.local_daemon import LocalDaemon
from tests.workspace.conftest import FilesFactory

from .conftest import write


def leftovers(root: Path) -> list[str]:
    """Temp files an aborted or finished write may have left behind."""
    return [str(p) for p in root.rglob(".crogia-*.tmp")]


async def test_write_creates_parents_and_reads_back(ws: Files, root: Path) -> None:
    written = await ws.write("src/pkg/app.py", "print('héllo')\n")
    assert written == len("print('héllo')\n".encode())
    assert (root / "src/pkg/app.py").read_text() == "print('héllo')\n"
    assert await ws.read("src/pkg/app.py") == "print('héllo')\n"
    assert leftovers(root) == []


async def test_overwrite_keeps_permissions(ws: Files, root: Path) -> None:
    script = write(root, "run.sh", "#!/bin/sh\n")
    script.chmod(0o755)
    await ws.write("run.sh", "#!/bin/sh\necho hi\n")
    assert script.stat().st_mode & 0o777 == 0o755
    assert script.read_text() == "#!/bin/sh\necho hi\n"
    await ws.write("new.txt", "x")
    assert (root / "new.txt").stat().st_mode & 0o777 == 0o644


async def test_write_onto_folder_or_through_file_is_refused(ws: Files, root: Path) -> None:
    write(root, "dir/file.txt")
    with pytest.raises(InvalidInput, match="folder"):
        await ws.write("dir", "x")
    with pytest.raises(InvalidInput, match="not a folder"):
        await ws.write("dir/file.txt/child.txt", "x")


async def test_read_limits(ws: Files, root: Path, make_files: FilesFactory) -> None:
    write(root, "ten.txt", "0123456789")
    assert await ws.read("ten.txt", max_bytes=10) == "0123456789"
    with pytest.raises(TooLarge, match="9-byte limit") as info:
        await ws.read("ten.txt", max_bytes=9)
    assert "download" in info.value.message
    small = make_files(max_read_bytes=5)
    with pytest.raises(TooLarge):
        await small.read("ten.txt")


async def test_read_errors(ws: Files, root: Path) -> None:
    write(root, "bin.dat", b"\x89PNG\r\n\x1a\n\xff\xfe")
    write(root, "dir/x.txt")
    with pytest.raises(InvalidInput, match=r"binary.*download"):
        await ws.read("bin.dat")
    with pytest.raises(InvalidInput, match="folder, not a file"):
        await ws.read("dir")
    with pytest.raises(NotFound, match=r"'nope\.txt' does not exist"):
        await ws.read("nope.txt")
    with pytest.raises(NotFound, match="'missing'"):
        await ws.read("missing/x.txt")


async def test_binary_stream_round_trip(ws: Files, root: Path) -> None:
    data = bytes(range(256)) * 1000

    async def upload() -> AsyncIterator[bytes]:
        for at in range(0, len(data), 7000):
            yield data[at : at + 7000]

    assert await ws.upload("bin/blob.bin", upload(), max_bytes=len(data)) == len(data)
    size, chunks = await ws.download("bin/blob.bin", chunk_size=4096)
    received = [chunk async for chunk in chunks]
    assert size == len(data)
    assert b"".join(received) == data
    assert max(len(c) for c in received) <= 4096


async def test_upload_over_limit_leaves_nothing(ws: Files, root: Path) -> None:
    write(root, "keep.bin", b"old")

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    with pytest.raises(TooLarge, match="5000-byte limit"):
        await ws.upload("keep.bin", upload(), max_bytes=5000)
    with pytest.raises(TooLarge):
        await ws.upload("new/fresh.bin", upload(), max_bytes=5000)
    assert (root / "keep.bin").read_bytes() == b"old"
    assert not (root / "new/fresh.bin").exists()
    assert leftovers(root) == []


async def test_upload_failing_midway_leaves_nothing(ws: Files, root: Path) -> None:
    async def upload() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await ws.upload("up.bin", upload(), max_bytes=100)
    assert not (root / "up.bin").exists()
    assert leftovers(root) == []


async def test_list_sorting_types_and_sizes(ws: Files, root: Path) -> None:
    write(root, "b.txt", "12345")
    write(root, "A.txt", "1")
    write(root, "zdir/inner.txt")
    write(root, "adir/sub/deep.txt")
    (root / "link").symlink_to("b.txt")
    entries = await ws.list(".")
    assert [(e.name, e.type) for e in entries] == [
        ("adir", "directory"),
        ("zdir", "directory"),
        ("A.txt", "file"),
        ("b.txt", "file"),
        ("link", "symlink"),
    ]
    by_name = {e.name: e for e in entries}
    assert by_name["adir"].size is None
    assert by_name["b.txt"].size == 5
    assert by_name["b.txt"].modified.tzinfo == UTC
    assert abs(by_name["b.txt"].modified.timestamp() - (root / "b.txt").stat().st_mtime) < 1e-3


def _link_many(root: Path, count: int) -> list[str]:
    sources = [root / f"one{n}" for n in range(count // 60_000 + 1)]  # ext4: 65,000 links a file
    for source in sources:
        source.touch()
    (root / "big").mkdir()
    names = [f"{i:06}" for i in range(count)]
    for i, name in enumerate(reversed(names)):  # the folder's own order is not the listing's
        os.link(sources[i % len(sources)], root / "big" / name)
    return names


def _peak_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_a_huge_folder_is_listed_in_bounded_memory(
    ws: Files, root: Path, daemon: LocalDaemon | None
) -> None:
    """How many names a folder holds is the sandbox's to choose (a million empty files cost it a few
    seconds): a listing keeps only the entries it returns, not one record per name, stats only those,
    and reads at most SCAN_MAX names. 200,000 names took the old code ~100 MB."""
    names = await asyncio.to_thread(_link_many, root, 200_000)
    if daemon is None:
        tracemalloc.start()
        try:
            listing = await ws.list("big")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    else:
        before = _peak_kib(daemon.process.pid)
        listing = await ws.list("big")
        peak = (_peak_kib(daemon.process.pid) - before) * 1024
    shown = [e.name for e in listing]
    assert listing.truncated and len(shown) == 10_000 and shown == sorted(shown)
    assert set(shown) <= set(names)  # (past SCAN_MAX names the first read decide, not all)
    assert peak < 24 << 20, f"listing took {peak >> 20} MB"


async def test_list_depth_and_cap(ws: Files, root: Path, make_files: FilesFactory) -> None:
    write(root, "adir/sub/deep.txt")
    write(root, "top.txt")
    assert [e.path for e in await ws.list(".", depth=2)] == ["adir", "adir/sub", "top.txt"]
    assert [e.path for e in await ws.list(".", depth=3)] == [
        "adir",
        "adir/sub",
        "adir/sub/deep.txt",
        "top.txt",
    ]
    assert [e.path for e in await ws.list("adir/sub")] == ["adir/sub/deep.txt"]
    for i in range(30):
        write(root, f"many/{i:02}.txt")
    capped = make_files(max_list_entries=10)
    cut = await capped.list("many")
    assert len(cut) == 10 and cut.truncated
    assert [e.name for e in cut] == [f"{i:02}.txt" for i in range(10)]
    whole = await make_files(max_list_entries=30).list("many")
    assert len(whole) == 30 and not whole.truncated
    assert not (await ws.list(".")).truncated
    with pytest.raises(InvalidInput):
        await ws.list(".", depth=0)
    with pytest.raises(InvalidInput, match="not a folder"):
        await ws.list("top.txt")
    with pytest.raises(NotFound):
        await ws.list("nope")


async def test_remove(ws: Files, root: Path) -> None:
    write(root, "f.txt")
    write(root, "full/a/b/c.txt")
    (root / "empty").mkdir()
    await ws.remove("f.txt")
    await ws.remove("empty")
    with pytest.raises(Conflict, match="not empty"):
        await ws.remove("full")
    await ws.remove("full", recursive=True)
    assert sorted(os.listdir(root)) == []
    with pytest.raises(NotFound):
        await ws.remove("f.txt")


async def test_remove_deep_tree(ws: Files, root: Path) -> None:
    deep = root / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    try:
        for _ in range(150):  # deeper than a path string could name comfortably
            os.mkdir("d" * 40, dir_fd=fd)
            child = os.open("d" * 40, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("leaf.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)
    await ws.remove("deep", recursive=True)
    assert not deep.exists()


async def test_move(ws: Files, root: Path) -> None:
    write(root, "a.txt", "A")
    write(root, "b.txt", "B")
    write(root, "dir/x.txt", "X")
    await ws.rename("a.txt", "new/place/a.txt")
    assert (root / "new/place/a.txt").read_text() == "A"
    with pytest.raises(Conflict, match="already exists"):
        await ws.rename("b.txt", "new/place/a.txt")
    await ws.rename("b.txt", "new/place/a.txt", overwrite=True)
    assert (root / "new/place/a.txt").read_text() == "B"
    assert not (root / "b.txt").exists()
    await ws.rename("dir", "dir2")
    assert (root / "dir2/x.txt").read_text() == "X"
    with pytest.raises(InvalidInput, match="into itself"):
        await ws.rename("dir2", "dir2/inside")
    with pytest.raises(NotFound):
        await ws.rename("ghost.txt", "g.txt")
    await ws.rename("dir2", "dir2")  # no-op


async def test_mkdir(ws: Files, root: Path) -> None:
    await ws.make_dir("a/b/c")
    assert (root / "a/b/c").is_dir()
    await ws.make_dir("a/b/c")  # exist_ok
    with pytest.raises(Conflict, match="already exists"):
        await ws.make_dir("a/b/c", exist_ok=False)
    with pytest.raises(NotFound):
        await ws.make_dir("x/y", parents=False)
    write(root, "file.txt")
    with pytest.raises(Conflict, match="not a folder"):
        await ws.make_dir("file.txt")
    await ws.make_dir(".")
    assert oct((root / "a").stat().st_mode & 0o777) == oct(0o755 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
