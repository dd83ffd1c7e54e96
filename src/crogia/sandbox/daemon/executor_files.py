"""The `fs_*` ops: the session's files, served from inside the sandbox (`SANDBOX_FILES=daemon`).

Part of the executor daemon (`executor.py` says how it fits), imported on the first file op only.
The same confinement as the server's host-side path (`crogia.workspace`), with the same messages:

* a path arrives as its components (the server checked the string; each is checked again here:
  no empty, `.`, `..`, `/` or NUL component);
* it is resolved one component at a time from an fd on the workspace root with
  `openat(O_NOFOLLOW | O_DIRECTORY)`: a symlink in any position is refused, never followed,
  even one swapped in while the request runs;
* files are opened O_NOFOLLOW | O_NONBLOCK and must be regular (a FIFO cannot hang the daemon);
  writes go to a temp file renamed over the target;
* listings show a symlink as `symlink`; `fs_remove` and `fs_rename` act on the link itself;
* `fs_rg` runs the image's `rg` in a folder opened that way (fchdir), never through a shell, and
  streams its output as `chunk` pushes (text, U+FFFD for undecodable bytes), pausing while the
  connection has a backlog. rg does not follow symlinks; a folder swapped for one mid-walk can
  only lead it to the sandbox's own files, which its user reads with a shell anyway.

Errors are `RequestError`s whose code the server maps: `not_found`, `conflict`, `too_large`,
`bad_request` (InvalidInput).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import stat

import executor_proto as proto
from executor_core import LOOP, RequestError, arg

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any

    from executor import Connection
    from executor_core import Message, RequestId, Steps
else:
    import _signal as signal  # `signal` itself imports enum (and enum half the stdlib)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
NEW_FILE_MODE = 0o644
MAX_PARTS = 2048
MAX_LIST_DEPTH = 64
MAX_REMOVE_DEPTH = 256
CHUNK = 65536
BACKLOG = 1 << 20
"""rg's output is read no further while the connection has this much unsent."""
TOOLS = "/opt/crogia-tools"
"""Where a bubblewrap sandbox (which sees the host's /usr) finds the server's own rg."""
ROOT = "/workspace"
"""The workspace root; the daemon's `--workspace` option changes it (tests run the daemon on the host)."""


def _fail(code: str, message: str) -> RequestError:
    return RequestError(code, message)


class Rel:
    """A checked path below the root, as its components."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[str, ...]) -> None:
        self.parts = parts

    @property
    def text(self) -> str:
        return "/".join(self.parts) or "."

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def parent(self) -> Rel:
        return Rel(self.parts[:-1])

    def child(self, name: str) -> Rel:
        return Rel((*self.parts, name))


def rel_arg(req: Message, name: str = "path", allow_root: bool = True) -> Rel:
    parts = req.get(name)
    if (
        not isinstance(parts, list)
        or len(parts) > MAX_PARTS
        or not all(
            isinstance(p, str) and p not in ("", ".", "..") and "/" not in p and "\x00" not in p
            for p in parts
        )
    ):
        raise _fail("bad_request", f"argument {name!r} must be a list of path components")
    if not parts and not allow_root:
        raise _fail(
            "bad_request", "Path must name a file or folder inside the workspace, not the workspace itself."
        )
    return Rel(tuple(parts))


def os_error(exc: OSError, rel: Rel) -> Exception:
    shown, code = rel.text, exc.errno
    if code == errno.ENOENT:
        return _fail("not_found", f"'{shown}' does not exist.")
    if code == errno.EEXIST:
        return _fail("conflict", f"'{shown}' already exists.")
    if code in (errno.ENOTEMPTY, errno.EBUSY):
        return _fail("conflict", f"'{shown}' is not empty or is in use.")
    if code in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
        return _fail("bad_request", f"'{shown}' is not the kind of entry this operation expects.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return _fail("bad_request", f"Permission denied for '{shown}'.")
    if code == errno.ENAMETOOLONG:
        return _fail("bad_request", f"A name in '{shown}' is too long.")
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return _fail("too_large", "The workspace has no space left for this write.")
    return exc


def kind_error(mode: int, rel: Rel, want: str) -> RequestError:
    shown = rel.text
    if stat.S_ISLNK(mode):
        return _fail("bad_request", f"'{shown}' is a symbolic link; symbolic links are not followed.")
    if stat.S_ISDIR(mode):
        return _fail("bad_request", f"'{shown}' is a folder, not a file.")
    if want == "folder":
        return _fail("bad_request", f"'{shown}' is not a folder.")
    return _fail("bad_request", f"'{shown}' is not a regular file (device, FIFO or socket).")


def lstat_at(dir_fd: int, rel: Rel) -> os.stat_result:
    try:
        return os.stat(rel.name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise os_error(exc, rel) from None


def own_like_parent(fd: int, dir_fd: int) -> None:
    parent = os.fstat(dir_fd)
    if parent.st_uid != os.geteuid() and os.geteuid() == 0:
        os.fchown(fd, parent.st_uid, parent.st_gid)


def _walk_error(dir_fd: int, rel: Rel, exc: OSError) -> Exception:
    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
        return os_error(exc, rel)
    try:
        mode = os.stat(rel.name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return os_error(exc, rel)
    return kind_error(mode, rel, "folder")


def open_subdir(dir_fd: int, rel: Rel, create: bool = False) -> int:
    try:
        return os.open(rel.name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise _fail("not_found", f"Folder '{rel.text}' does not exist.") from None
    except OSError as exc:
        raise _walk_error(dir_fd, rel, exc) from None
    made = True
    try:
        os.mkdir(rel.name, 0o755, dir_fd=dir_fd)
    except FileExistsError:
        made = False
    except OSError as exc:
        raise os_error(exc, rel) from None
    try:
        fd = os.open(rel.name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _walk_error(dir_fd, rel, exc) from None
    if made:
        own_like_parent(fd, dir_fd)
    return fd


def open_root() -> int:
    try:
        return os.open(ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise _fail("not_found", "The workspace folder does not exist any more.") from None


def open_dir(rel: Rel, create: bool = False) -> int:
    """An fd on folder `rel` (created with its parents if `create`); the caller closes it."""
    fd = open_root()
    try:
        for depth in range(1, len(rel.parts) + 1):
            child = open_subdir(fd, Rel(rel.parts[:depth]), create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class Opened:
    """`with Opened(rel) as fd:`: open_dir as a context manager."""

    def __init__(self, rel: Rel, create: bool = False) -> None:
        self.fd = open_dir(rel, create)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def open_regular(rel: Rel) -> int:
    """An fd reading `rel`; only a regular file reached without symlinks."""
    with Opened(rel.parent) as dir_fd:
        mode = lstat_at(dir_fd, rel).st_mode
        if not stat.S_ISREG(mode):
            raise kind_error(mode, rel, "file")
        try:
            fd = os.open(rel.name, FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise os_error(exc, rel) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise kind_error(mode, rel, "file")
    return fd


# --- listing ---

SCAN_MAX = 100_000
"""Names read from one folder for a listing at most: each costs ~1.5 us of Python holding the GIL
(a million took 1.5 s), and a folder past them is no source tree. Such a folder's listing is the
first entries (in listing order) of the names it gave first, `truncated`."""


def _entry(name: str, rel: Rel, st: os.stat_result) -> dict[str, Any]:
    kind = "file"
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    shown = os.fsencode(name).decode("utf-8", "replace")
    return {
        "name": shown,
        "path": rel.child(shown).text,
        "type": kind,
        "size": None if kind == "directory" else st.st_size,
        "mtime": st.st_mtime,
    }


def _order(item: os.DirEntry[str]) -> tuple[bool, str, str]:
    shown = os.fsencode(item.name).decode("utf-8", "replace")
    return (not item.is_dir(follow_symlinks=False), shown.casefold(), shown)


def _scan(fd: int, rel: Rel, keep: int) -> list[tuple[str, dict[str, Any]]]:
    """The first `keep` entries of one folder in listing order, holding and stat'ing only those
    (as the server's `treeops._scan`: how many names a folder holds is the sandbox's to choose)."""
    with os.scandir(fd) as it:
        first = heapq.nsmallest(keep, itertools.islice(it, max(SCAN_MAX, keep)), key=_order)
    found = []
    for item in first:
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        found.append((item.name, _entry(item.name, rel, st)))
    return found


def _walk(fd: int, rel: Rel, depth: int, out: list[dict[str, Any]], cap: int) -> None:
    for raw, entry in _scan(fd, rel, cap - len(out)):
        if len(out) >= cap:
            return
        out.append(entry)
        if depth <= 1 or entry["type"] != "directory":
            continue
        try:
            child = os.open(raw, DIR_FLAGS, dir_fd=fd)
        except OSError:
            continue
        try:
            _walk(child, rel.child(entry["name"]), depth - 1, out, cap)
        finally:
            os.close(child)


def fs_list(req: Message) -> Message:
    rel = rel_arg(req)
    depth = min(max(arg(req, "depth", int, 1), 1), MAX_LIST_DEPTH)
    cap = max(arg(req, "cap", int, 10_000), 0)
    out: list[dict[str, Any]] = []
    with Opened(rel) as fd:
        _walk(fd, rel, depth, out, cap + 1)
    return {"entries": out[:cap], "truncated": len(out) > cap}


def fs_stat(req: Message) -> Message:
    rel = rel_arg(req)
    if not rel.parts:
        with Opened(rel) as fd:
            return {"entry": {**_entry(".", rel, os.fstat(fd)), "name": ".", "path": "."}}
    with Opened(rel.parent) as dir_fd:
        st = lstat_at(dir_fd, rel)
    return {"entry": _entry(rel.name, rel.parent, st)}


# --- folders ---


def fs_mkdir(req: Message) -> Message:
    rel = rel_arg(req, allow_root=False)
    parents, exist_ok = arg(req, "parents", bool, True), arg(req, "exist_ok", bool, True)
    with Opened(rel.parent, create=parents) as dir_fd:
        try:
            os.mkdir(rel.name, 0o755, dir_fd=dir_fd)
            made = os.open(rel.name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                own_like_parent(made, dir_fd)
            finally:
                os.close(made)
            return {}
        except FileExistsError:
            mode = lstat_at(dir_fd, rel).st_mode
        except OSError as exc:
            raise os_error(exc, rel) from None
    if not stat.S_ISDIR(mode):
        raise _fail("conflict", f"'{rel.text}' already exists and is not a folder.")
    if not exist_ok:
        raise _fail("conflict", f"Folder '{rel.text}' already exists.")
    return {}


def _unlink(dir_fd: int, name: str, rel: Rel) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, rel) from None


def _rmdir(dir_fd: int, name: str, rel: Rel) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, rel) from None


def _unlink_all_but_dirs(fd: int, rel: Rel) -> list[str]:
    subdirs = []
    with os.scandir(fd) as it:
        for item in it:
            if item.is_dir(follow_symlinks=False):
                subdirs.append(item.name)
            else:
                _unlink(fd, item.name, rel)
    return subdirs


def _clear_tree(parent_fd: int, rel: Rel) -> None:
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
                raise _fail("bad_request", f"'{rel.text}' is nested too deeply to delete here.")
            sub = pending.pop()
            try:
                child = os.open(sub, DIR_FLAGS, dir_fd=fd)
            except OSError:
                _unlink(fd, sub, rel)
                continue
            stack.append((child, sub, []))
            stack[-1][2].extend(_unlink_all_but_dirs(child, rel))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def fs_remove(req: Message) -> Message:
    rel = rel_arg(req, allow_root=False)
    recursive = arg(req, "recursive", bool, False)
    with Opened(rel.parent) as dir_fd:
        if not stat.S_ISDIR(lstat_at(dir_fd, rel).st_mode):
            _unlink(dir_fd, rel.name, rel)
            return {}
        if recursive:
            _clear_tree(dir_fd, rel)
        try:
            os.rmdir(rel.name, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise _fail(
                    "conflict",
                    f"Folder '{rel.text}' is not empty; delete it recursively to remove its contents.",
                ) from None
            raise os_error(exc, rel) from None
    return {}


_renameat2: list[Any] = []


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE) through libc (ctypes loaded on first use only)."""
    if not _renameat2:
        import ctypes

        _renameat2.append((ctypes, ctypes.CDLL(None, use_errno=True).renameat2))
    ctypes, call = _renameat2[0]
    if call(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), 1) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _move_error(exc: OSError, src: Rel, dst: Rel) -> Exception:
    if exc.errno == errno.EEXIST:
        return _fail("conflict", f"'{dst.text}' already exists; pass overwrite to replace it.")
    if exc.errno in (errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
        return _fail("conflict", f"'{dst.text}' exists and cannot be replaced by '{src.text}'.")
    if exc.errno == errno.ENOENT:
        return _fail("not_found", f"'{src.text}' does not exist.")
    return os_error(exc, src)


def fs_rename(req: Message) -> Message:
    src, dst = rel_arg(req, "src", allow_root=False), rel_arg(req, "dst", allow_root=False)
    overwrite = arg(req, "overwrite", bool, False)
    if dst.parts[: len(src.parts)] == src.parts:
        if dst.parts == src.parts:
            return {}
        raise _fail("bad_request", f"Cannot move '{src.text}' into itself.")
    with Opened(src.parent) as src_fd, Opened(dst.parent, create=True) as dst_fd:
        lstat_at(src_fd, src)
        try:
            if overwrite:
                os.rename(src.name, dst.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            else:
                rename_noreplace(src_fd, src.name, dst_fd, dst.name)
        except OSError as exc:
            raise _move_error(exc, src, dst) from None
    return {}


# --- bytes (binary frames, `executor_proto`) ---


def _stream_id(rid: RequestId) -> int:
    if not isinstance(rid, int) or isinstance(rid, bool) or rid < 1:
        raise _fail("bad_request", "a request that opens a stream needs an int id")
    return rid


def fs_read(req: Message, conn: Connection, rid: RequestId) -> Message:
    """Open `path` and reply `{size}` at once; its bytes follow on stream `rid`, then its end.

    At most the size at open (and at most `max` bytes) go out, in frames of at most `chunk` bytes.
    """
    from executor_core import Task

    sid = _stream_id(rid)
    rel = rel_arg(req, allow_root=False)
    limit = arg(req, "max", int, None)
    chunk = min(max(arg(req, "chunk", int, proto.FRAME_MAX), 1), proto.FRAME_MAX)
    fd = open_regular(rel)
    size = os.fstat(fd).st_size
    conn.accept_stream(sid)
    Task(
        None,
        None,
        "fs_send",
        _send(conn, sid, fd, size if limit is None else min(size, max(limit, 0)), chunk),
    )
    return {"size": size}


def _send(conn: Connection, sid: int, fd: int, remaining: int, chunk: int) -> Steps:
    try:
        while remaining > 0:
            if conn.credit_left(sid) <= 0:
                yield (lambda: conn.credit_left(sid) > 0 or sid not in conn.streams or not conn.open), None
                if sid not in conn.streams or not conn.open:
                    return {}
            data = os.read(fd, min(remaining, chunk, conn.credit_left(sid)))
            if not data:
                break
            remaining -= len(data)
            conn.send_frame(sid, data)
            if len(conn.outbuf) > BACKLOG:  # the socket is full: wait for it before reading more
                yield (lambda: len(conn.outbuf) <= BACKLOG or not conn.open), None
        conn.end_stream(sid)
        conn.drop_stream(sid)
    except OSError:
        conn.reset_stream(sid)
    finally:
        os.close(fd)
    return {}


class AtomicFile:
    """A temp file beside `rel`; `commit()` renames it over the target, `abort()` removes it."""

    def __init__(self, rel: Rel) -> None:
        import secrets

        self.rel, self.size = rel, 0
        self.tmp = f".crogia-{secrets.token_hex(8)}.tmp"
        self.dir_fd = open_dir(rel.parent, create=True)
        self.fd = -1
        try:
            mode = self._target_mode()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                self.fd = os.open(self.tmp, flags, 0o600, dir_fd=self.dir_fd)
            except OSError as exc:
                raise os_error(exc, rel) from None
            own_like_parent(self.fd, self.dir_fd)
            os.fchmod(self.fd, mode)
        except BaseException:
            self.abort()
            raise

    def _target_mode(self) -> int:
        try:
            mode = os.stat(self.rel.name, dir_fd=self.dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return NEW_FILE_MODE
        except OSError as exc:
            raise os_error(exc, self.rel) from None
        if not stat.S_ISREG(mode):
            raise kind_error(mode, self.rel, "file")
        return stat.S_IMODE(mode)

    def write(self, data: memoryview) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as exc:
            raise os_error(exc, self.rel) from None

    def commit(self) -> None:
        try:
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.rel.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.rel) from None
        os.close(self.dir_fd)
        self.dir_fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            try:  # noqa: SIM105 (contextlib is more to import)
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            os.close(self.dir_fd)
            self.dir_fd = -1


def fs_write(req: Message, conn: Connection, rid: RequestId) -> Steps:
    """Write the bytes of stream `rid` (up to its end) to `path`, atomically: reply `{size}`.

    More than `max` bytes, a reset, or a lost connection leaves nothing behind.
    """
    sid = _stream_id(rid)
    rel = rel_arg(req, allow_root=False)
    limit = arg(req, "max", int, 1 << 62)
    stream = conn.accept_stream(sid)
    target = AtomicFile(rel)
    try:
        while True:
            if not stream.buf and not stream.ended:
                cancelled = yield (
                    (lambda: bool(stream.buf) or stream.ended or stream.reset or not conn.open),
                    None,
                )
                if cancelled or stream.reset or not conn.open:
                    raise RequestError("cancelled", "request was cancelled")
            if stream.buf:
                n = len(stream.buf)
                if target.size + n > limit:
                    raise _fail("too_large", f"Upload is larger than the {limit}-byte limit.")
                with memoryview(stream.buf) as view:
                    target.write(view)
                del stream.buf[:]
                target.size += n
                conn.consumed(sid, n)
            elif stream.ended:
                break
        target.commit()
    except BaseException:
        target.abort()
        conn.drop_stream(sid)
        raise
    conn.drop_stream(sid)
    return {"size": target.size}


# --- search ---


def _locate_rg(env_path: str) -> str:
    for folder in env_path.split(":"):
        candidate = os.path.join(folder, "rg")
        if os.access(candidate, os.X_OK):
            return candidate
    raise _fail("unavailable", "Search is unavailable: ripgrep (rg) is not installed in the sandbox.")


def _open_target(rel: Rel, allow_file: bool) -> tuple[int, int | None]:
    """(folder fd to run in, file fd for stdin or None)."""
    if not rel.parts:
        return open_root(), None
    with Opened(rel.parent) as parent_fd:
        mode = lstat_at(parent_fd, rel).st_mode
        if stat.S_ISDIR(mode):
            return open_subdir(parent_fd, rel), None
    if allow_file and stat.S_ISREG(mode):
        file_fd = open_regular(rel)
        try:
            return open_root(), file_fd
        except BaseException:
            os.close(file_fd)
            raise
    raise kind_error(mode, rel, "folder")


def fs_rg(req: Message, conn: Connection, rid: RequestId) -> Steps:
    """rg with the server's `args` in folder `path` (or on file `path` as stdin, if `file`).

    First chunk: `D` (a folder) or `F` (a file on stdin); then rg's output. Reply: rg's exit code
    and the end of its stderr.
    """
    import codecs

    from executor_procs import DEFAULT_PATH, Child, kill

    rel = rel_arg(req)
    args = arg(req, "args", list)
    if len(args) > 256 or not all(isinstance(a, str) and "\x00" not in a for a in args):
        raise _fail("bad_request", "argument 'args' must be a list of strings")
    cwd_fd, stdin_fd = _open_target(rel, arg(req, "file", bool, False))
    rg = _locate_rg((os.environ.get("PATH") or DEFAULT_PATH) + ":" + TOOLS)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    stdin = (os.POSIX_SPAWN_DUP2, stdin_fd, 0) if stdin_fd is not None else (
        os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)  # fmt: skip
    actions = [stdin, (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    # Ignore files above the workspace never count (as on the host); a subfolder's parents do, up to
    # the workspace's (and past it, only the sandbox's own `/`: its user's files).
    argv = ["rg", *(() if rel.parts else ("--no-ignore-parent",)), *args, "." if stdin_fd is None else "-"]
    env = {"PATH": DEFAULT_PATH, "LC_ALL": "C.UTF-8"}
    try:
        os.chdir(cwd_fd)  # posix_spawn takes no cwd: lend it ours for the call (fchdir: no path)
        try:
            pid = os.posix_spawn(rg, argv, env, file_actions=actions, setsid=True,
                                 setsigdef=(signal.SIGPIPE,))  # fmt: skip
        finally:
            os.chdir("/")
    finally:
        for fd in (out_w, err_w, cwd_fd, stdin_fd):
            if fd is not None:
                os.close(fd)
    child = Child(pid)
    conn.send({"type": "chunk", "id": rid, "data": "D" if stdin_fd is None else "F"})
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    stderr = bytearray()
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    readable = [False]
    LOOP.watch(out_r, lambda _: readable.__setitem__(0, True))
    LOOP.watch(err_r, lambda _: readable.__setitem__(0, True))
    try:
        open_fds = {out_r, err_r}
        while open_fds:
            readable[0] = False
            for fd in list(open_fds):
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    LOOP.unwatch(fd)
                    open_fds.discard(fd)
                elif fd == out_r:
                    conn.send({"type": "chunk", "id": rid, "data": decoder.decode(data)})
                elif len(stderr) < 65536:
                    stderr += data
            if not open_fds:
                break
            if not conn.open:
                raise RequestError("cancelled", "request was cancelled")
            if len(conn.outbuf) > BACKLOG:
                LOOP.unwatch(out_r)  # let the server catch up before reading more
                if (yield (lambda: len(conn.outbuf) <= BACKLOG or not conn.open, None)):
                    raise RequestError("cancelled", "request was cancelled")
                LOOP.watch(out_r, lambda _: readable.__setitem__(0, True))
                continue
            if (yield (lambda: readable[0] or not conn.open, None)):
                raise RequestError("cancelled", "request was cancelled")
        tail = decoder.decode(b"", True)
        if tail:
            conn.send({"type": "chunk", "id": rid, "data": tail})
        while child.code is None:
            if (yield (lambda: child.code is not None, None)):
                raise RequestError("cancelled", "request was cancelled")
    finally:
        for fd in (out_r, err_r):
            LOOP.unwatch(fd)
            os.close(fd)
        if child.code is None:
            kill(pid, signal.SIGKILL)
    return {"exit_code": child.code, "stderr": stderr[-4000:].decode("utf-8", "replace")}


OPS: dict[str, Callable[[Message, Connection, RequestId], Message | Steps]] = {
    "fs_list": lambda req, conn, rid: fs_list(req),
    "fs_stat": lambda req, conn, rid: fs_stat(req),
    "fs_mkdir": lambda req, conn, rid: fs_mkdir(req),
    "fs_remove": lambda req, conn, rid: fs_remove(req),
    "fs_rename": lambda req, conn, rid: fs_rename(req),
    "fs_rg": fs_rg,
    "fs_read": fs_read,
    "fs_write": fs_write,
}
