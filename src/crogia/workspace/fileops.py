"""Blocking file primitives (run in a worker thread by `Workspace`).

Files are opened with O_NOFOLLOW | O_NONBLOCK from an fd on their parent folder,
after an lstat that refuses anything but a regular file; fstat re-checks after the
open, so a FIFO or device swapped in meanwhile is closed without being read (and
O_NONBLOCK means opening a FIFO can never hang). Writes go to a temp file in the
same folder and are renamed over the target, so readers see old or new content,
never a mix, and a target swapped for a symlink is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
from pathlib import Path

from crogia.errors import InvalidInput, TooLarge
from crogia.workspace.paths import (
    RelPath,
    kind_error,
    lstat_at,
    open_root,
    open_subdir,
    opened_dir,
    os_error,
    own_like_parent,
)

FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
NEW_FILE_MODE = 0o644


def open_regular(root: Path, rel: RelPath) -> io.FileIO:
    """Open `rel` for reading; only a regular file reached without symlinks is accepted."""
    with opened_dir(root, rel.parent) as dir_fd:
        mode = lstat_at(dir_fd, rel).st_mode
        if not stat.S_ISREG(mode):
            raise kind_error(mode, rel, want="file")
        try:
            fd = os.open(rel.name, FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise os_error(exc, rel) from None
    # FileIO owns the fd from here: it is closed even if the caller drops it unread.
    handle = io.FileIO(fd, "rb", closefd=True)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        raise kind_error(mode, rel, want="file")
    return handle


def read_text(root: Path, rel: RelPath, limit: int) -> str:
    """Whole file as UTF-8 text, refusing files over `limit` bytes or not UTF-8."""
    with open_regular(root, rel) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = b"" if size > limit else read_at_most(handle, limit + 1)
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


def read_at_most(handle: io.FileIO, limit: int) -> bytes:
    """Read until EOF or `limit` bytes, whichever comes first."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = handle.read(min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class AtomicFile:
    """A temp file beside `rel`; `commit()` renames it over the target, `abort()` removes it."""

    def __init__(self, root: Path, rel: RelPath) -> None:
        self.rel = rel
        self.size = 0
        self._tmp = f".crogia-{secrets.token_hex(8)}.tmp"
        self._dir_fd = _open_parent_for_write(root, rel)
        try:
            self._fd = self._create_temp(self._target_mode())
        except BaseException:
            os.close(self._dir_fd)
            raise

    def _target_mode(self) -> int:
        """Keep an existing file's permission bits (a script stays executable)."""
        try:
            mode = os.stat(self.rel.name, dir_fd=self._dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return NEW_FILE_MODE
        except OSError as exc:
            raise os_error(exc, self.rel) from None
        if not stat.S_ISREG(mode):
            raise kind_error(mode, self.rel, want="file")
        return stat.S_IMODE(mode)

    def _create_temp(self, mode: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._tmp, flags, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            raise os_error(exc, self.rel) from None
        own_like_parent(fd, self._dir_fd)
        os.fchmod(fd, mode)  # explicit, so the host umask does not decide (after fchown, which clears setuid)
        return fd

    def write(self, data: bytes) -> None:
        """Append `data` to the temp file."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise os_error(exc, self.rel) from None
        self.size += len(data)

    def commit(self) -> None:
        """Atomically replace the target with the temp file."""
        try:
            os.close(self._fd)
            self._fd = -1
            os.rename(self._tmp, self.rel.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.rel) from None
        os.close(self._dir_fd)
        self._dir_fd = -1

    def abort(self) -> None:
        """Remove the temp file; safe to call more than once."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp, dir_fd=self._dir_fd)
            os.close(self._dir_fd)
            self._dir_fd = -1


def _open_parent_for_write(root: Path, rel: RelPath) -> int:
    """fd on the parent folder of `rel`, creating missing folders one component at a time."""
    fd = open_root(root)
    try:
        for depth in range(1, len(rel.parts)):
            child = open_subdir(fd, RelPath(rel.parts[:depth]), create=True)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_bytes(root: Path, rel: RelPath, data: bytes) -> int:
    """Atomically write `data` to `rel`, creating parent folders; returns bytes written."""
    target = AtomicFile(root, rel)
    try:
        target.write(data)
    except BaseException:
        target.abort()
        raise
    target.commit()
    return target.size
