"""Sandboxes: one session's isolated place to run commands, and the factory that picks a backend.

`SANDBOX_BACKEND=auto` uses Docker when its engine answers and bubblewrap otherwise. Each
backend's module is imported only when chosen, so a host without aiodocker's engine (or
without bwrap) never loads what it cannot use.
"""

from __future__ import annotations

import asyncio
import logging

from crogia.config import Settings
from crogia.sandbox.base import Limits, SandboxProvider
from crogia.sandbox.config import BubblewrapConfig, DockerConfig, backend_config, instance_id
from crogia.sandbox.executor import compile_daemon
from crogia.sandbox.network import warn_if_shared

log = logging.getLogger(__name__)

__all__ = ["instance_id", "limits_from", "make_provider"]


def limits_from(settings: Settings) -> Limits:
    """The per-sandbox resource limits the settings ask for."""
    return Limits(
        memory_mb=settings.sandbox_memory_mb,
        cpus=settings.sandbox_cpus,
        pids=settings.sandbox_pids_limit,
        network=settings.sandbox_network,
        # tmpfs pages count against the memory limit: a full /tmp must give ENOSPC, never an OOM kill.
        tmp_mb=min(settings.sandbox_tmp_mb, settings.sandbox_memory_mb // 2),
        state_mb=min(settings.sandbox_state_mb, settings.sandbox_memory_mb // 4),
    )


async def make_provider(settings: Settings) -> SandboxProvider:
    """Build the provider `settings.sandbox_backend` selects; the caller closes it."""
    await asyncio.to_thread(compile_daemon)
    warn_if_shared(settings.sandbox_network)
    backend = settings.sandbox_backend
    if backend == "bubblewrap":
        return await _bubblewrap(settings)
    config = backend_config(settings, "docker")
    assert isinstance(config, DockerConfig)
    docker = config.build()
    if await docker.available():
        log.info("sandbox backend: docker (engine at %s)", docker.url)
        if not await docker.has_image(settings.docker_base_image):
            log.warning(
                "sandbox image %s is missing: build it with `crogia image build`", settings.docker_base_image
            )
        return docker
    if backend == "docker":
        # Chosen explicitly: keep it, so the engine may come up later; creates say what is wrong.
        log.warning("sandbox backend: docker, but the engine at %s does not answer yet", docker.url)
        return docker
    await docker.close()
    log.info("sandbox backend: bubblewrap (no Docker engine answers at %s)", docker.url)
    return await _bubblewrap(settings)


async def _bubblewrap(settings: Settings) -> SandboxProvider:
    config = backend_config(settings, "bubblewrap")
    assert isinstance(config, BubblewrapConfig)
    if config.uid_range:
        from crogia.sandbox.bwrap_priv import closed_ancestor

        closed = await asyncio.to_thread(closed_ancestor, settings.data_dir)
        if closed is not None:
            log.warning(
                "bubblewrap sandboxes run as host root (SANDBOX_UID_RANGE unused): their uids cannot "
                "reach the data folder %s through %s (make it searchable: chmod o+x, or move "
                "BASE_DIRECTORY)", settings.data_dir, closed,
            )  # fmt: skip
            config = config.model_copy(update={"uid_range": ""})
    provider = config.build()
    await provider.available()  # probes now, so a weaker isolation is a start-up warning
    return provider
