"""Per-session host uids for bubblewrap sandboxes (SANDBOX_UID_RANGE).

A bubblewrap sandbox runs in its own user namespace where its root (uid 0) is one
unprivileged host uid, its session's own: whatever the sandbox makes (a setuid binary, a
file it owns) gives a host user at most that uid, and two sandboxes cannot touch each
other's processes or files. The uid is chosen when the sandbox first starts and recorded as
the owner of its workspace folder, so a restarted sandbox (or server) gets the same one back,
and it is never given to another session while that workspace exists.

The functions here stat and chown on the host file system: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UidRange:
    """An inclusive range of host uids (and the same gids) for sandboxes."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """`"700000000-700065535"`; raises ValueError on anything else."""
        first, sep, last = text.strip().partition("-")
        if not sep or not first.isdigit() or not last.isdigit():
            raise ValueError(f"a uid range is FIRST-LAST, not {text!r}")
        span = cls(int(first), int(last))
        if not 0 < span.first < span.last < 2**32 - 1:
            raise ValueError(f"uid range {text!r} must lie within 1-4294967294, first < last")
        return span

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    @property
    def size(self) -> int:
        return self.last - self.first + 1


class UidAllocator:
    """Hands each session a uid of `span` that no other known workspace owns.

    The first uid of the span is never handed out: it is the access gid of the folders
    holding the sessions' folders (see `bwrap_priv`).
    """

    def __init__(self, span: UidRange) -> None:
        self.span = span
        self._owner: dict[int, str] = {}  # uid -> the workspace folder (session) holding it
        self._scanned: set[Path] = set()
        self._lock = threading.Lock()

    def claim(self, session_id: str, workspace: Path) -> int:
        """The session's uid: its workspace's owner when that is ours to give, else a free one."""
        with self._lock:
            self._scan(workspace.parent)
            for uid, holder in self._owner.items():
                if holder == session_id:
                    return uid
            with contextlib.suppress(OSError):
                owner = os.stat(workspace).st_uid
                if owner in self.span and owner != self.access_gid and owner not in self._owner:
                    self._owner[owner] = session_id
                    return owner
            return self._pick(session_id)

    @property
    def access_gid(self) -> int:
        return self.span.first

    def release(self, session_id: str) -> None:
        """Forget the session's uid (its workspace is gone)."""
        with self._lock:
            for uid in [u for u, holder in self._owner.items() if holder == session_id]:
                del self._owner[uid]

    def _pick(self, session_id: str) -> int:
        size = self.span.size - 1
        if len(self._owner) >= size:
            raise RuntimeError("SANDBOX_UID_RANGE has no free uid left")
        # Start from a hash of the id, so uids stay spread out and a search rarely probes far.
        start = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") % size
        for step in range(size):
            uid = self.span.first + 1 + (start + step) % size
            if uid not in self._owner:
                self._owner[uid] = session_id
                return uid
        raise RuntimeError("SANDBOX_UID_RANGE has no free uid left")  # pragma: no cover

    def _scan(self, folder: Path) -> None:
        """Record the uids the workspaces in `folder` already own (once per folder)."""
        if folder in self._scanned:
            return
        self._scanned.add(folder)
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    uid = entry.stat(follow_symlinks=False).st_uid
                    if uid in self.span:
                        self._owner.setdefault(uid, entry.name)


def give_tree(root: Path, uid: int, gid: int | None = None) -> None:
    """Make `root` and everything under it belong to `uid:gid` (gid: `uid`), never following a symlink.

    Cheap when nothing changes: only a tree whose top is not yet `uid`'s is walked (a workspace
    made before SANDBOX_UID_RANGE applied, or one that was another uid's).
    """
    gid = uid if gid is None else gid
    top = os.lstat(root)
    if top.st_uid == uid and top.st_gid == gid:
        return
    os.chown(root, uid, gid, follow_symlinks=False)
    for _, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
