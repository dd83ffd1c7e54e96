"""`HostFiles`: the server's own implementation of `Files`, on the host folder bound at /workspace.

Every blocking syscall runs in a worker thread; rg runs as a subprocess whose
output is read without blocking the event loop.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import ClassVar, Protocol

import anyio
import anyio.to_thread

from crogia.errors import InvalidInput, TooLarge
from crogia.sandbox.files import Files, FilesMode, check_depth, check_limit, encode_text
from crogia.workspace import fileops, treeops
from crogia.workspace.collect import FileCollector, GrepCollector
from crogia.workspace.models import Entry, GrepMatch, Listing, SearchResult
from crogia.workspace.paths import RelPath, parse_path
from crogia.workspace.ripgrep import Ripgrep, check_exit
from crogia.workspace.search import (
    GrepOptions,
    SearchTarget,
    files_args,
    grep_args,
    open_target,
    type_globs,
)
from crogia.workspace.verify import verify_files, verify_matches

log = logging.getLogger(__name__)


class _Collector(Protocol):
    truncated: bool

    def feed(self, chunk: bytes) -> bool: ...


class HostFiles(Files):
    """Confined operations on one host workspace folder; every path is relative to `root`.

    Symlinks inside the workspace are listed as `symlink` and never followed: reading,
    writing, listing or searching through one is refused with InvalidInput; `remove`
    and `move` act on the link itself.
    """

    kind: ClassVar[FilesMode] = "host"

    def __init__(
        self,
        root: Path,
        *,
        max_read_bytes: int = 10_485_760,
        max_list_entries: int = 10_000,
        ripgrep: Ripgrep | None = None,
    ) -> None:
        """`ripgrep` may be shared between workspaces; by default each gets its own."""
        self.root = root
        self.max_read_bytes = max_read_bytes
        self.max_list_entries = max_list_entries
        self.ripgrep = ripgrep or Ripgrep()

    async def list(self, path: str = ".", *, depth: int = 1) -> Listing:
        """Entries of a folder, folders first; `depth > 1` recurses (capped at `max_list_entries`)."""
        rel = parse_path(path, allow_root=True)
        depth = check_depth(depth)
        cap = self.max_list_entries
        entries = await anyio.to_thread.run_sync(treeops.list_dir, self.root, rel, depth, cap + 1)
        return Listing(entries[:cap], truncated=len(entries) > cap)

    async def stat(self, path: str) -> Entry:
        """The entry `path` names (a symlink as itself); NotFound if there is none."""
        rel = parse_path(path, allow_root=True)
        return await anyio.to_thread.run_sync(treeops.stat_entry, self.root, rel)

    async def read(self, path: str, *, max_bytes: int | None = None) -> str:
        """A file's UTF-8 text; TooLarge over `max_bytes` (default `max_read_bytes`)."""
        rel = parse_path(path, allow_root=False)
        limit = self.max_read_bytes if max_bytes is None else max_bytes
        return await anyio.to_thread.run_sync(fileops.read_text, self.root, rel, limit)

    async def write(self, path: str, content: str | bytes) -> int:
        """Atomically create or replace a file, creating parent folders; returns bytes written."""
        rel = parse_path(path, allow_root=False)
        data = encode_text(content)
        return await anyio.to_thread.run_sync(fileops.write_bytes, self.root, rel, data)

    async def download(self, path: str, *, chunk_size: int | None = None) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks) of a file; the size is fixed when opened and exactly that much is sent."""
        rel = parse_path(path, allow_root=False)
        handle = await anyio.to_thread.run_sync(fileops.open_regular, self.root, rel)
        size = os.fstat(handle.fileno()).st_size
        return size, _stream(handle, size, chunk_size or 65536)

    async def upload(self, path: str, chunks: AsyncIterator[bytes], *, max_bytes: int) -> int:
        """Atomically write streamed bytes; TooLarge past `max_bytes` (nothing is left behind)."""
        rel = parse_path(path, allow_root=False)
        with anyio.CancelScope(shield=True):  # a cancel must not lose the temp file's owner
            target = await anyio.to_thread.run_sync(fileops.AtomicFile, self.root, rel)
        try:
            async for chunk in chunks:
                if target.size + len(chunk) > max_bytes:
                    raise TooLarge(f"Upload is larger than the {max_bytes}-byte limit.", limit=max_bytes)
                await anyio.to_thread.run_sync(target.write, chunk)
            await anyio.to_thread.run_sync(target.commit)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(target.abort)
            raise
        return target.size

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Delete a file, a symlink (the link) or a folder (non-empty needs `recursive`)."""
        rel = parse_path(path, allow_root=False)
        await anyio.to_thread.run_sync(partial(treeops.remove, self.root, rel, recursive=recursive))

    async def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        """Rename within the workspace, creating `dst`'s parents; Conflict if `dst` exists."""
        source, dest = parse_path(src, allow_root=False), parse_path(dst, allow_root=False)
        await anyio.to_thread.run_sync(partial(treeops.move, self.root, source, dest, overwrite=overwrite))

    async def make_dir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        """Create a folder; `.` (the root) is accepted as already existing."""
        rel = parse_path(path, allow_root=True)
        if not rel.parts:
            if not exist_ok:
                raise InvalidInput("The workspace folder itself always exists.")
            return
        mkdir = partial(treeops.make_dir, self.root, rel, parents=parents, exist_ok=exist_ok)
        await anyio.to_thread.run_sync(mkdir)

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
        rel = parse_path(path, allow_root=True)
        check_limit(max_results)
        args = files_args(pattern, include_ignored, include_hidden)
        collector = FileCollector(rel.text, max_results, type_globs(file_types))
        await self._run(await self._open_target(rel, allow_file=False), args, collector)
        result = collector.result()
        if self.ripgrep.confined is False:
            kept = await anyio.to_thread.run_sync(verify_files, self.root, result.matches)
            result = SearchResult(kept, result.truncated)
        return result

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
        """Matching lines under folder `path`, sorted by file then line.

        `path` may also name one file: it is then searched whatever the ignore, hidden
        and type filters say. `context` lines (0-20) come in `context_before/after`.
        `truncated` is set when more than `max_results` matched or the search timed out.
        """
        rel = parse_path(path, allow_root=True)
        check_limit(max_results)
        opts = GrepOptions(
            pattern, file_types, regex, case_sensitive, context, include_ignored, include_hidden
        )
        grep_args(opts, stdin=False)  # validate before opening anything
        target = await self._open_target(rel, allow_file=True)
        on_stdin = target.stdin is not None
        collector = GrepCollector(rel.text, max_results, context, label=rel.text if on_stdin else None)
        await self._run(target, grep_args(opts, stdin=on_stdin), collector)
        result = collector.result()
        if self.ripgrep.confined is False and not on_stdin:  # stdin is an fd we opened: no race
            kept = await anyio.to_thread.run_sync(verify_matches, self.root, result.matches)
            result = SearchResult(kept, result.truncated)
        return result

    async def _open_target(self, rel: RelPath, *, allow_file: bool) -> SearchTarget:
        with anyio.CancelScope(shield=True):  # a cancel must not lose the fds' owner
            target = await anyio.to_thread.run_sync(
                partial(open_target, self.root, rel, allow_file=allow_file)
            )
        return target

    async def _run(self, target: SearchTarget, args: Sequence[str], collector: _Collector) -> None:
        """Feed rg's output to `collector`; stop early when it is full or on timeout."""
        try:
            stdin_fd = None if target.stdin is None else target.stdin.fileno()
            process = await self.ripgrep.start(
                args, root_fd=target.root_fd, cwd_fd=target.cwd_fd, stdin_fd=stdin_fd
            )
        finally:
            target.close()  # the child holds its own copies now
        try:
            with anyio.move_on_after(self.ripgrep.timeout) as scope:
                async with contextlib.aclosing(process.chunks()) as chunks:
                    async for chunk in chunks:
                        if collector.feed(chunk):
                            return
                code, stderr = await process.finish()
            if scope.cancelled_caught:
                log.warning("search in %s timed out after %ss", self.root, self.ripgrep.timeout)
                collector.truncated = True
                return
            check_exit(code, stderr, self.root)
        finally:
            with anyio.CancelScope(shield=True):
                await process.aclose()


Workspace = HostFiles
"""The old name (tests and tools that predate `Files`)."""


async def _stream(handle: io.FileIO, size: int, chunk_size: int) -> AsyncIterator[bytes]:
    """Exactly the `size` bytes seen at open time (or fewer if the file shrank)."""
    try:
        remaining = size
        while remaining > 0:
            data = await anyio.to_thread.run_sync(handle.read, min(chunk_size, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data
    finally:
        handle.close()
