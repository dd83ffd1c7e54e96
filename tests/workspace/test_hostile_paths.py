"""Hostile path strings: every operation refuses them, and nothing outside changes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from crogia.errors import CrogiaError, InvalidInput, NotFound
from crogia.sandbox.files import Files

from .conftest import Outside, write

ESCAPES = [
    "..",
    "../",
    "../outside/secret.txt",
    "a/../../outside/secret.txt",
    "a/..",
    "./../outside",
    "a/b/../../..",
    "a/b/c/..",
    "..//outside",
    "/etc/passwd",
    "/",
    "//etc",
    "\\..\\outside\\secret.txt",
    "a\\..\\..\\outside",
    "..\\outside",
    "a\x00b",
    "\x00",
    "../" * 40 + "etc/passwd",
]

Op = Callable[[Files, str], Awaitable[object]]


async def _chunks() -> AsyncIterator[bytes]:
    yield b"pwned"


async def _read_stream(ws: Files, path: str) -> bytes:
    _, chunks = await ws.download(path)
    return b"".join([chunk async for chunk in chunks])


OPS: dict[str, Op] = {
    "read_text": lambda ws, p: ws.read(p),
    "read_bytes_stream": _read_stream,
    "write_text": lambda ws, p: ws.write(p, "pwned"),
    "write_bytes_stream": lambda ws, p: ws.upload(p, _chunks(), max_bytes=100),
    "list": lambda ws, p: ws.list(p),
    "list_deep": lambda ws, p: ws.list(p, depth=5),
    "remove": lambda ws, p: ws.remove(p, recursive=True),
    "move_src": lambda ws, p: ws.rename(p, "moved"),
    "move_dst": lambda ws, p: ws.rename("a/file.txt", p, overwrite=True),
    "mkdir": lambda ws, p: ws.make_dir(p),
    "find_files": lambda ws, p: ws.search("*", p),
    "grep": lambda ws, p: ws.grep("canary|SECRET", p),
}


@pytest.fixture
def seeded(root: Path) -> Path:
    write(root, "a/file.txt", "inside\n")
    write(root, "a/b/c/d.txt", "inside\n")
    return root


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("op", sorted(OPS))
async def test_escape_attempt_is_refused(
    ws: Files, seeded: Path, outside: Outside, tmp_path: Path, op: str, path: str
) -> None:
    before = outside.snapshot()
    with pytest.raises(InvalidInput) as info:
        await OPS[op](ws, path)
    assert str(tmp_path) not in info.value.message
    assert outside.snapshot() == before
    assert sorted(os.listdir(tmp_path)) == ["outside", "ws"]
    assert (seeded / "a/file.txt").read_text() == "inside\n"


@pytest.mark.parametrize("op", ["write_text", "write_bytes_stream", "remove", "move_src", "move_dst"])
@pytest.mark.parametrize("path", ["", ".", "./", "a/.."])
async def test_root_itself_cannot_be_written_removed_or_moved(
    ws: Files, seeded: Path, op: str, path: str
) -> None:
    with pytest.raises(InvalidInput):
        await OPS[op](ws, path)
    assert (seeded / "a/file.txt").read_text() == "inside\n"


@pytest.mark.parametrize("path", ["", ".", "./", ".//."])
async def test_empty_and_dot_mean_root_for_list_and_search(ws: Files, seeded: Path, path: str) -> None:
    assert [e.name for e in await ws.list(path)] == ["a"]
    assert (await ws.search("*.txt", path)).matches == ["a/b/c/d.txt", "a/file.txt"]
    assert len((await ws.grep("inside", path)).matches) == 2


async def test_url_encoded_dots_are_literal_names(ws: Files, root: Path, outside: Outside) -> None:
    with pytest.raises(NotFound):
        await ws.read("%2e%2e/outside/secret.txt")
    with pytest.raises(NotFound):
        await ws.list("%2e%2e")
    await ws.write("%2e%2e/%2e%2e/x.txt", "literal")
    assert (root / "%2e%2e" / "%2e%2e" / "x.txt").read_text() == "literal"
    assert not (outside.folder / "x.txt").exists()


async def test_messages_name_only_relative_paths(ws: Files, root: Path) -> None:
    for call in (ws.read("missing/file.txt"), ws.list("nope"), ws.remove("gone")):
        with pytest.raises(CrogiaError) as info:
            await call
        assert str(root) not in info.value.message
        assert "/tmp" not in info.value.message


async def test_dot_components_are_normalised(ws: Files, seeded: Path) -> None:
    assert await ws.read("./a//./file.txt") == "inside\n"
    entries = await ws.list("./a/")
    assert [e.path for e in entries] == ["a/b", "a/file.txt"]


async def test_overlong_names_are_refused(ws: Files, root: Path) -> None:
    for call in (ws.read("a" * 300), ws.list("b" * 300), ws.write("c" * 300 + "/x", "x")):
        with pytest.raises(InvalidInput, match="too long"):
            await call


async def test_undecodable_names_are_listed_safely(ws: Files, root: Path) -> None:
    os.close(os.open(os.fsencode(root) + b"/caf\xe9.txt", os.O_CREAT | os.O_WRONLY))
    assert [e.name for e in await ws.list(".")] == ["caf\ufffd.txt"]
