"""Turn rg's output stream into sorted, capped results.

`feed()` returns True once more than `limit` matches arrived, so the caller can
stop reading and kill rg early. rg searches in parallel, so which matches arrive
first is not deterministic; the ones kept are then sorted.
"""

from __future__ import annotations

import fnmatch
import re

from crogia.workspace.models import GrepMatch, SearchResult

_LINE_HEAD = re.compile(rb"(\d+)([:-])")


def _decode(raw: bytes) -> str:
    # File names and lines may be any bytes; U+FFFD keeps the JSON layer safe.
    return raw.decode("utf-8", "replace")


class _Prefixer:
    """Maps rg's `./x` paths (relative to the searched folder) to workspace-relative paths."""

    def __init__(self, prefix: str) -> None:
        self._prefix = "" if prefix in ("", ".") else prefix + "/"

    def __call__(self, raw: bytes) -> str:
        path = _decode(raw)
        if path.startswith("./"):
            path = path[2:]
        return self._prefix + path


class FileCollector:
    """Collects `rg --files --null` output, keeping names that match one of `name_globs` (if any)."""

    def __init__(self, prefix: str, limit: int, name_globs: list[str]) -> None:
        self._fix = _Prefixer(prefix)
        joined = "|".join(fnmatch.translate(glob) for glob in name_globs)
        self._wanted = re.compile(joined).match if name_globs else None
        self._limit = limit
        self._pending = b""
        self._paths: list[str] = []
        self.truncated = False

    @property
    def pending(self) -> int:
        """Bytes held of a record not yet ended."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> bool:
        """Take a chunk; True once the result is full."""
        *complete, self._pending = (self._pending + chunk).split(b"\0")
        for raw in complete:
            path = self._fix(raw)
            if self._wanted is not None and not self._wanted(path.rpartition("/")[2]):
                continue
            if len(self._paths) >= self._limit:
                self.truncated = True
                return True
            self._paths.append(path)
        return False

    def result(self) -> SearchResult[str]:
        """Sorted paths."""
        return SearchResult(sorted(self._paths), self.truncated)


class GrepCollector:
    """Collects `rg --null -n --with-filename` records: `path NUL line (':'|'-') text LF`."""

    def __init__(self, prefix: str, limit: int, context: int, *, label: str | None = None) -> None:
        self._fix = _Prefixer(prefix)
        self._label = label
        """For a single file searched on stdin, its workspace path (rg calls it `<stdin>`)."""
        self._limit = limit
        self._context = context
        self._pending = b""
        self._lines: dict[str, dict[int, tuple[bool, str]]] = {}
        self._count = 0
        self.stored = 0
        """Lines kept (matches and context)."""
        self.truncated = False

    @property
    def pending(self) -> int:
        """Bytes held of a record not yet ended."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> bool:
        """Take a chunk; True once the result is full."""
        data = self._pending + chunk
        pos = 0
        while (nul := data.find(b"\0", pos)) >= 0 and (end := data.find(b"\n", nul)) >= 0:
            # A path may contain LF but never NUL, and a line never contains LF.
            if not self._record(data[pos:nul], data[nul + 1 : end]):
                self._pending = b""
                return True
            pos = end + 1
        self._pending = data[pos:]
        return False

    def _record(self, raw_path: bytes, rest: bytes) -> bool:
        head = _LINE_HEAD.match(rest)
        if head is None:
            return True  # not a record (never expected); skip it
        is_match = head[2] == b":"
        if is_match:
            if self._count >= self._limit:
                self.truncated = True
                return False
            self._count += 1
        path = self._label if self._label is not None else self._fix(raw_path)
        text = _decode(rest[head.end() :]).removesuffix("\r")
        self._lines.setdefault(path, {})[int(head[1])] = (is_match, text)
        self.stored += 1
        return True

    def result(self) -> SearchResult[GrepMatch]:
        """Matches sorted by file then line, each with the context lines rg printed around it."""
        matches: list[GrepMatch] = []
        around = self._context
        for path in sorted(self._lines):
            lines = self._lines[path]
            for number in sorted(n for n, (is_match, _) in lines.items() if is_match):
                before = tuple(lines[n][1] for n in range(number - around, number) if n in lines)
                after = tuple(lines[n][1] for n in range(number + 1, number + around + 1) if n in lines)
                matches.append(GrepMatch(path, number, lines[number][1], before, after))
        return SearchResult(matches, self.truncated)
