"""`DaemonFiles`: `Files` served by the executor daemon inside the sandbox (`daemon/executor_files.py`).

Needs no host path, so a sandbox may live wherever its channel reaches. The server checks each
path as a string (`parse_path`, the host side's own messages) and sends its components; the daemon
checks them again and resolves them beneath /workspace one component at a time, never through a
symlink. Search runs the image's rg in the daemon; its output streams back as chunks that the host
side's own collectors turn into results, so both sides answer alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from crogia.errors import InvalidInput, TooLarge, UpstreamTimeout
from crogia.sandbox.channel import ProtocolViolation
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.executor_client import ByteStream
from crogia.sandbox.files import Files, check_depth, check_limit, encode_text
from crogia.workspace.collect import FileCollector, GrepCollector
from crogia.workspace.models import Entry, GrepMatch, Listing, SearchResult
from crogia.workspace.paths import RelPath, parse_path
from crogia.workspace.ripgrep import check_exit
from crogia.workspace.search import GrepOptions, files_args, grep_args, type_globs

if TYPE_CHECKING:
    from crogia.sandbox.executor import ExecutorSandbox

log = logging.getLogger(__name__)

LIST_LINE_MAX = 48 << 20
"""How long a line a listing's reply may be (10,000 entries of long names fit many times)."""
PENDING_MAX = 1 << 20
"""Bytes of one search record a daemon may send before its end: rg's are far shorter."""

T = TypeVar("T")


async def _within(timeout: float, step: Awaitable[T]) -> T:
    """`step` (a reply, a stream's next bytes or credit) within `timeout`; else UpstreamTimeout (504).

    Each wait of a transfer gets the whole deadline again: a slow transfer that keeps moving is
    never cut, one that stops is (the caller's `async with` or `finally` then resets its stream).
    """
    try:
        async with asyncio.timeout(timeout):
            return await step
    except TimeoutError:
        raise UpstreamTimeout(
            f"the sandbox's executor made no progress on a file operation for {timeout:g}s (FILES_TIMEOUT)"
        ) from None


class _Collector(Protocol):
    truncated: bool

    @property
    def pending(self) -> int: ...

    def feed(self, chunk: bytes) -> bool: ...


def _entry(values: dict[str, Any], under: RelPath | None = None) -> Entry:
    """An Entry from a checked reply entry; ProtocolViolation if it is not where it was asked for."""
    path: str = values["path"]
    if under is not None and under.parts and not path.startswith(under.text + "/"):
        raise ProtocolViolation(
            "the sandbox's executor broke the protocol: it listed an entry outside the folder asked for"
        )
    return Entry(
        name=values["name"],
        path=path,
        type=values["type"],
        size=values["size"],
        modified=datetime.fromtimestamp(values["mtime"], tz=UTC),
    )


class DaemonFiles(Files):
    """Files served by the executor daemon inside the sandbox (`daemon/executor_files.py`).

    Needs no host path. Every reply is checked (`executor_proto.RESULTS`, `check_entry`, the
    search output's record sizes): a daemon that lies costs its own request a 502, never the
    server memory it did not budget.
    """

    kind = "daemon"

    def __init__(
        self,
        sandbox: Callable[[], ExecutorSandbox],
        *,
        max_read_bytes: int = 10_485_760,
        max_list_entries: int = 10_000,
        search_timeout: float = 60.0,
        timeout: float = 60.0,
    ) -> None:
        """`sandbox` gives the session's sandbox at each use (it may be replaced by a restart).

        `timeout` (FILES_TIMEOUT): how long any one wait on the daemon may last (a reply, a stream's
        next bytes, its credit); then UpstreamTimeout. Search has its own, `search_timeout`.
        """
        self._sandbox = sandbox
        self.max_read_bytes = max_read_bytes
        self.max_list_entries = max_list_entries
        self.search_timeout = search_timeout
        self.timeout = timeout

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        return await _within(self.timeout, self._sandbox().request(op, **args))

    async def _open(self, op: str, **args: Any) -> tuple[ByteStream, asyncio.Future[dict[str, Any]]]:
        return await _within(self.timeout, self._sandbox().open_stream(op, **args))

    async def list(self, path: str = ".", *, depth: int = 1) -> Listing:
        rel = parse_path(path, allow_root=True)
        depth = check_depth(depth)
        cap = self.max_list_entries
        reply = await self._call("fs_list", path=list(rel.parts), depth=depth, cap=cap, allow=LIST_LINE_MAX)
        raw = reply["entries"]
        if len(raw) > cap:
            raise ProtocolViolation(
                "the sandbox's executor broke the protocol: it listed more entries than asked for"
            )
        return Listing([_entry(e, rel) for e in raw], truncated=reply["truncated"])

    async def stat(self, path: str) -> Entry:
        rel = parse_path(path, allow_root=True)
        reply = await self._call("fs_stat", path=list(rel.parts))
        entry = _entry(reply["entry"])
        if entry.path != rel.text:
            raise ProtocolViolation(
                "the sandbox's executor broke the protocol: it described another entry than asked for"
            )
        return entry

    async def read(self, path: str, *, max_bytes: int | None = None) -> str:
        rel = parse_path(path, allow_root=False)
        limit = self.max_read_bytes if max_bytes is None else max_bytes
        stream, reply = await self._open("fs_read", lasting=True, path=[*rel.parts], max=limit + 1)
        async with stream:  # leaving early (too large, cancelled, stalled) resets it: the daemon stops
            size = (await _within(self.timeout, asyncio.shield(reply)))["size"]
            data = bytearray()
            if size <= limit:
                while chunk := await _within(self.timeout, stream.read()):
                    data += chunk
                    if len(data) > size:  # the size at open bounds what may come (a daemon may lie)
                        raise ProtocolViolation(
                            "the sandbox's executor broke the protocol: it sent more bytes than the file has"
                        )
        if size > limit or len(data) > limit:
            raise TooLarge(
                f"'{rel.text}' is larger than the {limit}-byte limit for reading as text; "
                "use the download endpoint.",
                path=rel.text,
                limit=limit,
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                f"'{rel.text}' is not UTF-8 text (it looks binary); use the download endpoint.", path=rel.text
            ) from None

    async def write(self, path: str, content: str | bytes) -> int:
        data = encode_text(content)

        async def once() -> AsyncIterator[bytes]:
            yield data

        return await self.upload(path, once(), max_bytes=len(data))

    async def download(self, path: str, *, chunk_size: int | None = None) -> tuple[int, AsyncIterator[bytes]]:
        rel = parse_path(path, allow_root=False)
        stream, reply = await self._open(
            "fs_read", lasting=True, path=[*rel.parts], chunk=chunk_size or proto.FRAME_MAX
        )
        try:
            size: int = (await _within(self.timeout, asyncio.shield(reply)))["size"]
        except BaseException:
            await stream.reset()
            raise
        return size, _chunks(stream, size, self.timeout)

    async def upload(self, path: str, chunks: AsyncIterator[bytes], *, max_bytes: int) -> int:
        rel = parse_path(path, allow_root=False)
        stream, reply = await self._open("fs_write", path=[*rel.parts], max=max_bytes)
        async with stream:  # an error, a cancel, a stall or too many bytes resets it: nothing is left
            sent = 0
            async for chunk in chunks:
                if sent + len(chunk) > max_bytes:
                    raise TooLarge(f"Upload is larger than the {max_bytes}-byte limit.", limit=max_bytes)
                if reply.done():
                    break  # it failed early (a folder in the way): its error is below
                await _within(self.timeout, stream.write(chunk))  # a daemon that gives no credit stalls it
                sent += len(chunk)
            await _within(self.timeout, stream.end())
            size: int = (await _within(self.timeout, asyncio.shield(reply)))["size"]
        if size != sent:
            raise ProtocolViolation(
                "the sandbox's executor broke the protocol: it wrote another size than it was sent"
            )
        return size

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        rel = parse_path(path, allow_root=False)
        await self._call("fs_remove", path=list(rel.parts), recursive=recursive)

    async def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        source, dest = parse_path(src, allow_root=False), parse_path(dst, allow_root=False)
        await self._call("fs_rename", src=list(source.parts), dst=list(dest.parts), overwrite=overwrite)

    async def make_dir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        rel = parse_path(path, allow_root=True)
        if not rel.parts:
            if not exist_ok:
                raise InvalidInput("The workspace folder itself always exists.")
            return
        await self._call("fs_mkdir", path=list(rel.parts), parents=parents, exist_ok=exist_ok)

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
        rel = parse_path(path, allow_root=True)
        check_limit(max_results)
        args = files_args(pattern, include_ignored, include_hidden)[:-1]  # the daemon adds the target
        globs = type_globs(file_types)
        collector: FileCollector = await self._rg(
            rel, args, False, lambda on_stdin: FileCollector(rel.text, max_results, globs)
        )
        return collector.result()

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
        rel = parse_path(path, allow_root=True)
        check_limit(max_results)
        opts = GrepOptions(
            pattern, file_types, regex, case_sensitive, context, include_ignored, include_hidden
        )
        args = grep_args(opts, stdin=False)[:-1]  # validated here; the daemon adds `.` or `-`
        # rg prints at most 2 * context lines around each match, and one match past the limit.
        records = (max_results + 2) * (2 * context + 1)

        def make(on_stdin: bool) -> GrepCollector:
            return GrepCollector(rel.text, max_results, context, label=rel.text if on_stdin else None)

        collector: GrepCollector = await self._rg(rel, args, True, make, records=records)
        return collector.result()

    async def _rg(
        self,
        rel: RelPath,
        args: Sequence[str],
        allow_file: bool,
        make: Callable[[bool], Any],
        *,
        records: int | None = None,
    ) -> Any:
        """Run rg in the sandbox, feeding its streamed output to the collector `make` builds."""
        feed = _RgFeed(make, records)
        call = asyncio.ensure_future(  # bounded by `search_timeout` below
            self._sandbox().request(
                "fs_rg", on_chunk=feed.take, path=[*rel.parts], args=[*args], file=allow_file
            )
        )
        full = asyncio.ensure_future(feed.full.wait())
        try:
            done, _ = await asyncio.wait(
                {call, full}, timeout=self.search_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (call, full):
                task.cancel()
            await asyncio.gather(call, full, return_exceptions=True)
        if feed.violation:
            raise ProtocolViolation(f"the sandbox's executor broke the protocol: {feed.violation}")
        if call in done:
            reply = call.result()
            check_exit(reply["exit_code"], reply["stderr"], Path("/workspace"))
        if feed.collector is None:
            if call in done:
                raise ProtocolViolation("the sandbox's executor broke the protocol: it sent no search target")
            feed.collector = make(False)
        if not done:
            log.warning("search in the sandbox timed out after %ss", self.search_timeout)
            feed.collector.truncated = True
        return feed.collector


async def _chunks(stream: ByteStream, size: int, timeout: float) -> AsyncIterator[bytes]:
    """At most `size` bytes of the stream (a daemon sending more is cut off), then its reset.

    A stream that sends nothing for `timeout` seconds raises UpstreamTimeout (the response is cut).
    """
    try:
        remaining = size
        while remaining > 0 and (chunk := await _within(timeout, stream.read())):
            if len(chunk) > remaining:
                raise ProtocolViolation(
                    "the sandbox's executor broke the protocol: it sent more bytes than the file has"
                )
            remaining -= len(chunk)
            yield chunk
    finally:
        await stream.reset()


class _RgFeed:
    """Takes a search's streamed chunks: first `D`/`F` (folder or file), then rg's output."""

    def __init__(self, make: Callable[[bool], Any], records: int | None) -> None:
        self.make = make
        self.records = records
        self.collector: Any = None
        self.full = asyncio.Event()
        self.violation = ""

    def take(self, data: str) -> None:
        if self.full.is_set():
            return
        if self.collector is None:
            if data not in ("D", "F"):
                return self._break("a search did not start with its target")
            self.collector = self.make(data == "F")
            return None
        if self.collector.feed(data.encode("utf-8", "surrogatepass")):
            self.full.set()
        elif self.collector.pending > PENDING_MAX:
            self._break("a search record is too long")
        elif self.records is not None and self.collector.stored > self.records:
            self._break("a search sent more lines than it can have")
        return None

    def _break(self, why: str) -> None:
        self.violation = why
        self.full.set()
