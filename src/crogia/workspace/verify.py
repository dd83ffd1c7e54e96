"""Re-check rg's results through the safe walk when rg could not be confined.

Without Landlock, rg walks by path, and a folder swapped for a symlink mid-walk can
make it read outside the workspace. Each reported path is therefore re-opened with
the O_NOFOLLOW walk and each reported line compared with what the file inside the
workspace really holds; anything that does not match is dropped. A result that
survives is, by construction, content of the workspace.
"""

from __future__ import annotations

import io
import stat
from collections import defaultdict
from pathlib import Path

from crogia.errors import CrogiaError
from crogia.workspace.fileops import open_regular
from crogia.workspace.models import GrepMatch
from crogia.workspace.paths import lstat_at, opened_dir, parse_path

PREVIEW_SUFFIX = " [... omitted end of long line]"


def verify_files(root: Path, paths: list[str]) -> list[str]:
    """Keep the paths that are regular files reached without any symlink."""
    kept: list[str] = []
    for path in paths:
        try:
            rel = parse_path(path, allow_root=False)
            with opened_dir(root, rel.parent) as dir_fd:
                mode = lstat_at(dir_fd, rel).st_mode
        except (CrogiaError, OSError):
            continue
        if stat.S_ISREG(mode):
            kept.append(path)
    return kept


def verify_matches(root: Path, matches: list[GrepMatch]) -> list[GrepMatch]:
    """Keep the matches whose file, read safely, holds the reported lines."""
    by_file: dict[str, list[GrepMatch]] = defaultdict(list)
    for match in matches:
        by_file[match.file].append(match)
    kept: list[GrepMatch] = []
    for path, found in by_file.items():
        if _holds(root, path, _expected_lines(found)):
            kept.extend(found)
    return kept


def _expected_lines(found: list[GrepMatch]) -> dict[int, str]:
    lines: dict[int, str] = {}
    for match in found:
        lines[match.line] = match.content
        for offset, text in enumerate(reversed(match.context_before), start=1):
            lines[match.line - offset] = text
        for offset, text in enumerate(match.context_after, start=1):
            lines[match.line + offset] = text
    return lines


def _holds(root: Path, path: str, expected: dict[int, str]) -> bool:
    try:
        handle = open_regular(root, parse_path(path, allow_root=False))
    except (CrogiaError, OSError):
        return False
    pending = dict(expected)
    with io.BufferedReader(handle) as reader:
        for number, raw in enumerate(reader, start=1):
            want = pending.pop(number, None)
            if want is not None and not _same(raw, want):
                return False
            if not pending:
                return True
    return False


def _same(raw: bytes, shown: str) -> bool:
    actual = raw.removesuffix(b"\n").decode("utf-8", "replace").removesuffix("\r")
    if shown.endswith(PREVIEW_SUFFIX):
        return actual.startswith(shown.removesuffix(PREVIEW_SUFFIX))
    return actual == shown
