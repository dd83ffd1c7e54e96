"""`Files`: a session's workspace files, whoever serves them.

Two implementations give the same answers (same results, same errors, same messages, same limits):

* `crogia.workspace.HostFiles`: the server works on the host folder bound at `/workspace` (local
  backends; the faster path);
* `crogia.sandbox.daemon_files.DaemonFiles`: the executor daemon inside the sandbox does the work
  (`daemon/executor_files.py`), so no host path is needed and a sandbox may live anywhere its channel reaches.

`SANDBOX_FILES=host|daemon` chooses (`crogia.services.sessions`). Every path is relative to the
workspace root and checked as a string here (`parse_path`) before either side resolves it, one
component at a time and never through a symlink.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar, Literal

from crogia.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from crogia.workspace.models import Entry, GrepMatch, Listing, SearchResult

FilesMode = Literal["host", "daemon"]
MAX_LIST_DEPTH = 64


class Files(abc.ABC):
    """One workspace's files; every path is relative to its root (`/workspace` in the sandbox).

    Symlinks are listed as `symlink` and never followed: reading, writing, listing or searching
    through one is refused with InvalidInput; `remove` and `rename` act on the link itself.
    """

    kind: ClassVar[FilesMode]
    max_read_bytes: int
    max_list_entries: int

    @abc.abstractmethod
    async def list(self, path: str = ".", *, depth: int = 1) -> Listing:
        """Entries of a folder, folders first; `depth > 1` recurses (capped at `max_list_entries`)."""

    @abc.abstractmethod
    async def stat(self, path: str) -> Entry:
        """The entry `path` names (a symlink as itself); NotFound if there is none."""

    async def exists(self, path: str) -> bool:
        """Whether `path` names an entry (a dangling symlink exists)."""
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    @abc.abstractmethod
    async def read(self, path: str, *, max_bytes: int | None = None) -> str:
        """A file's UTF-8 text; TooLarge over `max_bytes` (default `max_read_bytes`)."""

    @abc.abstractmethod
    async def write(self, path: str, content: str | bytes) -> int:
        """Atomically create or replace a file, creating parent folders; returns bytes written."""

    @abc.abstractmethod
    async def download(self, path: str, *, chunk_size: int | None = None) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks) of a file; the size is fixed when opened and at most that much is sent.

        Chunks are at most `chunk_size` bytes (default: what suits the implementation)."""

    @abc.abstractmethod
    async def upload(self, path: str, chunks: AsyncIterator[bytes], *, max_bytes: int) -> int:
        """Atomically write streamed bytes; TooLarge past `max_bytes` (nothing is left behind)."""

    @abc.abstractmethod
    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Delete a file, a symlink (the link) or a folder (non-empty needs `recursive`)."""

    @abc.abstractmethod
    async def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        """Move within the workspace, creating `dst`'s parents; Conflict if `dst` exists."""

    @abc.abstractmethod
    async def make_dir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        """Create a folder; `.` (the root) is accepted as already existing."""

    @abc.abstractmethod
    async def search(
        self,
        pattern: str,
        path: str = ".",
        *,
        file_types: str = "*",
        include_ignored: bool = False,
        include_hidden: bool = False,
        max_results: int = 1000,
    ) -> SearchResult[str]:
        """Files under `path` whose name (or, if `pattern` has a '/', path below `path`) matches."""

    @abc.abstractmethod
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
        """Matching lines under folder `path` (or in file `path`), sorted by file then line.

        `context` lines (0-20) come in `context_before/after`; `truncated` is set when more than
        `max_results` matched or the search timed out.
        """


def check_limit(max_results: int) -> None:
    if max_results < 1:
        raise InvalidInput("max_results must be at least 1.")


def check_depth(depth: int) -> int:
    if depth < 1:
        raise InvalidInput("Depth must be at least 1.")
    return min(depth, MAX_LIST_DEPTH)


def encode_text(content: str | bytes) -> bytes:
    if isinstance(content, bytes):
        return content
    try:
        return content.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("Content is not valid Unicode text.") from None
