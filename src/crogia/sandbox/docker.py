"""Docker backend: one container per session, with the executor daemon as its main process.

The container runs `daemon_command()` under Docker's init (tini), which reaps orphans and
forwards SIGTERM, so a stop takes milliseconds instead of the 10 s grace. Commands never go
through `docker exec`: the daemon dials the server's socket in the state folder, which the
container sees read-only at `/run/crogia-channel` (`ListenerChannel`); or, with
SANDBOX_TRANSPORT=tcp, it listens on its own address and the server dials it (`TcpChannel`), its
code and secret copied in rather than bound. Its process logs live on a size-limited tmpfs at
`/run/crogia`. DOCKER_WORKSPACE=volume puts the workspace in a Docker volume instead of a host
folder.
All engine calls go through aiodocker, so nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import tarfile
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiodocker
import aiohttp
from aiodocker.volumes import DockerVolume

from crogia.errors import SandboxError, Unavailable
from crogia.sandbox.base import (
    CHANNEL_MOUNT,
    STATE_MOUNT,
    WORKDIR,
    HostPaths,
    HostStorage,
    SandboxProvider,
    SandboxSpec,
    SandboxStatus,
    close_to_others,
)
from crogia.sandbox.channel import SECRET_NAME, SOCKET_NAME, Channel
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.docker_network import DockerNetwork, tag_of
from crogia.sandbox.egress import BlockedReporter, DnsGate, EgressPolicy
from crogia.sandbox.executor import DAEMON_DIR, DAEMON_MOUNT, ExecutorSandbox, daemon_command, log_max
from crogia.sandbox.listener import ListenerChannel
from crogia.sandbox.netns import DOCKER_TABLE, EgressFence
from crogia.sandbox.network import DAEMON_PORT, RESOLV_CONF, host_resolvers, mode_of
from crogia.sandbox.seccomp import docker_profile
from crogia.sandbox.tcp_channel import Address, TcpChannel
from crogia.sandbox.userns import give_tree

log = logging.getLogger(__name__)

Transport = Literal["unix", "tcp"]
MANAGED_LABEL = "crogia.managed-by"
SESSION_LABEL = "crogia.session"
PROTOCOL_LABEL = "crogia.protocol"
"""The executor protocol its daemon was started for: a container of another one is re-created."""
TRANSPORT_LABEL = "crogia.transport"
"""`<transport>/<bind|volume>` its channel and workspace were made for: another is re-created."""
SECRET_DIR = "etc/crogia"
SECRET_PATH = f"/{SECRET_DIR}/secret"
"""Under SANDBOX_TRANSPORT=tcp: the channel's secret inside the container (copied in, mode 0400)."""
TCP_SECRET_NAME = "tcp-secret"
"""The server's copy of it, in the sandbox's state folder (never mounted under tcp)."""
TLS_CERT_PATH, TLS_KEY_PATH = f"/{SECRET_DIR}/tls-cert.pem", f"/{SECRET_DIR}/tls-key.pem"
"""Under SANDBOX_TCP_TLS: the daemon's certificate and key (copied in beside the secret, 0400)."""
TCP_CERT_NAME = "tcp-cert.pem"
"""The server's copy of the certificate it pins (the key is not kept: only the daemon needs it)."""
INSTANCE_LABEL = "crogia.instance"
"""Which server (data folder) made the container: servers sharing an engine leave each other's alone."""
STOP_TIMEOUT = 3
"""Seconds between SIGTERM and SIGKILL; above the daemon's own 2 s grace for its processes."""
PING_TIMEOUT = 3.0
_API_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)
_DEFAULT_URL = "unix:///var/run/docker.sock"
_STATES: dict[str, SandboxStatus] = {
    "running": "running",
    "created": "exited",
    "exited": "exited",
    "removing": "missing",
}
"""Docker's `State.Status` -> ours; `paused`, `restarting` and `dead` can't serve commands: unknown."""


CAP_DROP = ("NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT")
"""Dropped from Docker's default set. Kept: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETUID, SETGID
and KILL, which package managers (apt drops to `_apt`, pip, chown) and everyday tools need."""


RESOLV_NAME = "resolv.conf"
"""In the state folder: an isolated container's /etc/resolv.conf (read-only), naming its gate."""


def container_config(
    spec: SandboxSpec,
    paths: HostPaths,
    instance: str | None = None,
    network: str = "",
    dns: str = "",
    *,
    seccomp: str | None = None,
    transport: Transport = "unix",
    volume: str = "",
    tls: bool = False,
) -> dict[str, Any]:
    """The Docker API body that creates `spec`'s container (isolated: on the network named `network`;
    `seccomp`: a profile's JSON, or the engine's default; `volume`: the workspace's Docker volume,
    else `paths.workspace` is bound).

    `tcp`: the daemon listens on `DAEMON_PORT` and nothing of the channel is on the host: its code
    and secret are copied in before the start (`put_archive`), not bound; `tls`: with the
    certificate and key it speaks TLS with."""
    limits = spec.limits
    memory = limits.memory_mb * 1024 * 1024
    labels = {**spec.labels, **_own_labels(instance), SESSION_LABEL: spec.session_id}
    if volume:
        volume_labels = {**_own_labels(instance), SESSION_LABEL: spec.session_id}
        mounts = [_volume(volume, WORKDIR, volume_labels)]
    else:
        mounts = [_bind(paths.workspace, WORKDIR, read_only=False)]
    if transport == "unix":
        mounts.append(_bind(paths.state_dir, CHANNEL_MOUNT, read_only=True))
        mounts.append(_bind(DAEMON_DIR, DAEMON_MOUNT, read_only=True))
        channel = [
            "--dial",
            f"{CHANNEL_MOUNT}/{SOCKET_NAME}",
            "--secret-file",
            f"{CHANNEL_MOUNT}/{SECRET_NAME}",
        ]
    else:
        channel = ["--listen", str(DAEMON_PORT), "--secret-file", SECRET_PATH]
        if tls:
            channel += ["--tls-cert", TLS_CERT_PATH, "--tls-key", TLS_KEY_PATH]
    if mode_of(limits.network) == "isolated":  # its resolver: the gate in its own namespace
        mounts.append(_bind(paths.state_dir / RESOLV_NAME, "/etc/resolv.conf", read_only=True))
    labels[TRANSPORT_LABEL] = f"{transport}{'+tls' if tls else ''}/{'volume' if volume else 'bind'}"
    return {
        "Image": spec.image,
        "Cmd": daemon_command([*channel, "--log-max", str(log_max(limits.state_mb))]),
        "WorkingDir": WORKDIR,
        "Env": [f"{key}={value}" for key, value in spec.env.items()],
        "Labels": {**labels, PROTOCOL_LABEL: str(proto.VERSION)},
        "StopTimeout": STOP_TIMEOUT,
        "HostConfig": {
            "Init": True,
            "Mounts": mounts,
            "Memory": memory,
            "MemorySwap": memory,  # equal to Memory: no swap on top, so the limit means what it says
            "NanoCpus": int(limits.cpus * 1e9),
            "PidsLimit": limits.pids,
            **_network_config(limits.network, network, dns),
            "SecurityOpt": ["no-new-privileges", *([f"seccomp={seccomp}"] if seccomp else [])],
            "CapDrop": list(CAP_DROP),
            "Tmpfs": _tmpfs(limits.tmp_mb, limits.state_mb),
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "1"}},
        },
    }


def _network_config(value: str, network: str, dns: str) -> dict[str, Any]:
    """HostConfig's network part: isolated on Crogia's own bridge (no IPv6), none, or as configured."""
    mode = mode_of(value)
    if mode != "isolated":
        return {"NetworkMode": "none" if mode == "none" else value}
    sysctls = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
    return {"NetworkMode": network, "Sysctls": sysctls, **({"Dns": [dns]} if dns else {})}


def _tmpfs(size_mb: int, state_mb: int) -> dict[str, str]:
    """Size-limited tmpfs (in the memory limit): /tmp and /var/tmp (if sized), and the state's."""
    state = {STATE_MOUNT: f"rw,noexec,nosuid,nodev,size={max(state_mb, 1)}m,mode=0755"}
    if size_mb <= 0:
        return state
    options = f"rw,exec,nosuid,nodev,size={size_mb}m,mode=1777"
    return {"/tmp": options, "/var/tmp": options, **state}


def _own_labels(instance: str | None) -> dict[str, str]:
    return {MANAGED_LABEL: "crogia", **({INSTANCE_LABEL: instance} if instance else {})}


def _bind(source: Path, target: str, *, read_only: bool) -> dict[str, Any]:
    # `Mounts` rather than `Binds`: a host path containing ':' stays unambiguous.
    return {"Type": "bind", "Source": str(source), "Target": target, "ReadOnly": read_only}


def _volume(name: str, target: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """A named volume (made with `labels` by the engine when missing), kept when the container goes."""
    return {"Type": "volume", "Source": name, "Target": target, "VolumeOptions": {"Labels": dict(labels)}}


def _archive(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    """A tar of `files` ({path: (content, mode)}, parents made 0755, owned by root) for put_archive."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        made: set[str] = set()
        for path, (data, mode) in files.items():
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folder = "/".join(parts[:depth])
                if folder not in made:
                    made.add(folder)
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode = tarfile.DIRTYPE, 0o700 if folder == SECRET_DIR else 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def daemon_files() -> dict[str, tuple[bytes, int]]:
    """The daemon's sources and bytecode as `_archive` takes them, under `DAEMON_MOUNT` (blocking)."""
    files = {}
    for path in sorted(DAEMON_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".pyc"):
            files[f"{DAEMON_MOUNT.strip('/')}/{path.relative_to(DAEMON_DIR)}"] = (path.read_bytes(), 0o444)
    return files


class _Engine:
    """The provider's aiodocker client plus the translation of its errors into Crogia's."""

    def __init__(self, url: str | None) -> None:
        self.docker = _client(url)
        # aiodocker keeps the address it was given only in a private field; it makes the message useful.
        self.url: str = getattr(self.docker, "_connection_info", None) or url or _DEFAULT_URL

    @contextlib.contextmanager
    def errors(self, image: str = "") -> Iterator[None]:
        """Turn engine failures into `Unavailable` (engine down, image missing) or `SandboxError`."""
        try:
            yield
        except aiodocker.DockerError as exc:
            if exc.status == 900:
                raise Unavailable(f"Docker engine is not reachable at {self.url}", url=self.url) from exc
            if image and exc.status == 404 and "image" in str(exc.message).lower():
                raise Unavailable(
                    f"the sandbox image {image} is missing: build it with `crogia image build` "
                    "(or `python -m crogia.sandbox.image`)",
                    image=image,
                ) from exc
            raise SandboxError(f"Docker engine error: {exc.message}", status=exc.status) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"Docker engine is not reachable at {self.url}", url=self.url) from exc

    async def inspect(self, container_id: str) -> dict[str, Any] | None:
        """The container's inspect document, or None when it does not exist."""
        try:
            with self.errors():
                return await self.docker.containers.container(container_id).show()
        except SandboxError as exc:
            if exc.context.get("status") == 404:
                return None
            raise

    async def remove(self, container_id: str) -> None:
        """Force-remove a container with its anonymous volumes, and return once it is gone; gone
        already is fine."""
        container = self.docker.containers.container(container_id)
        try:
            with self.errors():
                await container.delete(force=True, v=True)
            return
        except SandboxError as exc:
            if exc.context.get("status") == 404:
                return
            if exc.context.get("status") != 409:
                raise
        # 409: a removal is already under way (the engine undoes a create whose client went away
        # itself): wait for its end, so that "removed" means gone.
        try:
            with self.errors():
                await container.wait(condition="removed", timeout=_API_TIMEOUT)
        except SandboxError as exc:
            if exc.context.get("status") != 404:
                raise


def _client(url: str | None) -> aiodocker.Docker:
    try:
        return aiodocker.Docker(url=url, timeout=_API_TIMEOUT)
    except (ValueError, AssertionError):
        # No DOCKER_HOST and no socket found: aim at the default so the first call says so clearly.
        return aiodocker.Docker(url=_DEFAULT_URL, timeout=_API_TIMEOUT)


class DockerSandbox(ExecutorSandbox):
    """One session's container; commands go through its executor daemon."""

    backend = "docker"

    def __init__(
        self,
        spec: SandboxSpec,
        sandbox_id: str,
        paths: HostPaths,
        engine: _Engine,
        root: tuple[int, int] | None = None,
        *,
        upstream: str = "",
        on_blocked: Callable[[str], None] | None = None,
        transport: Transport = "unix",
        network: str = "",
        volume: str | None = None,
        tls: bool = False,
    ) -> None:
        """`root`: under userns-remap, the host uid and gid that container root is. `upstream`: the
        resolver its gate asks (isolated only; empty: the host's first). `network`: the Docker
        network whose address the server dials (tcp). `volume`: the workspace's Docker volume, if any.
        `tls`: the tcp channel speaks TLS, pinning the certificate made at each start."""
        self.volume = volume
        self._listener: ListenerChannel | None = None
        self._network = network
        self._secret = self._cert = ""
        self._tls = tls and transport == "tcp"
        channel: Channel
        if transport == "tcp":
            channel = TcpChannel(self._address, lambda: self._secret, lambda: self._cert)
        else:
            channel = self._listener = ListenerChannel(paths.state_dir)
            self._listener.peer_cgroup = sandbox_id
            self._listener.secret_owner = root
        super().__init__(spec, sandbox_id, paths, channel)
        self._engine = engine
        self._upstream = upstream
        self._blocked = BlockedReporter(on_blocked) if on_blocked is not None else None
        self._fence: EgressFence | None = None

    async def fence(self) -> None:
        """Isolated: load the container's own table, open its resolver and apply its policy, in its
        network namespace (every start makes a new one), before any command is sent to it."""
        await self._unfence()
        if mode_of(self.spec.limits.network) != "isolated":
            return
        pid = await self._pid()
        if pid <= 0:  # it has already exited: nothing runs in it to fence (its start then fails)
            return
        upstream = self._upstream or next(iter(await asyncio.to_thread(host_resolvers)), "")
        fence = EgressFence(f"/proc/{pid}/ns/net", DnsGate(upstream))
        if self._blocked is not None:
            fence.gate.on_blocked = self._blocked.blocked
        try:
            await fence.open(DOCKER_TABLE, self.spec.egress)
        except BaseException as exc:
            await fence.close()
            gone = not await asyncio.to_thread(os.path.exists, f"/proc/{pid}/ns/net")
            if isinstance(exc, (OSError, SandboxError)) and gone:
                return  # it exited meanwhile (its namespace went with it): the start fails as it would
            raise
        self._fence = fence

    async def _pid(self) -> int:
        """The host pid of the container's first process; 0 when it runs none."""
        state = await self._engine.inspect(self.id)
        if state is None or not state["State"].get("Running"):
            return 0
        return int(state["State"].get("Pid") or 0)

    async def _unfence(self) -> None:
        fence, self._fence = self._fence, None
        if fence is not None:
            await fence.close()

    async def set_egress(self, policy: EgressPolicy) -> None:
        await super().set_egress(policy)
        if self._fence is not None:
            await self._fence.set_policy(policy)

    async def close(self) -> None:
        await self._unfence()
        await super().close()

    @property
    def _container(self) -> aiodocker.containers.DockerContainer:
        return self._engine.docker.containers.container(self.id)

    async def _address(self) -> Address:
        """The container's address on its network, asked at each dial (a restart may change it)."""
        state = await self._engine.inspect(self.id)
        if state is None or not state["State"].get("Running"):
            raise Unavailable("the sandbox's container is not running", sandbox_id=self.id)
        networks = (state.get("NetworkSettings") or {}).get("Networks") or {}
        ours: dict[str, Any] = networks.get(self._network) or next(iter(networks.values()), {})
        address = str(ours.get("IPAddress") or "")
        if not address:
            raise Unavailable("the sandbox's container has no address to reach it at", sandbox_id=self.id)
        return address, DAEMON_PORT

    async def connect(self, within: float | None = None) -> None:
        if self._listener is None and not self._secret:  # attached after a restart: the secret we gave
            self._secret = await asyncio.to_thread(_read_secret, self.paths.state_dir)
            if self._tls:
                self._cert = await asyncio.to_thread(_read_secret, self.paths.state_dir, TCP_CERT_NAME)
            if self._tls and not self._cert:  # never fall back to plain TCP
                raise Unavailable("the sandbox's TLS certificate is gone", sandbox_id=self.id)
        await super().connect(within)

    async def _give_secret(self) -> None:
        """A new channel secret, into the stopped container (before its daemon reads it) and ours."""
        secret = secrets.token_urlsafe(32)
        files = {f"{SECRET_DIR}/secret": (secret.encode(), 0o400)}
        cert = ""
        if self._tls:  # and a new certificate: a key that leaked from an earlier run opens nothing
            cert, key = await self_signed()
            files[TLS_CERT_PATH[1:]] = (cert.encode(), 0o400)
            files[TLS_KEY_PATH[1:]] = (key, 0o400)
        with self._engine.errors():
            await self._container.put_archive("/", _archive(files))  # type: ignore[no-untyped-call]
        await asyncio.to_thread(_write_secret, self.paths.state_dir, secret)
        if cert:
            await asyncio.to_thread(_write_secret, self.paths.state_dir, cert, TCP_CERT_NAME)
        self._secret, self._cert = secret, cert

    async def _start(self) -> None:
        if self._listener is not None:
            await self._listener.listen()  # before the daemon's first dial, which then costs no wait
        elif not await self._pid():  # stopped: nothing in it can race the copy
            await self._give_secret()
        with self._engine.errors(self.spec.image):
            await self._container.start()  # a running container answers 304: nothing to do
        await self.fence()

    async def _stop(self) -> None:
        state = await self._engine.inspect(self.id)
        if state is not None and state["State"]["Running"]:
            with self._engine.errors():
                await self._container.stop(t=STOP_TIMEOUT)
        await self._unfence()

    async def _destroy(self) -> None:
        await self._unfence()
        await self._engine.remove(self.id)

    async def _status(self) -> SandboxStatus:
        try:
            state = await self._engine.inspect(self.id)
        except (Unavailable, SandboxError):
            return "unknown"
        if state is None:
            return "missing"
        return _STATES.get(str(state["State"]["Status"]), "unknown")


class DockerProvider(SandboxProvider):
    """Sandboxes as Docker containers, labelled `crogia.managed-by=crogia` for clean-up."""

    name = "docker"
    egress_policies = True

    def __init__(
        self,
        *,
        url: str | None = None,
        instance: str | None = None,
        dns: str = "",
        transport: Transport = "unix",
        workspace: Literal["bind", "volume"] = "bind",
        storage: HostStorage | None = None,
        tls: bool = False,
    ) -> None:
        """`url`: the engine (`unix://`, `tcp://`); default: the Docker context, DOCKER_HOST, the socket.

        `instance` labels every container this provider makes, and `managed_ids` then lists only
        those: without it, every Crogia container on the engine counts as this provider's. `dns`:
        the resolver isolated containers use (default: the engine's choice, from the host's).
        `transport` (SANDBOX_TRANSPORT), `tls` (SANDBOX_TCP_TLS) and `workspace` (DOCKER_WORKSPACE):
        see `container_config`. `storage`: where the sandboxes' host folders go (state folders, bound
        workspaces).
        """
        self.storage = storage
        self._url = url
        self._instance = instance
        self._dns = dns
        self.transport: Transport = transport
        self.tls = tls and transport == "tcp"
        self.workspace = workspace
        self._daemon_tar: bytes | None = None
        self._engine_obj: _Engine | None = None
        self._network_obj: DockerNetwork | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._security: EngineSecurity | None = None

    @property
    def _network(self) -> DockerNetwork:
        if self._network_obj is None:
            self._network_obj = DockerNetwork(
                self._engine.docker, self._instance, _own_labels(self._instance)
            )
        return self._network_obj

    async def _ensure_network(self, spec: SandboxSpec) -> None:
        if mode_of(spec.limits.network) == "isolated":
            with self._engine.errors():
                await self._network.ensure()

    async def security(self) -> EngineSecurity:
        """What the engine enforces (user namespaces, its seccomp default), asked once."""
        if self._security is None:
            with self._engine.errors():
                info = await self._engine.docker.system.info()
            self._security = EngineSecurity.from_info(info)
        return self._security

    async def userns_mode(self) -> str:
        try:
            return (await self.security()).userns
        except (Unavailable, SandboxError):
            return "unknown"

    async def seccomp_mode(self) -> str:
        try:
            return (await self.security()).seccomp
        except (Unavailable, SandboxError):
            return "unknown"

    @property
    def _engine(self) -> _Engine:
        # Built on first use, inside the running loop (aiohttp sessions belong to a loop).
        if self._engine_obj is None:
            self._engine_obj = _Engine(self._url)
        return self._engine_obj

    @property
    def url(self) -> str:
        """The engine's address, for messages and logs."""
        return self._engine.url

    async def has_image(self, image: str) -> bool:
        """True when the engine holds `image` (`Unavailable` when the engine is down)."""
        try:
            with self._engine.errors():
                await self._engine.docker.images.inspect(image)
        except SandboxError as exc:
            if exc.context.get("status") == 404:
                return False
            raise
        return True

    async def available(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await self._engine.docker.version()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError):
            return False
        return True

    def volume_name(self, session_id: str) -> str:
        """The Docker volume holding the session's workspace (DOCKER_WORKSPACE=volume)."""
        return f"crogia-ws-{tag_of(self._instance)}-{session_id}"

    def workdir(self, session_id: str) -> str:
        return self.volume_name(session_id) if self.workspace == "volume" else ""

    async def remove_workspace(self, session_id: str) -> None:
        if self.workspace != "volume":
            return await super().remove_workspace(session_id)
        try:
            with self._engine.errors():
                volume = DockerVolume(self._engine.docker, self.volume_name(session_id))  # type: ignore[no-untyped-call]
                await volume.delete()  # type: ignore[no-untyped-call]
        except SandboxError as exc:
            if exc.context.get("status") != 404:
                raise

    async def sweep_workspaces(self, sessions: Collection[str], *, keep: bool = False) -> None:
        """The host folders' sweep, then (volume workspaces, unless `keep`) this instance's workspace
        volumes whose session is gone (a crash between a volume's making and its session's row, or
        between the row's deletion and the volume's); a volume a container still uses is left
        (Docker refuses: it is not ours to judge)."""
        await super().sweep_workspaces(sessions, keep=keep)
        if keep or self.workspace != "volume":
            return
        if not self._instance:  # without an instance, other servers' volumes would look like ours
            return
        labels = [f"{key}={value}" for key, value in _own_labels(self._instance).items()]
        with self._engine.errors():
            listed = await self._engine.docker.volumes.list(filters={"label": labels})  # type: ignore[no-untyped-call]
        prefix = self.volume_name("")
        for volume in listed.get("Volumes") or []:
            name, session_id = str(volume.get("Name", "")), (volume.get("Labels") or {}).get(SESSION_LABEL)
            ours = name.startswith(prefix) and name == self.volume_name(str(session_id))
            if not ours or session_id in sessions:
                continue
            log.info("removing leftover workspace volume %s", name)
            try:
                with self._engine.errors():
                    await DockerVolume(self._engine.docker, name).delete()  # type: ignore[no-untyped-call]
            except SandboxError as exc:
                if exc.context.get("status") not in (404, 409):  # gone, or in use
                    raise

    async def create(self, spec: SandboxSpec) -> DockerSandbox:
        if self.transport == "tcp" and mode_of(spec.limits.network) not in ("isolated", "shared"):
            raise SandboxError(
                "SANDBOX_TRANSPORT=tcp needs a network the server reaches (SANDBOX_NETWORK=isolated)"
            )
        if self.transport == "tcp" and spec.limits.network == "host":
            raise SandboxError("SANDBOX_TRANSPORT=tcp cannot share the host's network (SANDBOX_NETWORK=host)")
        security = await self.security()
        paths = await self.prepare(spec.session_id)  # folders, and the workspace's disk if any
        await asyncio.to_thread(_prepare_dirs, paths, security.root, self.workspace == "bind")
        await self._ensure_network(spec)
        creating = asyncio.ensure_future(self._create_container(spec, security.profile))
        try:
            container = await asyncio.shield(creating)
        except BaseException:
            # Cancelled while the engine makes it (or it failed): let the engine's answer come, then
            # remove what it made. Cancelling the request instead would leave the engine making a
            # container after any look for it.
            await asyncio.shield(self._own(self._undo_create(creating, spec.session_id)))
            raise
        sandbox = self._sandbox(spec, container.id, security.root)
        try:
            if self.transport == "tcp":  # nothing of the channel is on the host: its code is copied in
                if self._daemon_tar is None:
                    self._daemon_tar = await asyncio.to_thread(lambda: _archive(daemon_files()))
                with self._engine.errors():
                    await container.put_archive("/", self._daemon_tar)  # type: ignore[no-untyped-call]
            await sandbox.start()
        except BaseException:
            # Never leave a half-made container behind, whatever stopped us (even cancellation, twice).
            await asyncio.shield(self._own(self._discard(sandbox)))
            raise
        return sandbox

    def _own(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run clean-up work as a task the provider holds until it ends (`close` waits for it)."""
        task = asyncio.create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _discard(self, sandbox: DockerSandbox) -> None:
        try:
            await sandbox.close()
        finally:
            await self._engine.remove(sandbox.id)

    async def _undo_create(
        self, creating: asyncio.Future[aiodocker.containers.DockerContainer], session_id: str
    ) -> None:
        try:
            container = await creating
        except BaseException:  # it failed: the engine may still have made it, so look by labels
            await self._remove_unanswered(session_id)
            return
        try:
            await self._engine.remove(container.id)
        except SandboxError as exc:
            log.warning("could not remove a half-made container of session %s: %s", session_id, exc)

    async def _remove_unanswered(self, session_id: str) -> None:
        """Remove this instance's containers of `session_id` (a create whose answer never came)."""
        labels = [f"{k}={v}" for k, v in {**_own_labels(self._instance), SESSION_LABEL: session_id}.items()]
        try:
            with self._engine.errors():
                found = await self._engine.docker.containers.list(
                    all=True, filters=json.dumps({"label": labels})
                )
            for container in found:
                await self._engine.remove(container.id)
        except SandboxError as exc:
            log.warning("could not remove a half-made container of session %s: %s", session_id, exc)

    async def _create_container(
        self, spec: SandboxSpec, seccomp: str | None
    ) -> aiodocker.containers.DockerContainer:
        volume = self.volume_name(spec.session_id) if self.workspace == "volume" else ""
        config = container_config(
            spec, self.paths(spec.session_id), self._instance, self._network.name, self._dns,
            seccomp=seccomp, transport=self.transport, volume=volume, tls=self.tls,
        )  # fmt: skip
        try:
            with self._engine.errors(spec.image):
                return await self._engine.docker.containers.create(config)
        except SandboxError as exc:
            # Another provider without an instance shares the network and removed it on close: remake it.
            if exc.context.get("status") != 404 or mode_of(spec.limits.network) != "isolated":
                raise
        self._network.forget()
        await self._ensure_network(spec)
        with self._engine.errors(spec.image):
            return await self._engine.docker.containers.create(config)

    async def attach(self, spec: SandboxSpec, sandbox_id: str) -> DockerSandbox:
        state = await self._engine.inspect(sandbox_id)
        labels = (state or {}).get("Config", {}).get("Labels") or {}
        status = _STATES.get(str((state or {}).get("State", {}).get("Status")), "unknown")
        if state is None or labels.get(SESSION_LABEL) != spec.session_id or status == "missing":
            return await self.create(spec)
        # Dead, stuck, or made for another protocol (an older server's, whose daemon would listen
        # in a folder the sandbox could write): its workspace is all that matters, so start afresh.
        made_for = f"{self.transport}{'+tls' if self.tls else ''}/{self.workspace}"
        if (
            status == "unknown"
            or labels.get(PROTOCOL_LABEL) != str(proto.VERSION)
            or (labels.get(TRANSPORT_LABEL, "unix/bind") != made_for)
        ):
            await self._engine.remove(sandbox_id)
            return await self.create(spec)
        sandbox = self._sandbox(spec, sandbox_id, (await self.security()).root)
        await self._ensure_network(spec)  # a restarted server fences its survivors before they run again
        if status != "running":
            await asyncio.to_thread(_write_resolv, self.paths(spec.session_id))
            await sandbox.start()
            return sandbox
        try:
            await sandbox.fence()
            await sandbox.connect()
        except Unavailable:  # the container runs but its daemon is gone: restart it
            await sandbox.stop()
            await sandbox.start()
        return sandbox

    def _sandbox(self, spec: SandboxSpec, sandbox_id: str, root: tuple[int, int] | None) -> DockerSandbox:
        def report(destination: str) -> None:
            if self.egress_listener is not None:
                self.egress_listener(spec.session_id, destination)

        network = self._network.name if mode_of(spec.limits.network) == "isolated" else spec.limits.network
        return DockerSandbox(
            spec, sandbox_id, self.paths(spec.session_id), self._engine, root,
            upstream=self._dns, on_blocked=report, transport=self.transport, network=network,
            volume=self.volume_name(spec.session_id) if self.workspace == "volume" else None,
            tls=self.tls,
        )  # fmt: skip

    async def managed_ids(self) -> list[str]:
        labels = [f"{key}={value}" for key, value in _own_labels(self._instance).items()]
        filters = json.dumps({"label": labels})  # several label filters: all must match
        with self._engine.errors():
            containers = await self._engine.docker.containers.list(all=True, filters=filters)
        return [str(container.id) for container in containers]

    async def remove(self, sandbox_id: str) -> None:
        await self._engine.remove(sandbox_id)

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        network, self._network_obj = self._network_obj, None
        if network is not None:
            await network.close()
        engine, self._engine_obj = self._engine_obj, None
        if engine is not None:
            await engine.docker.close()


def _write_resolv(paths: HostPaths) -> None:
    (paths.state_dir / RESOLV_NAME).write_text(RESOLV_CONF)
    (paths.state_dir / RESOLV_NAME).chmod(0o644)


def _prepare_dirs(paths: HostPaths, root: tuple[int, int] | None, workspace: bool = True) -> None:
    """Finish the bound folders (bind mounts need them; blocking).

    Under userns-remap, container root is the host uid:gid `root`: the workspace becomes its own.
    `workspace`: False when it is a volume (its host folder then stays empty and unused).
    """
    # (folders made by `prepare`) the state folder stays the server's: only the secret is given
    _write_resolv(paths)
    close_to_others(paths.workspace.parent)
    if root is not None and workspace:
        give_tree(paths.workspace, *root)


def _write_secret(state_dir: Path, secret: str, name: str = TCP_SECRET_NAME) -> None:
    """The server's copy of a tcp channel's secret (or certificate: `name`), 0600 in its own folder
    (blocking)."""
    path = state_dir / name
    tmp = state_dir / f".{name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    os.replace(tmp, path)


def _read_secret(state_dir: Path, name: str = TCP_SECRET_NAME) -> str:
    """What `_write_secret` kept; "" when there is none (the sandbox then starts afresh)."""
    try:
        fd = os.open(state_dir / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd) as f:
        return f.read(proto.SECRET_MAX if name == TCP_SECRET_NAME else 1 << 16).strip()


async def self_signed() -> tuple[str, bytes]:
    """A new self-signed certificate (PEM) and its P-256 key (PEM) from one `openssl req`, a few ms.

    Both come back on stdout: nothing is read from a path, and no `/dev/stdin`, which cannot be
    opened when stdin is a socket (uvloop's subprocess pipes are socketpairs: ENXIO)."""
    process = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "-", "-out", "-", "-subj", "/CN=crogia-sandbox", "-days", "3650",
        "-addext", "basicConstraints=critical,CA:TRUE",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    key, cert = _pem_block(out, b"PRIVATE KEY"), _pem_block(out, b"CERTIFICATE")
    if process.returncode != 0 or key is None or cert is None:
        raise SandboxError(f"openssl could not make the sandbox's TLS certificate: {err.decode()[-300:]}")
    return cert.decode(), key


def _pem_block(text: bytes, label: bytes) -> bytes | None:
    """The first `-----BEGIN {label}-----` ... `-----END {label}-----` block of `text`, with a newline."""
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    start = text.find(begin)
    stop = text.find(end, start) if start >= 0 else -1
    if stop < 0:
        return None
    return text[start : stop + len(end)] + b"\n"


@dataclass(frozen=True)
class EngineSecurity:
    """The isolation a Docker engine adds, from `docker info`'s SecurityOptions."""

    userns: str
    """"userns-remap", "rootless", or "off" (container root is host root)."""
    seccomp: str
    """"default" (the engine's profile), "crogia" (ours: the engine's allows io_uring), or "off"."""
    profile: str | None
    """The profile sent with each container; None keeps the engine's default."""
    root: tuple[int, int] | None = None
    """Under userns-remap: the host uid and gid container root is (from the engine's data root)."""

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> EngineSecurity:
        options = " ".join(info.get("SecurityOptions") or [])
        userns = (
            "rootless"
            if "name=rootless" in options
            else "userns-remap"
            if "name=userns" in options
            else "off"
        )
        root = _remapped_root(str(info.get("DockerRootDir", ""))) if userns == "userns-remap" else None
        if "name=seccomp" not in options:
            return cls(userns, "off", None, root)
        unconfined = "profile=unconfined" in options  # dockerd --seccomp-profile=unconfined: ours instead
        if _major(str(info.get("ServerVersion", ""))) >= IO_URING_DENIED_SINCE and not unconfined:
            return cls(userns, "default", None, root)
        return cls(userns, "crogia", docker_profile(), root)


IO_URING_DENIED_SINCE = 25
"""Docker's default seccomp profile denies io_uring from Engine 25.0 on."""


def _remapped_root(data_root: str) -> tuple[int, int] | None:
    """dockerd keeps a remapped engine's data in `<data-root>/<uid>.<gid>`: container root's host ids."""
    uid, dot, gid = os.path.basename(data_root).partition(".")
    return (int(uid), int(gid)) if dot and uid.isdigit() and gid.isdigit() else None


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
