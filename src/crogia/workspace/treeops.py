"""Blocking folder primitives: list, mkdir, remove, move (run in a worker thread).

Every walk holds directory fds and opens children with O_NOFOLLOW, so a symlink
is listed or unlinked as itself and never descended into, even if it appears
while the walk runs.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from crogia.errors import Conflict, InvalidInput, NotFound
from crogia.workspace._linux import rename_noreplace
from crogia.workspace.models import Entry, EntryType
from crogia.workspace.paths import DIR_FLAGS, RelPath, lstat_at, opened_dir, os_error, own_like_parent

MAX_REMOVE_DEPTH = 256
SCAN_MAX = 100_000
"""Names read from one folder for a listing at most: each costs ~1.5 us of Python holding the GIL
(a million took 1.5 s), and a folder past them is no source tree. Such a folder's listing is the
first entries (in listing order) of the names it gave first, `truncated`."""


def _entry(name: str, rel: RelPath, st: os.stat_result) -> Entry:
    kind: EntryType = "file"
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    shown = _shown(name)
    return Entry(
        name=shown,
        path=rel.child(shown).text,
        type=kind,
        size=None if kind == "directory" else st.st_size,
        modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
    )


def _shown(name: str) -> str:
    """A name as listed: bytes on Linux, undecodable ones shown with U+FFFD so JSON never breaks."""
    return os.fsencode(name).decode("utf-8", "replace")


def _order(item: os.DirEntry[str]) -> tuple[bool, str, str]:
    """Listing order: folders first (a link to one is a link), then by name, case folded."""
    shown = _shown(item.name)
    return (not item.is_dir(follow_symlinks=False), shown.casefold(), shown)


def _scan(fd: int, rel: RelPath, keep: int) -> list[tuple[str, Entry]]:
    """The first `keep` (raw name, entry) pairs of one folder in listing order.

    How many names a folder holds is the sandbox's to choose, so only `keep` of them are held at
    once (a heap over the folder's names; the kind comes from the folder itself) and only those are
    stat'ed; at most SCAN_MAX names are read (past them, the order is of those read).
    """
    with os.scandir(fd) as it:
        first = heapq.nsmallest(keep, itertools.islice(it, max(SCAN_MAX, keep)), key=_order)
    found: list[tuple[str, Entry]] = []
    for item in first:
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we listed
        found.append((item.name, _entry(item.name, rel, st)))
    return found


def _walk(fd: int, rel: RelPath, depth: int, out: list[Entry], cap: int) -> None:
    for raw, entry in _scan(fd, rel, cap - len(out)):
        if len(out) >= cap:
            return
        out.append(entry)
        if depth <= 1 or entry.type != "directory":
            continue
        try:
            child = os.open(raw, DIR_FLAGS, dir_fd=fd)
        except OSError:
            continue  # swapped or removed since the scan: list it, do not descend
        try:
            _walk(child, rel.child(entry.name), depth - 1, out, cap)
        finally:
            os.close(child)


def list_dir(root: Path, rel: RelPath, depth: int, cap: int) -> list[Entry]:
    """Entries of folder `rel`, recursing `depth - 1` levels, at most `cap` entries."""
    out: list[Entry] = []
    with opened_dir(root, rel) as fd:
        _walk(fd, rel, depth, out, cap)
    return out


def stat_entry(root: Path, rel: RelPath) -> Entry:
    """The entry `rel` names, a symlink as itself; the root is `.`."""
    if not rel.parts:
        with opened_dir(root, rel) as fd:
            return replace(_entry(".", rel, os.fstat(fd)), name=".", path=".")
    with opened_dir(root, rel.parent) as dir_fd:
        return _entry(rel.name, rel.parent, lstat_at(dir_fd, rel))


def make_dir(root: Path, rel: RelPath, *, parents: bool, exist_ok: bool) -> None:
    """Create folder `rel`; with `parents`, missing ancestors too."""
    with opened_dir(root, rel.parent, create=parents) as dir_fd:
        try:
            os.mkdir(rel.name, 0o755, dir_fd=dir_fd)
            made = os.open(rel.name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                own_like_parent(made, dir_fd)
            finally:
                os.close(made)
            return
        except FileExistsError:
            mode = lstat_at(dir_fd, rel).st_mode
        except OSError as exc:
            raise os_error(exc, rel) from None
    if not stat.S_ISDIR(mode):
        raise Conflict(f"'{rel.text}' already exists and is not a folder.", path=rel.text)
    if not exist_ok:
        raise Conflict(f"Folder '{rel.text}' already exists.", path=rel.text)


def remove(root: Path, rel: RelPath, *, recursive: bool) -> None:
    """Delete a file, symlink (the link itself) or folder (non-empty only if `recursive`)."""
    with opened_dir(root, rel.parent) as dir_fd:
        if not stat.S_ISDIR(lstat_at(dir_fd, rel).st_mode):
            _unlink(dir_fd, rel.name, rel)
            return
        if recursive:
            _clear_tree(dir_fd, rel)
        try:
            os.rmdir(rel.name, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise Conflict(
                    f"Folder '{rel.text}' is not empty; delete it recursively to remove its contents.",
                    path=rel.text,
                ) from None
            raise os_error(exc, rel) from None


def _unlink(dir_fd: int, name: str, rel: RelPath) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass  # already gone: the outcome the caller wanted
    except OSError as exc:
        raise os_error(exc, rel) from None


def _unlink_all_but_dirs(fd: int, rel: RelPath) -> list[str]:
    """Unlink every non-folder in `fd`; return the names of its subfolders."""
    subdirs: list[str] = []
    with os.scandir(fd) as it:
        for item in it:
            if item.is_dir(follow_symlinks=False):
                subdirs.append(item.name)
            else:
                _unlink(fd, item.name, rel)
    return subdirs


def _clear_tree(parent_fd: int, rel: RelPath) -> None:
    """Empty folder `rel` depth-first with an explicit stack of fds (no recursion limit)."""
    try:
        top = os.open(rel.name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise os_error(exc, rel) from None
    stack: list[tuple[int, str, list[str]]] = [(top, rel.name, [])]
    try:
        stack[0][2].extend(_unlink_all_but_dirs(top, rel))
        while stack:
            fd, name, pending = stack[-1]
            if not pending:
                stack.pop()
                os.close(fd)
                if stack:
                    _rmdir(stack[-1][0], name, rel)
                continue
            if len(stack) >= MAX_REMOVE_DEPTH:
                raise InvalidInput(f"'{rel.text}' is nested too deeply to delete here.", path=rel.text)
            sub = pending.pop()
            try:
                child = os.open(sub, DIR_FLAGS, dir_fd=fd)
            except OSError:
                _unlink(fd, sub, rel)  # vanished, or swapped for a non-folder: drop the entry itself
                continue
            stack.append((child, sub, []))
            stack[-1][2].extend(_unlink_all_but_dirs(child, rel))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _rmdir(dir_fd: int, name: str, rel: RelPath) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, rel) from None


def move(root: Path, src: RelPath, dst: RelPath, *, overwrite: bool) -> None:
    """Rename `src` to `dst` inside the workspace; parents of `dst` are created."""
    if dst.is_within(src):
        if dst == src:
            return
        raise InvalidInput(f"Cannot move '{src.text}' into itself.", src=src.text, dst=dst.text)
    with opened_dir(root, src.parent) as src_fd, opened_dir(root, dst.parent, create=True) as dst_fd:
        lstat_at(src_fd, src)
        try:
            if overwrite:
                os.rename(src.name, dst.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            else:
                rename_noreplace(src_fd, src.name, dst_fd, dst.name)
        except OSError as exc:
            raise _move_error(exc, src, dst) from None


def _move_error(exc: OSError, src: RelPath, dst: RelPath) -> Exception:
    if exc.errno == errno.EEXIST:
        return Conflict(f"'{dst.text}' already exists; pass overwrite to replace it.", path=dst.text)
    if exc.errno in (errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
        return Conflict(f"'{dst.text}' exists and cannot be replaced by '{src.text}'.", path=dst.text)
    if exc.errno == errno.ENOENT:
        return NotFound(f"'{src.text}' does not exist.", path=src.text)
    return os_error(exc, src)
