"""Path checks and a race-free walk beneath the workspace root.

A path is first checked as a string (cheap, clear messages), then resolved one
component at a time with `openat(O_NOFOLLOW | O_DIRECTORY)` from a directory fd
on the root. The kernel refuses to follow a symlink in any position, so a folder
swapped for a symlink while a request runs makes the request fail instead of
escaping. Strings alone are never trusted for confinement.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from crogia.errors import Conflict, CrogiaError, InvalidInput, NotFound, TooLarge

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PATH_CHARS = 4096


@dataclass(frozen=True, slots=True)
class RelPath:
    """A checked path below the root: no `..`, no empty or `.` components."""

    parts: tuple[str, ...]

    @property
    def text(self) -> str:
        """The `/`-joined form shown to users; `.` for the root."""
        return "/".join(self.parts) or "."

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def parent(self) -> RelPath:
        return RelPath(self.parts[:-1])

    def child(self, name: str) -> RelPath:
        return RelPath((*self.parts, name))

    def is_within(self, other: RelPath) -> bool:
        """True if self is other or lies below it."""
        return self.parts[: len(other.parts)] == other.parts


def parse_path(path: str, *, allow_root: bool) -> RelPath:
    """Check a user path; `""` and `.` mean the root, accepted only when `allow_root`."""
    if "\x00" in path:
        raise InvalidInput("Path must not contain NUL bytes.")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidInput(f"Path is longer than {MAX_PATH_CHARS} characters.")
    if "\\" in path:
        raise InvalidInput(f"Path {path!r} must use '/' as separator, not backslashes.", path=path)
    if path.startswith("/"):
        raise InvalidInput(f"Path {path!r} must be relative to the workspace, not absolute.", path=path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("Path is not valid UTF-8.") from None
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidInput(f"Path {path!r} must not contain '..'.", path=path)
    if not parts and not allow_root:
        raise InvalidInput("Path must name a file or folder inside the workspace, not the workspace itself.")
    return RelPath(parts)


def os_error(exc: OSError, rel: RelPath) -> CrogiaError | OSError:
    """Map an OSError to a CrogiaError naming only the relative path (never host paths)."""
    shown = rel.text
    code = exc.errno
    if code == errno.ENOENT:
        return NotFound(f"'{shown}' does not exist.", path=shown)
    if code == errno.EEXIST:
        return Conflict(f"'{shown}' already exists.", path=shown)
    if code in (errno.ENOTEMPTY, errno.EBUSY):
        return Conflict(f"'{shown}' is not empty or is in use.", path=shown)
    if code in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
        return InvalidInput(f"'{shown}' is not the kind of entry this operation expects.", path=shown)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InvalidInput(f"Permission denied for '{shown}'.", path=shown)
    if code == errno.ENAMETOOLONG:
        return InvalidInput(f"A name in '{shown}' is too long.", path=shown)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TooLarge("The workspace has no space left for this write.", path=shown)
    return exc


def kind_error(mode: int, rel: RelPath, *, want: str) -> InvalidInput:
    """Explain why an entry with `mode` cannot be used where a `want` (file|folder) is needed."""
    shown = rel.text
    if stat.S_ISLNK(mode):
        return InvalidInput(f"'{shown}' is a symbolic link; symbolic links are not followed.", path=shown)
    if stat.S_ISDIR(mode):
        return InvalidInput(f"'{shown}' is a folder, not a file.", path=shown)
    if want == "folder":
        return InvalidInput(f"'{shown}' is not a folder.", path=shown)
    return InvalidInput(f"'{shown}' is not a regular file (device, FIFO or socket).", path=shown)


def lstat_at(dir_fd: int, rel: RelPath) -> os.stat_result:
    """lstat the last component of `rel` inside `dir_fd` (its parent)."""
    try:
        return os.stat(rel.name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise os_error(exc, rel) from None


def open_subdir(dir_fd: int, rel: RelPath, *, create: bool = False) -> int:
    """Open `rel.name` inside `dir_fd` as a folder, never through a symlink."""
    try:
        return os.open(rel.name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise NotFound(f"Folder '{rel.text}' does not exist.", path=rel.text) from None
    except OSError as exc:
        raise _walk_error(dir_fd, rel, exc) from None
    made = True
    try:
        os.mkdir(rel.name, 0o755, dir_fd=dir_fd)
    except FileExistsError:
        made = False  # created concurrently; the open below decides what it is
    except OSError as exc:
        raise os_error(exc, rel) from None
    try:
        fd = os.open(rel.name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _walk_error(dir_fd, rel, exc) from None
    if made:
        own_like_parent(fd, dir_fd)
    return fd


def own_like_parent(fd: int, dir_fd: int) -> None:
    """Give what the server just made (`fd`) the owner of the folder it is in (`dir_fd`).

    A bubblewrap sandbox's root is an unprivileged host uid that owns its workspace: a file the
    server (host root) wrote would be read-only to it, and show as `nobody`. Where the server
    and the folder's owner are the same uid (Docker, no user namespace) this does nothing.
    """
    parent = os.fstat(dir_fd)
    if parent.st_uid != os.geteuid() and os.geteuid() == 0:
        os.fchown(fd, parent.st_uid, parent.st_gid)


def _walk_error(dir_fd: int, rel: RelPath, exc: OSError) -> CrogiaError | OSError:
    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
        return os_error(exc, rel)
    try:
        mode = os.stat(rel.name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return os_error(exc, rel)
    return kind_error(mode, rel, want="folder")


def open_root(root: Path) -> int:
    """Open the workspace root itself (a host-configured path, so following it is fine)."""
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise NotFound("The workspace folder does not exist any more.") from None


@contextmanager
def opened_dir(root: Path, rel: RelPath, *, create: bool = False) -> Iterator[int]:
    """Yield an fd on folder `rel` (created with parents if `create`), closed on exit."""
    fd = open_root(root)
    try:
        for depth in range(1, len(rel.parts) + 1):
            child = open_subdir(fd, RelPath(rel.parts[:depth]), create=create)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)
