"""Docker backend: one container per session, with the executor daemon as its main process.

The container runs `daemon_command()` under Docker's init (tini), which reaps orphans and
forwards SIGTERM, so a stop takes milliseconds instead of the 10 s grace. Commands never go
through `docker exec`: the daemon dials the server's socket in the state folder, which the
container sees read-only at `/run/crogia-channel` (`ListenerChannel`); its process logs live on
a size-limited tmpfs at `/run/crogia`.
All engine calls go through aiodocker, so nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from crogia.errors import SandboxError, Unavailable
from crogia.sandbox.base import (
    CHANNEL_MOUNT,
    STATE_MOUNT,
    WORKDIR,
    SandboxProvider,
    SandboxSpec,
    SandboxStatus,
    make_dirs,
)
from crogia.sandbox.channel import SECRET_NAME, SOCKET_NAME
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.docker_network import DockerNetwork
from crogia.sandbox.executor import DAEMON_DIR, DAEMON_MOUNT, ExecutorSandbox, daemon_command, log_max
from crogia.sandbox.listener import ListenerChannel
from crogia.sandbox.network import mode_of

MANAGED_LABEL = "crogia.managed-by"
SESSION_LABEL = "crogia.session"
PROTOCOL_LABEL = "crogia.protocol"
"""The executor protocol its daemon was started for: a container of another one is re-created."""
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


def container_config(
    spec: SandboxSpec, instance: str | None = None, network: str = "", dns: str = ""
) -> dict[str, Any]:
    """The Docker API body that creates `spec`'s container (isolated: on the network named `network`)."""
    limits = spec.limits
    memory = limits.memory_mb * 1024 * 1024
    mounts = [
        _bind(spec.workspace, WORKDIR, read_only=False),
        _bind(spec.state_dir, CHANNEL_MOUNT, read_only=True),
        _bind(DAEMON_DIR, DAEMON_MOUNT, read_only=True),
    ]
    channel = ["--dial", f"{CHANNEL_MOUNT}/{SOCKET_NAME}", "--secret-file", f"{CHANNEL_MOUNT}/{SECRET_NAME}"]
    labels = {**spec.labels, **_own_labels(instance), SESSION_LABEL: spec.session_id}
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
            "SecurityOpt": ["no-new-privileges"],
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
        """Force-remove a container with its anonymous volumes; gone already is fine."""
        try:
            with self.errors():
                await self.docker.containers.container(container_id).delete(force=True, v=True)
        except SandboxError as exc:
            # 404: already gone; 409: a removal is already under way.
            if exc.context.get("status") not in (404, 409):
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

    def __init__(self, spec: SandboxSpec, sandbox_id: str, engine: _Engine) -> None:
        self._listener = ListenerChannel(spec.state_dir)
        self._listener.peer_cgroup = sandbox_id
        super().__init__(spec, sandbox_id, self._listener)
        self._engine = engine

    @property
    def _container(self) -> aiodocker.containers.DockerContainer:
        return self._engine.docker.containers.container(self.id)

    async def _start(self) -> None:
        await self._listener.listen()  # before the daemon's first dial, which then costs no wait
        with self._engine.errors(self.spec.image):
            await self._container.start()  # a running container answers 304: nothing to do

    async def _stop(self) -> None:
        state = await self._engine.inspect(self.id)
        if state is not None and state["State"]["Running"]:
            with self._engine.errors():
                await self._container.stop(t=STOP_TIMEOUT)

    async def _destroy(self) -> None:
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

    def __init__(self, *, url: str | None = None, instance: str | None = None, dns: str = "") -> None:
        """`url`: the engine (`unix://`, `tcp://`); default: the Docker context, DOCKER_HOST, the socket.

        `instance` labels every container this provider makes, and `managed_ids` then lists only
        those: without it, every Crogia container on the engine counts as this provider's. `dns`:
        the resolver isolated containers use (default: the engine's choice, from the host's).
        """
        self._url = url
        self._instance = instance
        self._dns = dns
        self._engine_obj: _Engine | None = None
        self._network_obj: DockerNetwork | None = None

    @property
    def _network(self) -> DockerNetwork:
        if self._network_obj is None:
            self._network_obj = DockerNetwork(
                self._engine.docker, self._instance, _own_labels(self._instance), self._dns
            )
        return self._network_obj

    async def _ensure_network(self, spec: SandboxSpec) -> None:
        if mode_of(spec.limits.network) == "isolated":
            with self._engine.errors():
                await self._network.ensure()

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

    async def create(self, spec: SandboxSpec) -> DockerSandbox:
        await asyncio.to_thread(make_dirs, spec)
        await self._ensure_network(spec)
        container = await self._create_container(spec)
        sandbox = DockerSandbox(spec, container.id, self._engine)
        try:
            await sandbox.start()
        except BaseException:
            # Never leave a half-made container behind, whatever stopped us (even cancellation).
            await sandbox.close()
            await self._engine.remove(container.id)
            raise
        return sandbox

    async def _create_container(self, spec: SandboxSpec) -> aiodocker.containers.DockerContainer:
        config = container_config(spec, self._instance, self._network.name, self._dns)
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
        if status == "unknown" or labels.get(PROTOCOL_LABEL) != str(proto.VERSION):
            await self._engine.remove(sandbox_id)
            return await self.create(spec)
        sandbox = DockerSandbox(spec, sandbox_id, self._engine)
        await self._ensure_network(spec)  # a restarted server fences its survivors before they run again
        if status != "running":
            await sandbox.start()
            return sandbox
        try:
            await sandbox.connect()
        except Unavailable:  # the container runs but its daemon is gone: restart it
            await sandbox.stop()
            await sandbox.start()
        return sandbox

    async def managed_ids(self) -> list[str]:
        labels = [f"{key}={value}" for key, value in _own_labels(self._instance).items()]
        filters = json.dumps({"label": labels})  # several label filters: all must match
        with self._engine.errors():
            containers = await self._engine.docker.containers.list(all=True, filters=filters)
        return [str(container.id) for container in containers]

    async def remove(self, sandbox_id: str) -> None:
        await self._engine.remove(sandbox_id)

    async def close(self) -> None:
        network, self._network_obj = self._network_obj, None
        if network is not None:
            await network.close()
        engine, self._engine_obj = self._engine_obj, None
        if engine is not None:
            await engine.docker.close()
