"""Per-session egress policies (issue 13 item 3) allow and refuse exactly what they say, both backends.

Through a real server process. Two "public" test hosts in network namespaces made here (TEST-NET-3
and TEST-NET-2 addresses), the first also the sandboxes' DNS server (`SANDBOX_DNS`), which knows
`alpha` (-> the first host), `beta` and `one.wild` (-> the second). Every probe runs inside a
sandbox through `POST /shell`, bounded (2 s to connect); a refused connection must be REFUSED (a
reset), never a TIMEOUT. Traffic goes only to loopback and those namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import remove_containers_of
from tests.hostile.test_network import ASK, PROBE, need_netns
from tests.support.netns_hosts import NetnsHost, netns_host
from tests.support.subprocess_server import ServerProcess

ALPHA, BETA, WILD = "alpha.crogia.test", "beta.crogia.test", "one.wild.crogia.test"
RESOLVE = """import socket, sys
try: print(socket.gethostbyname(sys.argv[1]))
except OSError as e: print("NONAME", e)"""


@dataclass
class Egress:
    server: ServerProcess
    client: httpx.AsyncClient
    a: NetnsHost
    b: NetnsHost

    async def session(self, network: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"task": "egress"} | ({"network": network} if network is not None else {})
        reply = await self.client.post("/api/sessions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["network"] == (network or {"egress": "internet", "allow": []})
        sid = str(reply.json()["session_id"])
        await self.prepare(sid)
        return sid

    async def prepare(self, sid: str) -> None:
        await self.run(sid, f"cat > /tmp/probe.py <<'EOF'\n{PROBE}\nEOF")
        await self.run(sid, f"cat > /tmp/resolve.py <<'EOF'\n{RESOLVE}\nEOF")

    async def run(self, sid: str, cmd: str) -> str:
        reply = await self.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd, "timeout": 30})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["output"]).strip()

    async def probe(self, sid: str, host: str) -> str:
        return await self.run(sid, f"python3 /tmp/probe.py {host} 8080")

    async def resolve(self, sid: str, name: str) -> str:
        return await self.run(sid, f"python3 /tmp/resolve.py {name}")


@pytest.fixture
async def egress(data_dir: Path, backend: str) -> AsyncIterator[Egress]:
    need_netns()
    async with netns_host("198.51.100.0/24") as b, contextlib.AsyncExitStack() as stack:
        names = {ALPHA: "self", BETA: b.address, WILD: b.address}
        a = await stack.enter_async_context(netns_host("203.0.113.0/24", dns=names))
        env = {
            "BASE_DIRECTORY": str(data_dir),
            "SANDBOX_BACKEND": backend,
            "SANDBOX_NETWORK": "isolated",
            "SANDBOX_DNS": a.address,
            "SANDBOX_POOL_SIZE": "1",  # a pooled sandbox gets its policy when claimed
            "OPENAI_API_KEY": "test",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "SESSION_IDLE_TTL": "0",
        }
        server = ServerProcess(data_dir, env)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
                yield Egress(server, client, a, b)
        finally:
            await server.stop()
            if backend == "docker":
                await asyncio.to_thread(remove_containers_of, data_dir)


async def test_allow_a_cidr(egress: Egress) -> None:
    sid = await egress.session({"egress": "allow", "allow": [f"{egress.a.address}/32"]})
    assert await egress.probe(sid, egress.a.address) == "OPEN crogia-test-host"
    assert await egress.probe(sid, egress.b.address) == "REFUSED"  # fast: a reset, not a hang
    assert (await egress.resolve(sid, ALPHA)).startswith("NONAME")  # names: none listed


async def test_allow_a_name_reaches_what_it_resolves_to(egress: Egress) -> None:
    sid = await egress.session({"egress": "allow", "allow": [ALPHA]})
    assert await egress.probe(sid, egress.a.address) == "REFUSED"  # not before the sandbox resolved it
    assert await egress.probe(sid, ALPHA) == "OPEN crogia-test-host"
    assert await egress.probe(sid, egress.a.address) == "OPEN crogia-test-host"  # its address, now
    assert await egress.probe(sid, egress.b.address) == "REFUSED"
    assert (await egress.resolve(sid, BETA)).startswith("NONAME")
    assert (await egress.resolve(sid, f"x.{ALPHA}")).startswith("NONAME")  # a name is not its subtree


async def test_allow_a_wildcard(egress: Egress) -> None:
    sid = await egress.session({"egress": "allow", "allow": ["*.wild.crogia.test"]})
    assert await egress.probe(sid, WILD) == "OPEN crogia-test-host"
    assert (await egress.resolve(sid, ALPHA)).startswith("NONAME")
    assert (await egress.resolve(sid, "wild.crogia.test")).startswith("NONAME")  # below it only
    assert await egress.probe(sid, egress.a.address) == "REFUSED"


async def test_none_reaches_nothing(egress: Egress) -> None:
    sid = await egress.session({"egress": "none", "allow": []})
    for host in (egress.a.address, egress.b.address):
        assert await egress.probe(sid, host) == "REFUSED"
    assert (await egress.resolve(sid, ALPHA)).startswith("NONAME")


async def test_patch_changes_a_live_policy_for_new_connections(egress: Egress) -> None:
    sid = await egress.session()
    assert await egress.probe(sid, egress.b.address) == "OPEN crogia-test-host"
    policy = {"egress": "allow", "allow": [ALPHA, f"{egress.a.address}/32"]}
    reply = await egress.client.patch(f"/api/sessions/{sid}", json={"network": policy})
    assert reply.status_code == 200, reply.text
    assert reply.json()["network"] == policy
    assert (await egress.client.get(f"/api/sessions/{sid}")).json()["network"] == policy
    assert await egress.probe(sid, egress.b.address) == "REFUSED"
    assert await egress.probe(sid, egress.a.address) == "OPEN crogia-test-host"
    reply = await egress.client.patch(f"/api/sessions/{sid}", json={"network": {"egress": "internet"}})
    assert reply.status_code == 200, reply.text
    assert await egress.probe(sid, egress.b.address) == "OPEN crogia-test-host"


async def test_the_policy_survives_a_server_restart(egress: Egress) -> None:
    """Stored with the session: a re-attached container (Docker) or a re-made sandbox (bubblewrap)
    is fenced again before it runs anything."""
    policy = {"egress": "allow", "allow": [ALPHA]}
    sid = await egress.session(policy)
    await egress.server.stop()
    await egress.server.start()
    assert (await egress.client.get(f"/api/sessions/{sid}")).json()["network"] == policy
    await egress.prepare(sid)
    assert await egress.probe(sid, egress.b.address) == "REFUSED"
    assert await egress.probe(sid, ALPHA) == "OPEN crogia-test-host"
    assert (await egress.resolve(sid, BETA)).startswith("NONAME")


async def test_refused_names_are_reported_and_bounded(egress: Egress) -> None:
    sid = await egress.session({"egress": "allow", "allow": [ALPHA]})
    assert await egress.probe(sid, egress.b.address) == "REFUSED"  # reported as address:port
    loop = (
        f"import socket\nfor i in range(30):\n    try: socket.gethostbyname('{BETA}')\n    except OSError: 0"
    )
    await egress.run(sid, f'python3 -c "{loop}"')
    marker = await egress.client.post(f"/api/sessions/{sid}/processes", json={"cmd": "true"})
    assert marker.status_code == 200, marker.text
    blocked: list[dict[str, Any]] = []
    async with websockets.connect(f"{egress.server.ws_url}/ws/{sid}?since=0") as ws:
        async with asyncio.timeout(30):
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "egress_blocked":
                    blocked.append(event)
                if event["type"] == "process_started":
                    break
    assert blocked[0]["destination"] == f"{egress.b.address}:8080", [e["destination"] for e in blocked]
    assert len(blocked) > 1 and all(e["destination"] == BETA for e in blocked[1:])
    assert len(blocked) <= 10  # rate-limited: 30 refusals (x2 queries each) in one window


async def test_no_resolver_but_the_gate(egress: Egress) -> None:
    """A hostile sandbox asks other resolvers directly (the upstream one, Docker's, pasta's): no
    answer from any; the gate answers a refused name NXDOMAIN and leaks nothing upstream."""
    sid = await egress.session({"egress": "allow", "allow": [ALPHA]})
    await egress.run(sid, f"cat > /tmp/ask.py <<'EOF'\n{ASK}\nEOF")
    # (first: the upstream resolver is also alpha's address, which resolving alpha allows)
    for server in (egress.a.address, "127.0.0.11", "10.0.2.3", egress.b.address):
        result = await egress.run(sid, f"python3 /tmp/ask.py {BETA} {server}")
        assert result.startswith("NOREPLY"), (server, result)
    assert await egress.run(sid, f"python3 /tmp/ask.py {ALPHA} 127.0.0.53") == "RCODE 0 ANSWERS 1"
    assert await egress.run(sid, f"python3 /tmp/ask.py {BETA} 127.0.0.53") == "RCODE 3 ANSWERS 0"
    # Nor can it take the gate's place: its port is bound (root or not, reuse or not).
    bind = "import socket; s = socket.socket(2, 2); s.setsockopt(1, 15, 1); s.bind(('127.0.0.53', 53))"
    assert "BOUND" not in await egress.run(sid, f'python3 -c "{bind}" 2>&1 && echo BOUND')


async def test_a_query_flood_costs_the_sandbox_only(egress: Egress) -> None:
    """20 000 queries as fast as it can send them: the gate drops what is over its rate, the server
    keeps answering, and the sandbox's next lookup works."""
    sid = await egress.session()
    await egress.run(sid, f"cat > /tmp/ask.py <<'EOF'\n{ASK}\nEOF")
    flood = (
        "import socket, struct\ns = socket.socket(2, 2)\ns.setblocking(False)\n"
        "q = struct.pack('!HHHHHH', 1, 256, 1, 0, 0, 0) + b'\\x04junk\\x04test\\x00\\x00\\x01\\x00\\x01'\n"
        "for i in range(20000):\n    try: s.sendto(q, ('127.0.0.53', 53))\n    except OSError: pass\n"
    )
    await egress.run(sid, f"cat > /tmp/flood.py <<'EOF'\n{flood}\nEOF")
    running = asyncio.create_task(egress.run(sid, "python3 /tmp/flood.py; echo flooded"))
    async with asyncio.timeout(5):
        assert (await egress.client.get("/api/health")).status_code == 200
    assert await running == "flooded"
    deadline = asyncio.get_running_loop().time() + 10  # the bucket refills at 200 queries/s
    while (result := await egress.run(sid, f"python3 /tmp/ask.py {ALPHA} 127.0.0.53")) != "RCODE 0 ANSWERS 1":
        assert asyncio.get_running_loop().time() < deadline, result


BAD = [
    ({"egress": "allow", "allow": ["not a host!"]}, "not a host!"),
    ({"egress": "allow", "allow": ["10.0.0.0/8"]}, "10.0.0.0/8"),
    ({"egress": "allow", "allow": ["127.0.0.1"]}, "127.0.0.1"),
    ({"egress": "allow", "allow": ["0.0.0.0/0"]}, "0.0.0.0/0"),
    ({"egress": "allow", "allow": ["fe80::1"]}, "fe80::1"),
    ({"egress": "allow", "allow": ["*."]}, "*."),
    ({"egress": "allow", "allow": ["a." * 130 + "com"]}, "a.a.a"),
    ({"egress": "allow", "allow": [f"h{i}.example.com" for i in range(257)]}, "256"),
    ({"egress": "internet", "allow": ["pypi.org"]}, "allow"),
    ({"egress": "everything"}, "egress"),
    ({"egress": "allow", "allow": "pypi.org"}, "allow"),
]


async def test_bad_policies_are_422(egress: Egress) -> None:
    sid = await egress.session()
    for network, named in BAD:
        reply = await egress.client.post("/api/sessions", json={"task": "bad", "network": network})
        assert reply.status_code == 422, (network, reply.text)
        assert named in reply.text, (named, reply.text)
        reply = await egress.client.patch(f"/api/sessions/{sid}", json={"network": network})
        assert reply.status_code == 422, (network, reply.text)
    assert [s["session_id"] for s in (await egress.client.get("/api/sessions")).json()] == [sid]
    assert (await egress.client.get(f"/api/sessions/{sid}")).json()["network"]["egress"] == "internet"
