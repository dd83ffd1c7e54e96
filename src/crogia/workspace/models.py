"""Plain result types returned by `Workspace` (no I/O here)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, TypeVar

T = TypeVar("T")

EntryType = Literal["file", "directory", "symlink"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One item of a folder listing."""

    name: str
    path: str
    """Path relative to the workspace root, `/`-separated."""
    type: EntryType
    """`symlink` entries are never followed; FIFOs, sockets and devices are listed as `file`."""
    size: int | None
    """Bytes for files and symlinks (the link itself); None for directories."""
    modified: datetime
    """UTC."""


@dataclass(frozen=True, slots=True)
class Listing:
    """A folder's entries in listing order; `truncated` when the entry cap cut it short."""

    entries: list[Entry]
    truncated: bool = False

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, slots=True)
class GrepMatch:
    """One matching line; `line` is 1-based."""

    file: str
    line: int
    content: str
    context_before: tuple[str, ...] = ()
    context_after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchResult(Generic[T]):
    """Matches sorted by path (then line); `truncated` when more existed than were returned."""

    matches: list[T]
    truncated: bool
