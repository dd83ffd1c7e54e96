"""Backend configs: plain data with a `type` literal, each building its provider lazily.

As in SWE-ReX's `deployment/config.py`: a config says everything its backend needs and `build()`
imports the backend only then, so a host without aiodocker (or bwrap) never loads it. Every
config gets this server's `instance` id from `backend_config`: the one name its sandboxes,
containers and cgroups carry across restarts, so a restarted server finds what a crashed one
left behind (a provider built without it would get a random scope and never reclaim them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from crogia.config import Settings
from crogia.sandbox.base import HostStorage

if TYPE_CHECKING:
    from crogia.sandbox.bubblewrap import BubblewrapProvider
    from crogia.sandbox.docker import DockerProvider

__all__ = ["BackendConfig", "BubblewrapConfig", "DockerConfig", "backend_config", "instance_id"]


def instance_id(settings: Settings) -> str:
    """A stable id of this server's data folder: the sandboxes it owns carry it across restarts."""
    return hashlib.sha256(str(settings.data_dir).encode()).hexdigest()[:16]


class BubblewrapConfig(BaseModel):
    """bubblewrap: sandboxes are processes of this server, limited by cgroups `crogia-<instance>`."""

    model_config = ConfigDict(frozen=True)
    type: Literal["bubblewrap"] = "bubblewrap"
    instance: str
    """Names this server's cgroup folder (its leftovers after a crash are found by it)."""
    dns: str = ""
    """SANDBOX_DNS: where the sandboxes' DNS queries go; empty: the host's resolver."""
    uid_range: str = ""
    """SANDBOX_UID_RANGE: host uids a sandbox's root maps to, one per session; empty: host root."""
    workspaces: Path | None = None
    """Where the sandboxes' workspace folders are (`<workspaces>/<session id>`); None: none (tests)."""
    states: Path | None = None
    """Where their server-only state folders are (`<states>/<session id>`)."""
    disks: Path | None = None
    """Where workspace disk images are (SANDBOX_DISK_MB); None: no quotas."""
    disk_mb: int = 0
    """SANDBOX_DISK_MB: each workspace's size; 0: no quota."""

    def build(self) -> BubblewrapProvider:
        from crogia.sandbox.bubblewrap import BubblewrapProvider

        return BubblewrapProvider(
            scope=self.instance, dns=self.dns, uid_range=self.uid_range, storage=_storage(self)
        )


class DockerConfig(BaseModel):
    """Docker: one container per sandbox, labelled with `instance`."""

    model_config = ConfigDict(frozen=True)
    type: Literal["docker"] = "docker"
    instance: str
    """Labels every container this server makes; `managed_ids` lists only those."""
    url: str | None = None
    """The engine; default: the Docker context, DOCKER_HOST, the socket."""
    dns: str = ""
    """SANDBOX_DNS: where the sandboxes' DNS queries go; empty: Docker's own resolver."""
    transport: Literal["unix", "tcp"] = "unix"
    """SANDBOX_TRANSPORT: the daemon dials a socket in a server-only folder, or listens on TCP."""
    tls: bool = False
    """SANDBOX_TCP_TLS: TLS on the TCP channel, pinning each sandbox's own certificate."""
    workspace: Literal["bind", "volume"] = "bind"
    """DOCKER_WORKSPACE: a host folder bound in, or a Docker volume."""
    workspaces: Path | None = None
    """Where bound workspace folders are (`<workspaces>/<session id>`); None: none (tests)."""
    states: Path | None = None
    """Where the server-only state folders are (`<states>/<session id>`)."""
    disks: Path | None = None
    """Where workspace disk images are (SANDBOX_DISK_MB, bound workspaces only); None: no quotas."""
    disk_mb: int = 0
    """SANDBOX_DISK_MB: each workspace's size; 0: no quota."""

    def build(self) -> DockerProvider:
        from crogia.sandbox.docker import DockerProvider  # lazy: aiodocker only when Docker may be used

        return DockerProvider(
            url=self.url,
            instance=self.instance,
            dns=self.dns,
            transport=self.transport,
            tls=self.tls,
            workspace=self.workspace,
            storage=_storage(self),
        )


def _storage(config: BubblewrapConfig | DockerConfig) -> HostStorage | None:
    if config.workspaces is None or config.states is None:
        return None
    disks = None
    if config.disks is not None:
        from crogia.sandbox.quota import WorkspaceDisks

        disks = WorkspaceDisks(config.disks, config.disk_mb)
    return HostStorage(config.workspaces, config.states, disks)


BackendConfig = Annotated[BubblewrapConfig | DockerConfig, Field(discriminator="type")]


def backend_config(settings: Settings, kind: Literal["bubblewrap", "docker"]) -> BackendConfig:
    """The config of backend `kind` for this server: its instance id always set."""
    workspaces, states = settings.workspaces_dir, settings.sandbox_state_dir
    disks, disk_mb = settings.data_dir / "disks", settings.sandbox_disk_mb
    if kind == "bubblewrap":
        return BubblewrapConfig(
            instance=instance_id(settings),
            dns=settings.sandbox_dns,
            uid_range=settings.sandbox_uid_range,
            workspaces=workspaces,
            states=states,
            disks=disks,
            disk_mb=disk_mb,
        )
    return DockerConfig(
        instance=instance_id(settings),
        dns=settings.sandbox_dns,
        transport=settings.sandbox_transport,
        tls=settings.sandbox_tcp_tls,
        workspace=settings.docker_workspace,
        workspaces=workspaces,
        states=states,
        disks=disks,
        disk_mb=disk_mb,
    )
