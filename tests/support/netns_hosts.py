"""Test hosts in network namespaces the test creates itself, for the network isolation tests.

`netns_host()` makes a netns joined to the host by a veth pair, with a /30 routed to it (the host end
holds the first address, the namespace the second), and runs `serve()` of this module inside it:
a TCP listener that greets every client, optionally a tiny DNS server answering A queries for a
few names. Everything is removed on exit, whatever happened. Run as a script, the module is that
server (`python -m tests.support.netns_hosts --tcp PORT [--dns NAME=IP ...]`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GREETING = b"crogia-test-host\n"
LOCK = "/tmp"
"""What `_claim` locks: a folder every test process sees, and one that leaves no lock file behind."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def free_subnet(prefix: str) -> ipaddress.IPv4Network:
    """A random /30 inside `prefix` that no route on the host covers yet."""
    pool = list(ipaddress.ip_network(prefix).subnets(new_prefix=30))
    for _ in range(50):
        net = secrets.choice(pool)
        route = _ip("route", "show", "match", str(net)).stdout
        if all(line.startswith("default") for line in route.splitlines()):
            return net
    raise RuntimeError(f"no free /30 in {prefix}")


@dataclass
class NetnsHost:
    """A namespace at `address` (the host end of its veth is `host_address`)."""

    name: str
    address: str
    host_address: str
    port: int
    proc: asyncio.subprocess.Process | None = None


@contextlib.asynccontextmanager
async def netns_host(
    prefix: str, *, port: int = 8080, dns: Mapping[str, str] | None = None
) -> AsyncIterator[NetnsHost]:
    """A namespace with a greeting listener on `port` (and DNS on 53 for `dns`; address "self": its own)."""
    tag = secrets.token_hex(3)
    host = NetnsHost(f"cgt-{tag}", "", "", port)
    veth, peer = f"cgth{tag}", f"cgtn{tag}"
    try:
        host.host_address, host.address = await asyncio.to_thread(_claim, prefix, host.name, veth, peer)
        ns_ip = host.address
        argv = ["ip", "netns", "exec", host.name, sys.executable, "-m", "tests.support.netns_hosts"]
        argv += [
            "--tcp",
            str(port),
            *[f"--dns={n}={ns_ip if a == 'self' else a}" for n, a in (dns or {}).items()],
        ]
        host.proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        assert host.proc.stdout is not None
        line = await asyncio.wait_for(host.proc.stdout.readline(), 20)
        assert line == b"ready\n", line
        yield host
    finally:
        if host.proc is not None and host.proc.returncode is None:
            host.proc.kill()
            await host.proc.wait()
        await asyncio.to_thread(_unplumb, host.name, veth)


def _claim(prefix: str, ns: str, veth: str, peer: str) -> tuple[str, str]:
    """Pick a free /30 and route it to a new namespace: (host address, namespace address).

    Under a lock shared by every test process on the machine (pytest-xdist workers, other runs):
    two of them picking the same free /30 at once would both route it.
    """
    lock = os.open(LOCK, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the close
        net = free_subnet(prefix)
        host_ip, ns_ip = (str(a) for a in list(net.hosts())[:2])
        _plumb(ns, veth, peer, net, host_ip, ns_ip)
    finally:
        os.close(lock)
    return host_ip, ns_ip


def _plumb(ns: str, veth: str, peer: str, net: ipaddress.IPv4Network, host_ip: str, ns_ip: str) -> None:
    _ip("netns", "add", ns)
    _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
    _ip("link", "set", peer, "netns", ns)
    _ip("addr", "add", f"{host_ip}/30", "dev", veth)
    _ip("link", "set", veth, "up")
    _ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", peer)
    _ip("-n", ns, "link", "set", peer, "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "route", "add", "default", "via", host_ip)


def _unplumb(ns: str, veth: str) -> None:
    # Deleting one end of a veth deletes both, and with it the /30's route.
    _ip("link", "del", veth, check=False)
    _ip("netns", "del", ns, check=False)


def dns_answer(query: bytes, names: Mapping[str, str]) -> bytes | None:
    """A reply to a one-question DNS query: the A record of a known name, else NXDOMAIN."""
    if len(query) < 12:
        return None
    qid, _flags, qdcount = struct.unpack("!HHH", query[:6])
    labels, pos = [], 12
    while pos < len(query) and query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode(errors="replace"))
        pos += 1 + query[pos]
    question = query[12 : pos + 5]
    qtype = struct.unpack("!H", query[pos + 1 : pos + 3])[0] if pos + 3 <= len(query) else 0
    address = names.get(".".join(labels).lower())
    if qdcount != 1:
        return None
    if address is None:
        return struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question
    if qtype != 1:  # the name exists, but has only an A record
        return struct.pack("!HHHHHH", qid, 0x8180, 1, 0, 0, 0) + question
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + record


def _serve_dns(names: Mapping[str, str]) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 53))

    def loop() -> None:
        while True:
            query, peer = udp.recvfrom(4096)
            reply = dns_answer(query, names)
            if reply is not None:
                udp.sendto(reply, peer)

    threading.Thread(target=loop, daemon=True).start()


def serve(port: int, names: Mapping[str, str]) -> None:
    """Greet every TCP client on `port`; answer DNS for `names`; say `ready` once listening."""
    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)
    if names:
        _serve_dns(names)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(GREETING)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", type=int, required=True)
    parser.add_argument("--dns", action="append", default=[])
    args = parser.parse_args()
    serve(args.tcp, dict(item.split("=", 1) for item in args.dns))
