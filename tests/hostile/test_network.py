"""A sandbox reaches the public internet and nothing else (issue 10 item 4), on both backends.

Through a real server process. The "internet" is a test host in a network namespace made here,
at a TEST-NET-3 address (public as far as any rule knows), with a DNS server the sandboxes use
(`SANDBOX_DNS`); the private test host sits in 10/8. Every probe runs inside a sandbox through
`POST /shell` and is bounded (2 s to connect). Traffic goes only to loopback and those namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from crogia.sandbox import instance_id
from tests.conftest import IN_CI, make_settings, remove_containers_of
from tests.support.netns_hosts import NetnsHost, netns_host
from tests.support.postgres import free_port
from tests.support.subprocess_server import ServerProcess

NAME = "public.crogia.test"
# The head of the scripts below: `gateway()`, the sandbox's default gateway (the target "GW").
GATEWAY = r"""
import socket, sys
def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
"""
# Prints OPEN (with what the peer said, if anything, within 1 s), or why not: REFUSED, TIMEOUT, ...
PROBE = (
    GATEWAY
    + r"""
host, port = sys.argv[1], int(sys.argv[2])
host = gateway() if host == "GW" else host
try:
    s = socket.create_connection((host, port), timeout=2)
except ConnectionRefusedError: print("REFUSED"); sys.exit()
except (TimeoutError, socket.timeout): print("TIMEOUT"); sys.exit()
except OSError as e: print("FAILED", e); sys.exit()
s.settimeout(1)
try: data = s.recv(64)
except OSError: data = b""
print("OPEN", data.decode(errors="replace").strip())
"""
)

# Asks `argv[2]`'s port 53 over UDP for `argv[1]` (an A query): RCODE and ANSWERS, or NOREPLY.
ASK = r"""
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(q, (server, 53))
    r = s.recv(512)
    print("RCODE", r[3] & 15, "ANSWERS", struct.unpack("!H", r[6:8])[0])
except OSError as e:
    print("NOREPLY", type(e).__name__)
"""
LISTEN = (
    "import socket; s = socket.create_server(('0.0.0.0', {port})); print('listening', flush=True)\n"
    "while True: c, _ = s.accept(); c.sendall(b'sandbox-listener\\n'); c.close()"
)


@dataclass
class Net:
    server: ServerProcess
    client: httpx.AsyncClient
    public: NetnsHost
    private: NetnsHost

    async def session(self) -> str:
        reply = await self.client.post("/api/sessions", json={"task": "net"})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["session_id"])

    async def run(self, sid: str, cmd: str) -> str:
        reply = await self.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd, "timeout": 30})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["output"]).strip()

    async def wait_log(self, sid: str, pid: int, text: str, within: float = 30) -> None:
        """Wait until a background process's log shows `text`."""
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            logs = await self.client.get(f"/api/sessions/{sid}/processes/{pid}/logs")
            if text in logs.json().get("logs", ""):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"process {pid} never logged {text!r}")

    async def probe(self, sid: str, host: str, port: int) -> str:
        await self.run(sid, f"cat > /tmp/probe.py <<'EOF'\n{PROBE}\nEOF")
        return await self.run(sid, f"python3 /tmp/probe.py {host} {port}")


@pytest.fixture
async def hosts() -> AsyncIterator[tuple[NetnsHost, NetnsHost]]:
    need_netns()
    async with (
        netns_host("203.0.113.0/24", dns={NAME: "self"}) as public,
        netns_host("10.213.0.0/16") as private,
    ):
        yield public, private


def need_netns() -> None:
    """These tests make network namespaces: they need root and `ip`; under CI they must run."""
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        if IN_CI:
            pytest.fail("network isolation tests need root and iproute2 under CI")
        pytest.skip("network isolation tests need root and iproute2")


@contextlib.asynccontextmanager
async def running(
    data_dir: Path, backend: str, hosts: tuple[NetnsHost, NetnsHost], network: str
) -> AsyncIterator[Net]:
    env = {
        "BASE_DIRECTORY": str(data_dir),
        "SANDBOX_BACKEND": backend,
        "SANDBOX_NETWORK": network,
        "SANDBOX_DNS": hosts[0].address,
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "LOG_LEVEL": "INFO",
        "SESSION_IDLE_TTL": "0",
    }
    server = ServerProcess(data_dir, env)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            yield Net(server, client, *hosts)
    finally:
        await server.stop()
        if backend == "docker":
            await asyncio.to_thread(remove_containers_of, data_dir)  # and their network, its rules


@pytest.fixture
async def net(data_dir: Path, backend: str, hosts: tuple[NetnsHost, NetnsHost]) -> AsyncIterator[Net]:
    async with running(data_dir, backend, hosts, "isolated") as value:
        yield value


@contextlib.asynccontextmanager
async def host_listener() -> AsyncIterator[int]:
    """A TCP service on the host's 0.0.0.0 (so on loopback and on every host address)."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"host-service\n")
        writer.close()

    port = free_port()
    server = await asyncio.start_server(greet, "0.0.0.0", port)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


async def test_public_host_and_dns_work(net: Net) -> None:
    sid = await net.session()
    assert await net.probe(sid, net.public.address, net.public.port) == "OPEN crogia-test-host"
    assert await net.probe(sid, NAME, net.public.port) == "OPEN crogia-test-host"
    health = (await net.client.get("/api/health")).json()
    assert health["network"] == "isolated"


async def test_host_private_and_metadata_unreachable(net: Net) -> None:
    sid = await net.session()
    async with host_listener() as port:
        targets = [
            ("127.0.0.1", net.server.port),  # the server's own API
            ("127.0.0.1", port),  # another loopback service
            ("GW", port),  # the host through the sandbox's gateway
            (net.public.host_address, port),  # the host through one of its own (public) addresses
            (net.private.address, net.private.port),  # a private-range host
            ("169.254.169.254", 80),  # cloud metadata
        ]
        for host, target_port in targets:
            result = await net.probe(sid, host, target_port)
            assert not result.startswith("OPEN"), (host, target_port, result)


async def test_other_sandbox_and_host_ports_unreachable(net: Net) -> None:
    a, b = await net.session(), await net.session()
    port = free_port()
    started = await net.client.post(
        f"/api/sessions/{a}/processes", json={"cmd": f'python3 -c "{LISTEN.format(port=port)}"'}
    )
    assert started.status_code == 200, started.text
    await net.wait_log(a, int(started.json()["pid"]), "listening")
    assert await net.probe(a, "127.0.0.1", port) == "OPEN sandbox-listener"  # it does listen
    own = "import socket; s = socket.socket(2, 2); s.connect(('203.0.113.1', 9)); print(s.getsockname()[0])"
    a_addr = await net.run(a, f'python3 -c "{own}"')
    for host in ("127.0.0.1", a_addr):  # on isolated bubblewrap, a_addr is b's own address too
        result = await net.probe(b, host, port)
        assert not result.startswith("OPEN sandbox-listener"), (host, result)
    # Nor is the sandbox's port reachable from the host.
    with pytest.raises((ConnectionRefusedError, TimeoutError)):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)


async def test_none_cuts_everything(data_dir: Path, backend: str, hosts: tuple[NetnsHost, NetnsHost]) -> None:
    async with running(data_dir, backend, hosts, "none") as net:
        sid = await net.session()
        assert not (await net.probe(sid, net.public.address, net.public.port)).startswith("OPEN")
        assert not (await net.probe(sid, NAME, net.public.port)).startswith("OPEN")
        assert (await net.client.get("/api/health")).json()["network"] == "none"


async def test_a_killed_servers_namespaces_are_removed(
    data_dir: Path, hosts: tuple[NetnsHost, NetnsHost]
) -> None:
    """bubblewrap: after a kill -9, the next server deletes the namespaces (and so the pastas) left."""
    scope = instance_id(make_settings(data_dir, "bubblewrap"))
    prefix = f"crogia-{scope}-"
    async with running(data_dir, "bubblewrap", hosts, "isolated") as net:
        await net.session()
        left = [name for name in os.listdir("/run/netns") if name.startswith(prefix)]
        assert left  # the session's namespace and the stock
        await net.server.kill()
        await net.server.start()
        sid = await net.session()
        assert (await net.probe(sid, net.public.address, net.public.port)).startswith("OPEN")
        assert not set(left) & set(os.listdir("/run/netns"))


def test_old_values_are_accepted_and_reported_shared(caplog: pytest.LogCaptureFixture) -> None:
    from crogia.sandbox.network import describe, warn_if_shared

    assert [describe(v) for v in ("isolated", "none")] == ["isolated", "none"]
    for value in ("bridge", "host", "my-net"):
        assert describe(value) == "shared (not isolated)"
        with caplog.at_level("WARNING"):
            warn_if_shared(value)
        assert f"SANDBOX_NETWORK={value} is not isolated" in caplog.text


# Connects for `seconds` to each target as fast as refusals come back; prints how many got through.
HAMMER = (
    GATEWAY
    + r"""
import time
pairs = (t.split(":") for t in sys.argv[2:])
seconds, targets = float(sys.argv[1]), [(gateway() if h == "GW" else h, int(p)) for h, p in pairs]
tries = opened = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for target in targets:
        tries += 1
        try:
            socket.create_connection(target, timeout=0.3).close()
            opened += 1
        except OSError:
            pass
print(tries, opened)
"""
)


@pytest.mark.parametrize("backend", [pytest.param("docker", marks=pytest.mark.docker)], indirect=True)
async def test_the_fence_has_no_gap_while_the_engine_or_a_restart_rewrites_rules(
    data_dir: Path, backend: str, hosts: tuple[NetnsHost, NetnsHost]
) -> None:
    """Docker re-inserts its `FORWARD -> DOCKER-USER` jump (delete, then insert) whenever anyone makes
    a network on the engine, and a restarted server reloads its own fence: a sandbox hammering a
    private host and the host itself must get through in neither moment."""
    from crogia.sandbox.docker_network import install_rules, tag_of

    tag = tag_of(instance_id(make_settings(data_dir, "docker")))
    async with running(data_dir, backend, hosts, "isolated") as net, host_listener() as port:
        sid = await net.session()
        await net.run(sid, f"cat > /tmp/hammer.py <<'EOF'\n{HAMMER}\nEOF")
        targets = f"{net.private.address}:{net.private.port} GW:{port}"
        hammer = asyncio.create_task(net.run(sid, f"python3 /tmp/hammer.py 12 {targets}"))

        def churn() -> int:
            made = 0
            while not hammer.done() and made < 40:
                name = f"cgt-churn-{secrets.token_hex(3)}"
                subprocess.run(["docker", "network", "create", name], capture_output=True, timeout=60)
                subprocess.run(["docker", "network", "rm", name], capture_output=True, timeout=60)
                install_rules(tag, f"crg{tag}")  # what a restarted server does
                made += 1
            return made

        made = await asyncio.to_thread(churn)
        tries, opened = map(int, (await hammer).split())
        assert made >= 3 and tries > 100, (made, tries)  # the engine did rewrite, the sandbox kept trying
        assert opened == 0, f"{opened} of {tries} connections got through while {made} networks were made"


async def test_a_private_resolver_serves_the_gate_but_is_unreachable_itself(
    data_dir: Path, backend: str
) -> None:
    """The host's resolver on a private address (a router's, a cloud network's): a sandbox's names
    resolve through its gate, which asks from the server's side, but the resolver itself (its
    port 53 included: Docker's fence let DNS to it through once) is as unreachable as any private host."""
    need_netns()
    name = "private.crogia.test"
    async with (
        netns_host("10.213.0.0/16", dns={name: "self"}) as resolver,
        netns_host("203.0.113.0/24") as public,
        running(data_dir, backend, (resolver, public), "isolated") as net,  # SANDBOX_DNS: resolver
    ):
        sid = await net.session()
        lookup = f"python3 -c \"import socket; print(socket.gethostbyname('{name}'))\""
        assert await net.run(sid, lookup) == resolver.address  # through the gate
        await net.run(sid, f"cat > /tmp/ask.py <<'EOF'\n{ASK}\nEOF")  # straight to it, past the gate
        asked = await net.run(sid, f"python3 /tmp/ask.py {name} {resolver.address}")
        assert asked.startswith("NOREPLY"), asked
