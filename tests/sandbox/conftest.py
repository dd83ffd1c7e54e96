"""Fixtures for the sandbox contract suite: one `provider` per backend, sandboxes cleaned up.

To run the suite on another backend, add one entry to `PROVIDER_FACTORIES`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiodocker.volumes import DockerVolume

from crogia.sandbox.base import HostStorage, Limits, Sandbox, SandboxProvider, SandboxSpec
from crogia.sandbox.bubblewrap import BubblewrapProvider
from crogia.sandbox.docker import DockerProvider, DockerSandbox
from tests.conftest import IN_CI, remove_instance, storage


@dataclass(frozen=True)
class ProviderFactory:
    """Builds a fresh provider for one test; `marks` go on that backend's parameter."""

    build: Callable[[HostStorage], SandboxProvider]
    marks: list[pytest.MarkDecorator] = field(default_factory=list)
    image: str = "crogia-sandbox:latest"


INSTANCE = "t" + uuid.uuid4().hex[:11]
"""This test process's Docker instance (its network, rules and container label): test runs in
parallel (pytest-xdist workers, other checkouts) share one engine, and must not share its objects."""

PROVIDER_FACTORIES: dict[str, ProviderFactory] = {
    "bubblewrap": ProviderFactory(lambda storage: BubblewrapProvider(storage=storage)),
    "docker": ProviderFactory(
        lambda storage: DockerProvider(instance=INSTANCE, storage=storage), [pytest.mark.docker]
    ),
    # The server reaches the daemon only over TCP, the workspace is a Docker volume (issue 11, item 4).
    "docker-tcp": ProviderFactory(
        lambda storage: DockerProvider(
            transport="tcp", workspace="volume", instance=INSTANCE, storage=storage
        ),
        [pytest.mark.docker],
    ),
    # The same with TLS on the channel (SANDBOX_TCP_TLS).
    "docker-tcp-tls": ProviderFactory(
        lambda storage: DockerProvider(
            transport="tcp", workspace="volume", tls=True, instance=INSTANCE, storage=storage
        ),
        [pytest.mark.docker],
    ),
}

MakeSandbox = Callable[..., Awaitable[Sandbox]]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """This process's Docker network and fence outlive a provider closed with a test's container
    still on it: remove whatever of them is left (each xdist worker has its own INSTANCE)."""
    remove_instance(INSTANCE)


def unavailable(backend: str) -> None:
    """Skip a backend this host cannot run, but fail under CI: every backend must run there."""
    reason = f"the {backend} backend is not available here"
    if IN_CI:
        pytest.fail(f"{reason}, and under CI every backend must run")
    pytest.skip(reason)


@pytest.fixture(params=[pytest.param(name, marks=f.marks, id=name) for name, f in PROVIDER_FACTORIES.items()])
async def provider(request: pytest.FixtureRequest, data_dir: Path) -> AsyncIterator[SandboxProvider]:
    factory = PROVIDER_FACTORIES[request.param]
    built = factory.build(storage(data_dir))
    if not await built.available():
        await built.close()
        unavailable(request.param)
    built.test_image = factory.image  # type: ignore[attr-defined]
    yield built
    await built.close()


@pytest.fixture
async def bwrap(data_dir: Path) -> AsyncIterator[BubblewrapProvider]:
    """A bubblewrap provider of its own (for what only that backend promises), closed after."""
    provider = BubblewrapProvider(storage=storage(data_dir))
    if not await provider.available():
        unavailable("bubblewrap")
    yield provider
    await provider.close()


@pytest.fixture
async def make_sandbox(provider: SandboxProvider, data_dir: Path) -> AsyncIterator[MakeSandbox]:
    """Create sandboxes with their own workspace and state folders; all destroyed afterwards."""
    created: list[Sandbox] = []

    async def make(limits: Limits | None = None, env: dict[str, str] | None = None, **kw: Any) -> Sandbox:
        spec = new_spec(provider, data_dir, limits=limits or Limits(memory_mb=512), env=env or {}, **kw)
        sandbox = await provider.create(spec)
        created.append(sandbox)
        return sandbox

    yield make
    for sandbox in created:
        await provider.remove(sandbox.id)
        await provider.remove_workspace(sandbox.spec.session_id)


async def host_view(sandbox: Sandbox) -> Path:
    """Where the test (root on the engine's host) sees the sandbox's workspace: its host folder,
    or the Docker volume's data folder (the server itself never goes there)."""
    if not isinstance(sandbox, DockerSandbox) or sandbox.volume is None:
        return sandbox.paths.workspace
    info = await DockerVolume(sandbox._engine.docker, sandbox.volume).show()
    return Path(info["Mountpoint"])


def new_spec(provider: SandboxProvider, data_dir: Path, **kw: Any) -> SandboxSpec:
    session_id = "t" + uuid.uuid4().hex[:10]
    image = getattr(provider, "test_image", "crogia-sandbox:latest")
    return SandboxSpec(
        session_id=session_id,
        image=image,
        labels={"crogia.test": "1"},
        **kw,
    )


@pytest.fixture
async def sandbox(make_sandbox: MakeSandbox) -> Sandbox:
    return await make_sandbox()
