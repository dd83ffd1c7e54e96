"""How a bubblewrap sandbox is launched unprivileged: its host uid, its folders, its seccomp filter.

The wrapper shell joins the sandbox's cgroups as root; then `setpriv` drops to the session's
host uid (no capabilities) and execs bwrap, which makes a user namespace where that uid is
root (`--unshare-user --uid 0 --gid 0`) and forbids nested ones (`--disable-userns`).

The folders holding every session's workspace and state folder are `root:<access gid> 0710`
(the access gid is the first of SANDBOX_UID_RANGE, never given to a session): host users
cannot enter them, while bwrap, running with that one supplementary group, can reach its own
session's folders by name to bind them (bwrap resolves `--bind-fd` sources by path, so
handing it fds does not get past a folder it cannot search). The seccomp program (see
`seccomp.py`) travels in a memfd (`--seccomp FD`).

Without root, or where unprivileged user namespaces are off, sandboxes run as before (uid 0
without capabilities, in the host's user namespace) and a start-up warning says so.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from crogia.errors import SandboxError
from crogia.sandbox.seccomp import program_fd
from crogia.sandbox.userns import UidAllocator, give_tree

SETPRIV = "/usr/bin/setpriv"
PARENT_MODE = 0o710


@dataclass
class Launch:
    """One start's privilege settings and the fds that must reach bwrap (closed by `close`)."""

    uid: int | None = None
    group: int | None = None
    """The access gid (supplementary) that lets bwrap through the 0710 parent folders."""
    seccomp: int | None = None
    open_fds: list[int] = field(default_factory=list)

    def prefix(self) -> list[str]:
        """The command put in front of bwrap: setpriv to the session's uid, when there is one."""
        if self.uid is None:
            return []
        ids = [f"--reuid={self.uid}", f"--regid={self.uid}", f"--groups={self.group}"]
        return [SETPRIV, *ids, "--inh-caps=-all", "--bounding-set=-all", "--"]

    def bwrap_options(self) -> list[str]:
        """bwrap options for the user namespace and the seccomp filter."""
        args = []
        if self.uid is not None:
            args += ["--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns"]
        if self.seccomp is not None:
            args += ["--seccomp", str(self.seccomp)]
        return args

    def close(self) -> None:
        for fd in self.open_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.open_fds.clear()


def prepare(session_id: str, workspace: Path, uids: UidAllocator | None, program: bytes | None) -> Launch:
    """Claim the session's uid, give it its folders, open the fds (blocking: run in a thread)."""
    launch = Launch()
    try:
        if program is not None:
            launch.seccomp = program_fd(program)
            launch.open_fds.append(launch.seccomp)
        if uids is not None:
            launch.uid, launch.group = uids.claim(session_id, workspace), uids.access_gid
            # Only the workspace is bound (the state folder is the server's: `make_dirs`).
            guard_parent(workspace.parent, uids.access_gid)
            open_path_to(workspace.parent.parent, uids.access_gid)
            give_tree(workspace, launch.uid)
        elif os.geteuid() == 0:
            # Run as host root again (SANDBOX_UID_RANGE emptied): without capabilities, root can
            # write only what it owns, so folders a sandbox uid had come back.
            give_tree(workspace, 0)
    except BaseException:
        launch.close()
        raise
    return launch


def guard_parent(folder: Path, gid: int) -> None:
    """`folder` (holding every session's folders) becomes root:gid 0710: closed to host users."""
    info = os.stat(folder)
    if info.st_uid != 0 or info.st_gid != gid:
        os.chown(folder, 0, gid)
    if info.st_mode & 0o7777 != PARENT_MODE:
        os.chmod(folder, PARENT_MODE)


def open_path_to(folder: Path, gid: int) -> None:
    """Make sure holders of `gid` can search down to `folder` (the data folder), or say why not.

    The data folder itself, when closed to them, gets `gid` as its group with search only
    (g=x): host users stay out. Its ancestors are the administrator's: they are only checked.
    """
    info = os.stat(folder)
    if not _searchable(info, gid):
        os.chown(folder, -1, gid)
        os.chmod(folder, (info.st_mode & 0o7707) | 0o010)
    for parent in folder.resolve().parents:
        if not _searchable(os.stat(parent), gid):
            raise SandboxError(
                f"sandbox uids cannot reach the data folder: {parent} is not searchable by others "
                "(chmod o+x it, move DATA_DIR, or set SANDBOX_UID_RANGE= to run sandboxes as host root)",
                folder=str(parent),
            )


def closed_ancestor(folder: Path) -> Path | None:
    """The first folder above `folder` that other users cannot search (None: every one can; blocking)."""
    for parent in folder.resolve().parents:
        if not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def _searchable(info: os.stat_result, gid: int) -> bool:
    return bool(info.st_mode & 0o001) or (info.st_gid == gid and bool(info.st_mode & 0o010))
