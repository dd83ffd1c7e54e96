"""Memory, pids and CPU limits for local sandboxes through the host's cgroups (v1 or v2).

bubblewrap has no resource controls of its own. Where the cgroup filesystem is writable, each
sandbox gets its own cgroup nested under the server's own one (so the server's own limits
still bound it). The functions here do blocking file I/O on the cgroup filesystem: call them
from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from crogia.sandbox.base import Limits

log = logging.getLogger(__name__)

GROUP_PREFIX = "crogia-"
"""Sandbox cgroups live in `crogia-<scope>` under the server's own cgroup. The scope keeps
servers sharing a host (and a cgroup) from ever seeing, or cleaning up, each other's."""
_V1_CONTROLLERS = ("memory", "pids", "cpu")
_CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class Cgroup:
    """One sandbox's cgroup: a folder per v1 controller hierarchy, or one v2 folder."""

    dirs: list[Path]
    enforced: frozenset[str] = field(default_factory=frozenset)
    """Which of `memory`, `pids`, `cpu` are limited."""

    @property
    def procs_files(self) -> list[Path]:
        """Write a pid to each of these to move that process (and its future children) inside."""
        return [d / "cgroup.procs" for d in self.dirs]

    def pids(self) -> set[int]:
        """Host pids of the processes currently inside."""
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in procs.read_text().split())
        return found

    def remove(self) -> bool:
        """Delete the folders; False while a process is still inside one of them."""
        gone = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fs type, super options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) >= 5 and len(rparts) >= 3 and rparts[0] in ("cgroup", "cgroup2"):
            found.append((parts[3], parts[4], rparts[0], set(rparts[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller name (`""` for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _under(mount_root: str, mount_point: str, own: str) -> Path:
    rel = own[len(mount_root) :] if own.startswith(mount_root) and mount_root != "/" else own
    return Path(mount_point) / rel.lstrip("/")


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
    except OSError as exc:
        log.debug("cannot write %s to %s: %s", value, path, exc)
        return False
    return True


def _v1_group(scope: str, name: str, limits: Limits) -> Cgroup | None:
    own = _own_paths()
    dirs: list[Path] = []
    enforced: set[str] = set()
    for root, point, kind, options in _mounts():
        for ctrl in _V1_CONTROLLERS:
            if kind != "cgroup" or ctrl not in options or ctrl not in own:
                continue
            d = _under(root, point, own[ctrl]) / (GROUP_PREFIX + scope) / name
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if d not in dirs:  # co-mounted controllers share one folder
                dirs.append(d)
            if _apply_v1(d, ctrl, limits):
                enforced.add(ctrl)
    return _keep_if_enforced(dirs, enforced)


def _apply_v1(d: Path, ctrl: str, limits: Limits) -> bool:
    if ctrl == "memory":
        limit = str(limits.memory_mb * 1024 * 1024)
        ok = _write(d / "memory.limit_in_bytes", limit)
        if (d / "memory.memsw.limit_in_bytes").exists():  # or swap would let it grow past the limit
            _write(d / "memory.memsw.limit_in_bytes", limit)
        return ok
    if ctrl == "pids":
        return _write(d / "pids.max", str(limits.pids))
    return _write(d / "cpu.cfs_period_us", str(_CFS_PERIOD_US)) and _write(
        d / "cpu.cfs_quota_us", str(int(limits.cpus * _CFS_PERIOD_US))
    )


def _v2_group(scope: str, name: str, limits: Limits) -> Cgroup | None:
    own = _own_paths().get("")
    mount = next(((r, p) for r, p, kind, _ in _mounts() if kind == "cgroup2"), None)
    if own is None or mount is None:
        return None
    parent = _under(mount[0], mount[1], own) / (GROUP_PREFIX + scope)
    try:
        parent.mkdir(exist_ok=True)
    except OSError:
        return None
    # The server's own cgroup holds processes, so only the new `crogia-*` level can delegate.
    wanted = set((parent / "cgroup.controllers").read_text().split()) & {"memory", "pids", "cpu"}
    _write(parent.parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
    _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
    d = parent / name
    try:
        d.mkdir(exist_ok=True)
    except OSError:
        return None
    enforced = set()
    if _write(d / "memory.max", str(limits.memory_mb * 1024 * 1024)):
        enforced.add("memory")
        _write(d / "memory.swap.max", "0")
    if _write(d / "pids.max", str(limits.pids)):
        enforced.add("pids")
    if _write(d / "cpu.max", f"{int(limits.cpus * _CFS_PERIOD_US)} {_CFS_PERIOD_US}"):
        enforced.add("cpu")
    return _keep_if_enforced([d], enforced)


def _keep_if_enforced(dirs: list[Path], enforced: set[str]) -> Cgroup | None:
    group = Cgroup(dirs, frozenset(enforced))
    if enforced:
        return group
    group.remove()
    return None


def create_cgroup(scope: str, name: str, limits: Limits) -> Cgroup | None:
    """Create (or reuse) the cgroup `name` with `limits`; None when cgroups are not usable here."""
    if not os.path.isdir("/sys/fs/cgroup"):
        return None
    try:
        own = _own_paths()
        v1 = any(ctrl in own for ctrl in _V1_CONTROLLERS)
        return _v1_group(scope, name, limits) if v1 else _v2_group(scope, name, limits)
    except OSError as exc:
        log.debug("cgroups unusable: %s", exc)
        return None


def find_cgroup(scope: str, name: str) -> Cgroup | None:
    """The existing cgroup `name` (for example left by a crashed server), without touching limits."""
    dirs = [d for d in _candidate_dirs(scope, name) if d.is_dir()]
    return Cgroup(dirs) if dirs else None


def leftover_names(scope: str) -> set[str]:
    """Names of the sandbox cgroups in `scope`."""
    names: set[str] = set()
    for parent in {d.parent for d in _candidate_dirs(scope, "x")}:
        with contextlib.suppress(OSError):
            names.update(p.name for p in parent.iterdir() if p.is_dir())
    return names


def _candidate_dirs(scope: str, name: str) -> list[Path]:
    try:
        own, mounts = _own_paths(), _mounts()
    except OSError:
        return []
    dirs = []
    for root, point, kind, options in mounts:
        ctrls = [c for c in _V1_CONTROLLERS if c in options] if kind == "cgroup" else [""]
        dirs += [_under(root, point, own[c]) / (GROUP_PREFIX + scope) / name for c in ctrls if c in own]
    return dirs


def remove_scope(scope: str) -> None:
    """Delete the scope's folders if no sandbox cgroup is left in them."""
    for parent in {d.parent for d in _candidate_dirs(scope, "x")}:
        with contextlib.suppress(OSError):
            parent.rmdir()
