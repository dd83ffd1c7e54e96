"""Docker over TCP with the workspace in a volume (issue 11, item 4): the proof without Kubernetes.

Real containers on Crogia's own bridge. The server reaches each daemon only over TCP on the
container's address (no socket, workspace, daemon or channel folder bound from the host), the
workspace is a Docker volume, another container cannot reach a daemon's port (the bridge has
inter-container traffic off) nor pass as another sandbox's daemon, a stranger on the host
without the secret is refused, a dropped connection comes back without a restart, a restarted
server gets back in with the secret it gave, and the daemon's replies pass an egress policy of
`none`. Traffic: only to the containers made here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest
from aiodocker.volumes import DockerVolume

from crogia.sandbox.base import Limits, SandboxSpec
from crogia.sandbox.config import instance_id
from crogia.sandbox.daemon.executor_proto import ProtocolError
from crogia.sandbox.docker import SECRET_PATH, TCP_SECRET_NAME, DockerProvider, DockerSandbox
from crogia.sandbox.docker_network import tag_of
from crogia.sandbox.egress import EgressPolicy
from crogia.sandbox.executor_client import ExecutorClient
from crogia.sandbox.network import DAEMON_PORT
from crogia.sandbox.tcp_channel import Address, TcpChannel
from tests.conftest import make_settings, need_docker, remove_containers_of, storage
from tests.hostile.support import shell
from tests.support.server import run_server

pytestmark = pytest.mark.docker

PROBE = (
    "import socket, sys\n"
    "try: socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2); print('OPEN')\n"
    "except ConnectionRefusedError: print('REFUSED')\n"
    "except (TimeoutError, socket.timeout): print('TIMEOUT')\n"
    "except OSError as e: print('FAILED', e)\n"
)


@pytest.fixture
async def provider(data_dir: Path) -> AsyncIterator[DockerProvider]:
    need_docker()
    instance = f"t{uuid.uuid4().hex[:11]}"
    built = DockerProvider(transport="tcp", workspace="volume", instance=instance, storage=storage(data_dir))
    yield built
    await built.close()


@pytest.fixture
async def made(provider: DockerProvider, data_dir: Path) -> AsyncIterator[list[DockerSandbox]]:
    sandboxes: list[DockerSandbox] = []
    yield sandboxes
    for sandbox in sandboxes:
        await provider.remove(sandbox.id)
        await provider.remove_workspace(sandbox.spec.session_id)


async def make(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox], **kw: object
) -> DockerSandbox:
    session_id = "t" + uuid.uuid4().hex[:10]
    spec = SandboxSpec(
        session_id=session_id,
        limits=Limits(memory_mb=256),
        labels={"crogia.test": "1"},
        **kw,  # type: ignore[arg-type]
    )
    sandbox = await provider.create(spec)
    made.append(sandbox)
    return sandbox


async def address(sandbox: DockerSandbox) -> Address:
    return await sandbox._address()


async def run(sandbox: DockerSandbox, cmd: str) -> str:
    return (await sandbox.exec(cmd, timeout=20, max_output=65536)).output


async def test_nothing_of_the_channel_or_workspace_is_bound(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    sandbox = await make(provider, data_dir, made)
    info = await sandbox._engine.docker.containers.container(sandbox.id).show()
    binds = {m["Destination"]: m for m in info["Mounts"] if m["Type"] == "bind"}
    assert set(binds) == {"/etc/resolv.conf"}, f"host folders bound: {sorted(binds)}"
    assert not binds["/etc/resolv.conf"]["RW"]
    (volume,) = [m for m in info["Mounts"] if m["Type"] == "volume"]
    assert volume["Destination"] == "/workspace" and volume["Name"] == sandbox.volume
    assert provider.workdir(sandbox.spec.session_id) == sandbox.volume
    assert "--listen" in info["Config"]["Cmd"]
    assert sandbox._secret and sandbox._secret not in json.dumps(info), "the secret shows in docker inspect"
    # The daemon's peer is the server on the bridge's gateway, over TCP; no unix socket in sight.
    peers = await run(sandbox, "cat /proc/net/tcp | awk 'NR > 1 && $4 == \"01\" {print $2}'")
    assert f":{DAEMON_PORT:04X}" in peers
    assert "executor.sock" not in await run(sandbox, "ls /run/crogia-channel 2>&1; true")
    assert await run(sandbox, "echo hi > f; cat f") == "hi\n"
    assert not any((data_dir / "ws" / sandbox.spec.session_id).iterdir())  # nothing on the host folder


async def test_another_container_cannot_reach_the_daemon(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    first, second = await make(provider, data_dir, made), await make(provider, data_dir, made)
    host, port = await address(first)
    await run(second, f"cat > /tmp/probe.py <<'EOF'\n{PROBE}EOF")
    heard = await run(second, f"python3 /tmp/probe.py {host} {port}")
    assert not heard.startswith("OPEN"), f"another sandbox reached the daemon: {heard}"
    # Its own daemon's port is open to the host: the probe itself can see an OPEN port.
    own_host, _ = await address(second)
    _, writer = await asyncio.open_connection(own_host, port)
    writer.close()
    assert (await run(first, "echo still")) == "still\n"


async def test_a_stranger_on_the_host_without_the_secret_is_refused(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    sandbox = await make(provider, data_dir, made)
    here = await address(sandbox)

    async def at() -> Address:
        return here

    with pytest.raises(ProtocolError):
        await TcpChannel(at, lambda: "a-guess").connect(5)
    assert await run(sandbox, "echo fine") == "fine\n"


async def test_a_sandbox_cannot_pass_as_another_ones_daemon(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    # As if `other` had been given `victim`'s address after a restart: the server dials it with
    # the victim's secret, and no proof passes either way.
    victim, other = await make(provider, data_dir, made), await make(provider, data_dir, made)
    theirs = await address(other)

    async def at() -> Address:
        return theirs

    channel = TcpChannel(at, lambda: victim._secret)
    with pytest.raises(ProtocolError):
        await channel.connect(5)
    # Even with root inside and a rogue listener in place of its daemon, it lacks the victim's secret.
    assert victim._secret not in await run(other, f"cat {SECRET_PATH}")


async def test_a_dropped_connection_comes_back_without_a_restart(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    sandbox = await make(provider, data_dir, made)
    started = (await sandbox._engine.inspect(sandbox.id) or {})["State"]["StartedAt"]
    handle = await sandbox.spawn("sleep 60")
    client = sandbox._client
    assert isinstance(client, ExecutorClient)
    client._writer.transport.abort()  # type: ignore[attr-defined]
    assert await run(sandbox, "echo back") == "back\n"
    assert sandbox._client is not client
    assert (await sandbox._engine.inspect(sandbox.id) or {})["State"]["StartedAt"] == started
    assert any(p.pid == handle.pid and p.running for p in await sandbox.processes())


async def test_each_start_gives_a_new_secret_and_the_old_one_opens_nothing(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    sandbox = await make(provider, data_dir, made)
    old = sandbox._secret
    await sandbox.stop()
    await sandbox.start()
    assert sandbox._secret != old and await run(sandbox, "echo new") == "new\n"
    here = await address(sandbox)

    async def at() -> Address:
        return here

    with pytest.raises(ProtocolError):
        await TcpChannel(at, lambda: old).connect(5)


async def test_a_restarted_server_gets_back_in(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    sandbox = await make(provider, data_dir, made)
    handle = await sandbox.spawn("sleep 60")
    assert (sandbox.paths.state_dir / TCP_SECRET_NAME).stat().st_mode & 0o077 == 0
    await sandbox.close()  # the server goes; the container runs on
    again = DockerProvider(
        transport="tcp", workspace="volume", instance=provider._instance, storage=provider.storage
    )
    try:
        back = await again.attach(sandbox.spec, sandbox.id)
        assert back.id == sandbox.id
        assert any(p.pid == handle.pid and p.running for p in await back.processes()), "it was restarted"
        await back.close()
    finally:
        await again.close()


async def test_the_daemon_answers_under_an_egress_policy_of_none(
    provider: DockerProvider, data_dir: Path, made: list[DockerSandbox]
) -> None:
    sandbox = await make(provider, data_dir, made, egress=EgressPolicy("none"))
    assert await run(sandbox, "echo through") == "through\n"
    sandbox._client._writer.transport.abort()  # type: ignore[union-attr]
    assert await run(sandbox, "echo again") == "again\n"  # a new connection from the host, too
    gateway = (await address(sandbox))[0].rsplit(".", 1)[0] + ".1"
    await run(sandbox, f"cat > /tmp/probe.py <<'EOF'\n{PROBE}EOF")
    assert not (await run(sandbox, f"python3 /tmp/probe.py {gateway} 9")).startswith("OPEN")


async def test_through_the_server(data_dir: Path) -> None:
    need_docker()
    settings = make_settings(
        data_dir,
        "docker",
        sandbox_transport="tcp",
        docker_workspace="volume",
        sandbox_files="daemon",
        sandbox_pool_size=1,
    )
    try:
        async with run_server(settings) as server:
            health = (await server.client.get("/api/health")).json()
            assert health["transport"] == "tcp"
            session = (await server.client.post("/api/sessions", json={})).json()
            sid = session["session_id"]
            assert (
                session["workdir"]
                == server.runtime.provider.workdir(sid)
                == f"crogia-ws-{tag_of(instance_id(settings))}-{sid}"
            )
            assert (await shell(server.client, sid, "echo kept > k; cat k"))["output"] == "kept\n"
            live = server.runtime.sessions.peek(sid)
            assert live is not None and await server.runtime.sessions.sleep(live, idle_for=0)
            assert (await shell(server.client, sid, "cat k"))["output"] == "kept\n"  # woken, same volume
            docker = server.runtime.provider._engine.docker  # type: ignore[attr-defined]
            assert (await DockerVolume(docker, session["workdir"]).show())["Name"] == session["workdir"]
            assert (await server.client.delete(f"/api/sessions/{sid}")).status_code in (200, 204)
            with pytest.raises(aiodocker.DockerError):
                await DockerVolume(docker, session["workdir"]).show()
    finally:
        remove_containers_of(data_dir)
