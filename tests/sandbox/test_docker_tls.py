"""Docker over TCP with TLS (SANDBOX_TCP_TLS=true, issue 11, item 4).

Real containers on Crogia's own bridge: the certificate and key are copied in beside the secret
(0400, not in `docker inspect`), renewed at each start (the old certificate, pinned, opens
nothing); a plain-TCP client on the host gets nothing from the daemon's port; a restarted server
gets back in with the certificate it kept; and the server's own operations run over it (health
says `tcp+tls`). Traffic: only to the containers made here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crogia.sandbox.base import Limits, SandboxSpec
from crogia.sandbox.daemon import executor_auth as auth
from crogia.sandbox.daemon.executor_proto import ProtocolError
from crogia.sandbox.docker import (
    TCP_CERT_NAME,
    TLS_CERT_PATH,
    TLS_KEY_PATH,
    TRANSPORT_LABEL,
    DockerProvider,
    DockerSandbox,
)
from crogia.sandbox.tcp_channel import Address, TcpChannel
from tests.conftest import make_settings, need_docker, remove_containers_of, storage
from tests.hostile.support import shell
from tests.support.server import run_server

pytestmark = pytest.mark.docker


def _provider(instance: str, data_dir: Path) -> DockerProvider:
    return DockerProvider(
        transport="tcp", workspace="volume", tls=True, instance=instance, storage=storage(data_dir)
    )


@pytest.fixture
async def sandbox(data_dir: Path) -> AsyncIterator[DockerSandbox]:
    need_docker()
    provider = _provider(f"t{uuid.uuid4().hex[:11]}", data_dir)
    spec = SandboxSpec(
        session_id="t" + uuid.uuid4().hex[:10], limits=Limits(memory_mb=256), labels={"crogia.test": "1"}
    )
    made = await provider.create(spec)
    try:
        yield made
    finally:
        await made.close()
        await provider.remove(made.id)
        await provider.remove_workspace(spec.session_id)
        await provider.close()


async def run(sandbox: DockerSandbox, cmd: str) -> str:
    return (await sandbox.exec(cmd, timeout=20, max_output=1 << 22)).output


async def test_cert_and_key_are_copied_in_and_renewed_at_each_start(sandbox: DockerSandbox) -> None:
    info = await sandbox._engine.docker.containers.container(sandbox.id).show()
    cmd = info["Config"]["Cmd"]
    assert "--tls-cert" in cmd and TLS_CERT_PATH in cmd and TLS_KEY_PATH in cmd
    assert info["Config"]["Labels"][TRANSPORT_LABEL] == "tcp+tls/volume"
    first = sandbox._cert
    assert first and first.strip() not in json.dumps(info), "the certificate shows in docker inspect"
    modes = await run(sandbox, f"stat -c '%a %U' {TLS_CERT_PATH} {TLS_KEY_PATH}")
    assert modes.split("\n")[:2] == ["400 root", "400 root"]
    assert (await run(sandbox, f"cat {TLS_CERT_PATH}")).strip() == first.strip()
    stored = sandbox.paths.state_dir / TCP_CERT_NAME
    assert stored.read_text().strip() == first.strip() and stored.stat().st_mode & 0o077 == 0
    big = await run(sandbox, "head -c 2000000 /dev/zero | tr '\\0' b")
    assert big == "b" * 2_000_000

    await sandbox.stop()
    await sandbox.start()
    assert sandbox._cert != first and await run(sandbox, "echo new") == "new\n"
    here = await sandbox._address()

    async def at() -> Address:
        return here

    old = TcpChannel(at, lambda: sandbox._secret, lambda: first)  # the right secret, the old certificate
    with pytest.raises(ProtocolError):
        await old.connect(5)
    assert "certificate" in old.refused.lower()


async def test_a_plain_tcp_client_gets_nothing(sandbox: DockerSandbox) -> None:
    host, port = await sandbox._address()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((json.dumps({"type": "auth", "nonce": auth.nonce(), "proof": "0" * 64}) + "\n").encode())
    try:
        heard = await asyncio.wait_for(reader.read(), auth.TIMEOUT + 5)
    except ConnectionError:
        heard = b""
    finally:
        writer.close()
    assert b"challenge" not in heard and b"hello" not in heard
    # A TLS client that does not pin the certificate, without the secret: a challenge, then nothing.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    challenge = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert challenge["type"] == "challenge"
    writer.write((json.dumps({"type": "auth", "nonce": auth.nonce(), "proof": "0" * 64}) + "\n").encode())
    try:
        rest = await asyncio.wait_for(reader.read(), auth.TIMEOUT + 5)
    except (ConnectionError, ssl.SSLError):
        rest = b""
    finally:
        writer.close()
    assert rest == b""
    assert await run(sandbox, "echo still") == "still\n"


SOURCE = r"""
import hashlib, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8300))
s.listen(1)
c, _ = s.accept()
c.recv(1)
block = hashlib.sha256(b"seed").digest() * 4096
for i in range(96):
    c.sendall(bytes([i]) + block)
c.close()
"""


async def test_a_tunnel_over_tls_carries_every_byte_in_order(sandbox: DockerSandbox) -> None:
    """TLS must see each byte to encrypt it: the daemon's tunnels copy here instead of splicing."""
    handle = await sandbox.spawn(f"python3 -c '{SOURCE}'")
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while not any(p.port == 8300 for p in await sandbox.ports(owners=False)):
            assert asyncio.get_running_loop().time() < deadline, "the source never listened"
            await asyncio.sleep(0.05)
        tunnel = await sandbox.open_tunnel(8300)
        try:
            await asyncio.wait_for(tunnel.connected(), 10)
            await tunnel.write(b"g")
            got = bytearray()
            while chunk := await asyncio.wait_for(tunnel.read(), 10):
                got += chunk
        finally:
            await tunnel.close()
        block = hashlib.sha256(b"seed").digest() * 4096
        assert bytes(got) == b"".join(bytes([i]) + block for i in range(96))
    finally:
        await sandbox.terminate(handle.pid, grace=1)


async def test_a_restarted_server_gets_back_in(sandbox: DockerSandbox, data_dir: Path) -> None:
    handle = await sandbox.spawn("sleep 60")
    await sandbox.close()  # the server goes; the container runs on
    info = await sandbox._engine.docker.containers.container(sandbox.id).show()
    again = _provider(info["Config"]["Labels"]["crogia.instance"], data_dir)
    try:
        back = await again.attach(sandbox.spec, sandbox.id)
        assert back.id == sandbox.id and back._cert.strip() == sandbox._cert.strip()
        assert any(p.pid == handle.pid and p.running for p in await back.processes()), "it was restarted"
        await back.close()
    finally:
        await again.close()


async def test_through_the_server(data_dir: Path) -> None:
    need_docker()
    settings = make_settings(
        data_dir, "docker", sandbox_transport="tcp", docker_workspace="volume", sandbox_files="daemon",
        sandbox_tcp_tls=True,
        sandbox_pool_size=1,
    )  # fmt: skip
    try:
        async with run_server(settings) as server:
            health = (await server.client.get("/api/health")).json()
            assert health["transport"] == "tcp+tls"
            sid = (await server.client.post("/api/sessions", json={})).json()["session_id"]
            assert (await shell(server.client, sid, "echo kept > k; cat k"))["output"] == "kept\n"
            live = server.runtime.sessions.peek(sid)
            assert live is not None and await server.runtime.sessions.sleep(live, idle_for=0)
            assert (await shell(server.client, sid, "cat k; seq 3"))["output"] == "kept\n1\n2\n3\n"
            assert (await server.client.delete(f"/api/sessions/{sid}")).status_code in (200, 204)
    finally:
        remove_containers_of(data_dir)
