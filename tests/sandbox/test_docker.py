"""Docker backend specifics: container config, failure modes, re-attach, clean-up, stop speed.

Behaviour shared with every backend (exec, spawn, logs...) lives in the contract suite.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from crogia.errors import Unavailable
from crogia.sandbox.base import Limits, SandboxSpec
from crogia.sandbox.docker import INSTANCE_LABEL, MANAGED_LABEL, SESSION_LABEL, DockerProvider, DockerSandbox
from tests.conftest import need_docker, storage
from tests.sandbox.conftest import INSTANCE

pytestmark = pytest.mark.docker

TEST_LABEL = "crogia.test-run"
SpecFactory = Callable[..., SandboxSpec]


@pytest.fixture
async def run_id() -> AsyncIterator[str]:
    """A label value marking this test's containers; every one of them is removed afterwards."""
    need_docker()
    run = uuid.uuid4().hex
    yield run
    await _remove_labelled(run)


@pytest.fixture
async def provider(run_id: str, data_dir: Path) -> AsyncIterator[DockerProvider]:
    docker = DockerProvider(instance=INSTANCE, storage=storage(data_dir))
    yield docker
    await _remove_labelled(run_id)  # first: with one left on the network, close keeps network and fence
    await docker.close()


@pytest.fixture
async def engine(run_id: str) -> AsyncIterator[aiodocker.Docker]:
    async with aiodocker.Docker() as docker:
        yield docker


@pytest.fixture
def make_spec(data_dir: Path, run_id: str) -> SpecFactory:
    def make(name: str = "s1", **fields: Any) -> SandboxSpec:
        labels = {TEST_LABEL: run_id, **fields.pop("labels", {})}
        session = f"{name}-{run_id[:8]}"
        return SandboxSpec(session, labels=labels, **fields)

    return make


async def _labelled(docker: aiodocker.Docker, run: str) -> list[aiodocker.containers.DockerContainer]:
    filters = json.dumps({"label": [f"{TEST_LABEL}={run}"]})
    return await docker.containers.list(all=True, filters=filters)


async def _remove_labelled(run: str) -> None:
    async with aiodocker.Docker() as docker:
        for container in await _labelled(docker, run):
            await container.delete(force=True, v=True)


async def _run(sandbox: DockerSandbox, cmd: str) -> str:
    result = await sandbox.exec(cmd, timeout=30, max_output=100_000)
    assert result.exit_code == 0, result.output
    return result.output


async def test_container_gets_labels_limits_mounts_and_env(
    provider: DockerProvider, engine: aiodocker.Docker, make_spec: SpecFactory
) -> None:
    limits = Limits(memory_mb=256, cpus=0.5, pids=100, network="none")
    spec = make_spec(limits=limits, env={"GREETING": "hello"}, labels={"team": "qa"})
    sandbox = await provider.create(spec)
    info = await engine.containers.container(sandbox.id).show()
    host = info["HostConfig"]
    assert info["Config"]["Labels"][SESSION_LABEL] == spec.session_id
    assert info["Config"]["Labels"][MANAGED_LABEL] == "crogia"
    assert info["Config"]["Labels"]["team"] == "qa"
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (256 * 2**20, 500_000_000, 100)
    assert host["Init"] is True
    assert host["NetworkMode"] == "none"
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in info["Mounts"]}
    assert mounts["/workspace"] == (str(sandbox.paths.workspace), True)
    assert mounts["/run/crogia-channel"] == (str(sandbox.paths.state_dir), False)  # the server's, read-only
    assert "/run/crogia" in host["Tmpfs"]  # process logs: in the sandbox, size-limited
    assert mounts["/opt/crogia"][1] is False
    # ...and what a command inside notices:
    assert await _run(sandbox, "echo $GREETING; pwd") == "hello\n/workspace\n"
    await _run(sandbox, "echo made-inside > /workspace/note.txt")
    assert (sandbox.paths.workspace / "note.txt").read_text() == "made-inside\n"
    assert (await sandbox.exec("touch /opt/crogia/x", timeout=10, max_output=1000)).exit_code != 0
    assert (await _run(sandbox, "ls /sys/class/net")).split() == ["lo"]
    pids_max = "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max"  # v1 || v2
    assert await _run(sandbox, pids_max) == "100\n"
    await sandbox.destroy()


async def test_engine_down_is_unavailable(make_spec: SpecFactory, data_dir: Path) -> None:
    provider = DockerProvider(url="unix:///tmp/no-docker-here.sock", storage=storage(data_dir))
    try:
        started = time.monotonic()
        assert await provider.available() is False
        assert time.monotonic() - started < 5
        with pytest.raises(
            Unavailable, match=r"Docker engine is not reachable at unix:///tmp/no-docker-here"
        ):
            await provider.create(make_spec())
        with pytest.raises(Unavailable):
            await provider.managed_ids()
    finally:
        await provider.close()


async def test_missing_image_names_the_build_command(
    provider: DockerProvider, engine: aiodocker.Docker, make_spec: SpecFactory, run_id: str
) -> None:
    with pytest.raises(Unavailable, match="crogia image build") as caught:
        await provider.create(make_spec(image="crogia-no-such-image:never"))
    assert "crogia-no-such-image:never" in caught.value.message
    assert await _labelled(engine, run_id) == []


async def test_failed_start_leaves_no_container(
    provider: DockerProvider,
    engine: aiodocker.Docker,
    make_spec: SpecFactory,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A broken PYTHONHOME kills the executor at start-up: the container exists but never answers.
    monkeypatch.setattr(DockerSandbox, "connect_timeout", 2.0)
    with pytest.raises(Unavailable, match="did not answer"):
        await provider.create(make_spec(env={"PYTHONHOME": "/nowhere"}))
    assert await _labelled(engine, run_id) == []


async def test_cancelled_create_leaves_no_container(
    provider: DockerProvider, engine: aiodocker.Docker, make_spec: SpecFactory, run_id: str
) -> None:
    creating = asyncio.create_task(provider.create(make_spec(env={"PYTHONHOME": "/nowhere"})))
    try:
        async with asyncio.timeout(10):
            while not await _labelled(engine, run_id):  # noqa: ASYNC110 - wait until it is half-made
                await asyncio.sleep(0.05)
    finally:
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating
    assert await _labelled(engine, run_id) == []


async def test_a_create_cancelled_at_any_moment_leaves_no_container(
    provider: DockerProvider, engine: aiodocker.Docker, make_spec: SpecFactory, run_id: str
) -> None:
    """Also before the engine has answered: a cancelled request would leave it making a container
    after any look for it, so the create is let finish and then undone."""
    for step in range(12):
        spec = make_spec(f"c{step}", env={"PYTHONHOME": "/nowhere"})
        creating = asyncio.create_task(provider.create(spec))
        await asyncio.sleep(step * 0.08)
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating
        assert await _labelled(engine, run_id) == [], f"left behind when cancelled after {step * 0.08:.2f} s"


async def test_attach_restarts_a_stopped_container(provider: DockerProvider, make_spec: SpecFactory) -> None:
    spec = make_spec()
    sandbox = await provider.create(spec)
    await sandbox.stop()
    assert await sandbox.status() == "exited"
    again = await provider.attach(spec, sandbox.id)
    assert again.id == sandbox.id
    assert await again.status() == "running"
    assert await _run(again, "echo back") == "back\n"


async def test_attach_reconnects_to_a_running_container_from_a_new_provider(
    provider: DockerProvider, make_spec: SpecFactory, data_dir: Path
) -> None:
    spec = make_spec()
    sandbox = await provider.create(spec)
    await _run(sandbox, "echo 1 > /tmp/state")  # survives only if the container is not re-created
    await sandbox.close()  # server shutdown: the container keeps running
    restarted = DockerProvider(instance=INSTANCE, storage=storage(data_dir))
    try:
        again = await restarted.attach(spec, sandbox.id)
        assert again.id == sandbox.id
        assert await _run(again, "cat /tmp/state") == "1\n"
        await again.close()
    finally:
        await restarted.close()


async def test_attach_recreates_a_missing_container_around_the_workspace(
    provider: DockerProvider, make_spec: SpecFactory
) -> None:
    spec = make_spec()
    sandbox = await provider.create(spec)
    await _run(sandbox, "echo kept > /workspace/kept.txt")
    await sandbox.close()
    await provider.remove(sandbox.id)
    assert await sandbox.status() == "missing"
    again = await provider.attach(spec, sandbox.id)
    assert again.id != sandbox.id
    assert await _run(again, "cat /workspace/kept.txt") == "kept\n"


async def test_managed_ids_lists_stopped_ones_and_remove_is_idempotent(
    provider: DockerProvider, make_spec: SpecFactory
) -> None:
    first, second = await asyncio.gather(provider.create(make_spec("a")), provider.create(make_spec("b")))
    await first.stop()
    ids = await provider.managed_ids()
    assert {first.id, second.id} <= set(ids)
    await second.close()
    await provider.remove(second.id)
    await provider.remove(second.id)  # already gone: no error
    assert second.id not in await provider.managed_ids()
    assert first.id in await provider.managed_ids()


async def test_stop_is_fast_even_with_a_background_process(
    provider: DockerProvider, make_spec: SpecFactory
) -> None:
    sandbox = await provider.create(make_spec())
    await sandbox.spawn("sleep 1000")
    started = time.monotonic()
    await sandbox.stop()
    assert time.monotonic() - started < 2.0
    assert await sandbox.status() == "exited"
    await sandbox.destroy()
    assert await sandbox.status() == "missing"


async def test_servers_sharing_an_engine_see_only_their_own_sandboxes(
    engine: aiodocker.Docker, make_spec: SpecFactory, run_id: str, data_dir: Path
) -> None:
    names = (f"a{run_id[:11]}", f"b{run_id[:11]}")  # this test's own: runs in parallel share the engine
    ours = DockerProvider(instance=names[0], storage=storage(data_dir))
    theirs = DockerProvider(instance=names[1], storage=storage(data_dir))
    try:
        mine = await ours.create(make_spec("a"))
        other = await theirs.create(make_spec("b"))
        assert await ours.managed_ids() == [mine.id]
        assert await theirs.managed_ids() == [other.id]
        info = await engine.containers.container(mine.id).show()
        assert info["Config"]["Labels"][INSTANCE_LABEL] == names[0]
        await mine.close()
        await other.close()
    finally:
        for provider in (ours, theirs):  # their containers first: a network with containers stays
            for sandbox_id in await provider.managed_ids():
                await provider.remove(sandbox_id)
            await provider.close()
