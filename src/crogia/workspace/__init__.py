"""Host-side file and search operations on one session's workspace folder.

STUB: signatures agreed between the team; bodies to be written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Generic, Literal, TypeVar

T = TypeVar("T")

EntryType = Literal["file", "directory", "symlink"]


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    path: str
    """Path relative to the workspace root, `/`-separated."""
    type: EntryType
    size: int | None
    """Bytes for files and symlinks; None for directories."""
    modified: datetime
    """UTC."""


@dataclass(frozen=True, slots=True)
class GrepMatch:
    file: str
    line: int
    content: str
    context_before: tuple[str, ...] = ()
    context_after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchResult(Generic[T]):
    matches: list[T]
    truncated: bool


class Workspace:
    """Confined operations on one workspace folder; every path is relative to `root`."""

    def __init__(self, root: Path, *, max_read_bytes: int = 10_485_760) -> None:
        self.root = root
        self.max_read_bytes = max_read_bytes

    async def list(self, path: str = ".", *, depth: int = 1) -> list[Entry]:
        raise NotImplementedError

    async def read_text(self, path: str, *, max_bytes: int | None = None) -> str:
        raise NotImplementedError

    async def write_text(self, path: str, content: str) -> int:
        raise NotImplementedError

    async def read_bytes_stream(self, path: str, *, chunk_size: int = 65536) -> tuple[int, AsyncIterator[bytes]]:
        raise NotImplementedError

    async def write_bytes_stream(self, path: str, chunks: AsyncIterator[bytes], *, max_bytes: int) -> int:
        raise NotImplementedError

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        raise NotImplementedError

    async def move(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        raise NotImplementedError

    async def mkdir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        raise NotImplementedError

    async def find_files(
        self,
        pattern: str,
        path: str = ".",
        *,
        file_types: str = "*",
        include_ignored: bool = False,
        include_hidden: bool = False,
        max_results: int = 1000,
    ) -> SearchResult[str]:
        raise NotImplementedError

    async def grep(
        self,
        pattern: str,
        path: str = ".",
        *,
        file_types: str = "*",
        regex: bool = True,
        case_sensitive: bool = True,
        context: int = 0,
        include_ignored: bool = False,
        include_hidden: bool = False,
        max_results: int = 1000,
    ) -> SearchResult[GrepMatch]:
        raise NotImplementedError
