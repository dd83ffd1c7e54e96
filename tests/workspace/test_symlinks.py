"""Symlinks, FIFOs, devices and loops planted by the sandbox never lead outside or hang."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from crogia.errors import InvalidInput
from crogia.sandbox.files import Files

from .conftest import SECRET, Outside, write


@pytest.fixture
def planted(root: Path, outside: Outside) -> Path:
    write(root, "real/file.txt", "inside\n")
    (root / "escape").symlink_to("/")
    (root / "secret_link").symlink_to(outside.secret)
    (root / "relative_link").symlink_to("../outside/secret.txt")
    (root / "outdir").symlink_to(outside.folder, target_is_directory=True)
    (root / "inner").symlink_to("real", target_is_directory=True)
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "self").symlink_to("self")
    (root / "real" / "up").symlink_to("../../outside", target_is_directory=True)
    return root


LINKS = ["escape", "secret_link", "relative_link", "outdir", "inner", "loop1", "self", "real/up"]
THROUGH = ["escape/etc/passwd", "outdir/secret.txt", "real/up/secret.txt", "inner/file.txt", "loop1/x"]


@pytest.mark.parametrize("path", LINKS + THROUGH)
async def test_reads_through_symlinks_are_refused(ws: Files, planted: Path, path: str) -> None:
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.read(path)
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.download(path)


@pytest.mark.parametrize(
    "path", ["outdir", "escape", "inner", "loop1", "real/up", "outdir/sub", "escape/etc"]
)
async def test_listing_and_searching_through_symlinks_are_refused(
    ws: Files, planted: Path, path: str
) -> None:
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.list(path)
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.grep("SECRET", path)
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.search("*", path)


@pytest.mark.parametrize(
    "path", ["secret_link", "relative_link", "outdir/new.txt", "real/up/new.txt", "escape/tmp/pwned.txt"]
)
async def test_writes_through_symlinks_are_refused(
    ws: Files, planted: Path, outside: Outside, path: str
) -> None:
    before = outside.snapshot()
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.write(path, "pwned")
    assert outside.snapshot() == before
    assert (planted / "secret_link").is_symlink()


@pytest.mark.parametrize("path", ["outdir/newdir", "real/up/newdir", "escape/tmp/crogia-newdir"])
async def test_mkdir_through_symlinks_is_refused(
    ws: Files, planted: Path, outside: Outside, path: str
) -> None:
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.make_dir(path)
    assert not (outside.folder / "newdir").exists()
    assert "crogia-newdir" not in os.listdir("/tmp")


async def test_listing_shows_links_without_following(ws: Files, planted: Path) -> None:
    entries = {e.path: e for e in await ws.list(".", depth=10)}
    assert entries["outdir"].type == "symlink"
    assert entries["escape"].type == "symlink"
    assert entries["escape"].size == 1  # the link's own length: "/"
    assert entries["real/up"].type == "symlink"
    assert not any(p.startswith(("outdir/", "escape/", "inner/", "real/up/")) for p in entries)


async def test_search_never_follows_links(ws: Files, planted: Path) -> None:
    found = await ws.grep("SECRET|inside|root:", include_hidden=True, include_ignored=True)
    assert [(m.file, m.content) for m in found.matches] == [("real/file.txt", "inside")]
    files = await ws.search("*", include_hidden=True, include_ignored=True)
    assert files.matches == ["real/file.txt"]


async def test_remove_and_move_act_on_the_link_itself(ws: Files, planted: Path, outside: Outside) -> None:
    before = outside.snapshot()
    await ws.remove("outdir", recursive=True)
    await ws.remove("secret_link")
    await ws.rename("escape", "moved/escape")
    await ws.remove("real", recursive=True)  # contains `up`, a link to the outside folder
    assert outside.snapshot() == before
    assert not (planted / "outdir").exists()
    assert not (planted / "secret_link").exists()
    assert (planted / "moved/escape").is_symlink()


async def test_move_into_a_linked_folder_is_refused(ws: Files, planted: Path, outside: Outside) -> None:
    with pytest.raises(InvalidInput, match="symbolic link"):
        await ws.rename("real/file.txt", "outdir/stolen.txt")
    assert not (outside.folder / "stolen.txt").exists()
    assert (planted / "real/file.txt").exists()


async def test_fifo_never_hangs(ws: Files, root: Path) -> None:
    os.mkfifo(root / "pipe")
    write(root, "ok.txt", "needle\n")
    async with asyncio.timeout(10):
        with pytest.raises(InvalidInput, match="not a regular file"):
            await ws.read("pipe")
        with pytest.raises(InvalidInput, match="not a regular file"):
            await ws.download("pipe")
        with pytest.raises(InvalidInput, match="not a regular file"):
            await ws.write("pipe", "x")
        assert [m.file for m in (await ws.grep("needle")).matches] == ["ok.txt"]
        assert (await ws.search("*")).matches == ["ok.txt"]
        entries = {e.name: e.type for e in await ws.list(".")}
    assert entries == {"ok.txt": "file", "pipe": "file"}
    assert stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)


async def test_device_node_is_not_read(ws: Files, root: Path) -> None:
    try:
        os.mknod(root / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating device nodes needs CAP_MKNOD")
    async with asyncio.timeout(10):
        with pytest.raises(InvalidInput, match="not a regular file"):
            await ws.read("zero")
        assert (await ws.grep("x")).matches == []


async def test_symlinked_root_child_cannot_be_searched_by_pattern(ws: Files, planted: Path) -> None:
    result = await ws.search("outdir/*")
    assert result.matches == []
    assert SECRET not in repr(await ws.grep(SECRET))
