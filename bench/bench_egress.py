"""A sandbox's first outbound TCP connect through the isolated egress path, against a direct one.

A "public" test host (a network namespace at a TEST-NET-3 address, as the tests use) listens;
each round times, in a fresh process, `socket.create_connection` to it:

* ours: inside a fresh isolated sandbox (bubblewrap: pasta plus the namespace's rules; Docker:
  Crogia's bridge plus its nftables fence), the sandbox's first connection;
* today's path: the same in a sandbox on the old shared network (host netns / default bridge);
* direct: the same script run on the host.

Rounds interleave; medians are compared. Target: ours adds <= 5 ms to direct.

A second row per backend: an egress policy's cost on a connection's set-up (issue 13). Each
round, in a fresh isolated sandbox, one process resolves a name (through the sandbox's resolver,
the gate) and connects to the address: under `allow` with that name listed (the gate adds the
address to the sandbox's allowed set before it answers) against the default `internet`.
Target: `allow` adds <= 5 ms. Needs root (it makes the namespace). Writes bench/results/egress.json.
Usage: `python bench/bench_egress.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

from _common import ROOT, Row, backends, data_dir, parse_args, report

sys.path.insert(0, str(ROOT))
from tests.support.netns_hosts import netns_host

from crogia.sandbox.base import HostStorage, Limits, SandboxProvider, SandboxSpec
from crogia.sandbox.egress import EgressPolicy

TARGET_MS = 5.0
NAME = "bench.crogia.test"
RESOLVE_TIMER = (
    "import socket, sys, time; t = time.perf_counter(); a = socket.gethostbyname(sys.argv[1]); "
    "socket.create_connection((a, 8080), 5).close(); print(time.perf_counter() - t)"
)
TIMER = (
    "import socket, sys, time; t = time.perf_counter(); "
    "socket.create_connection((sys.argv[1], 8080), 5).close(); print(time.perf_counter() - t)"
)


def provider(backend: str, dns: str = "") -> SandboxProvider:
    if backend == "docker":
        from crogia.sandbox.docker import DockerProvider

        return DockerProvider(instance="bench-egress", dns=dns)
    from crogia.sandbox.bubblewrap import BubblewrapProvider

    return BubblewrapProvider(dns=dns)


async def in_sandbox(prov: SandboxProvider, folder: Path, network: str, host: str, n: int) -> float:
    prov.storage = HostStorage(folder / "w", folder / "s")
    spec = SandboxSpec(f"egress-{network}-{n}", limits=Limits(network=network))
    sandbox = await prov.create(spec)
    try:
        result = await sandbox.exec(f"python3 -c '{TIMER}' {host}", timeout=30, max_output=4096)
        return float(result.output.strip())
    finally:
        await prov.remove(sandbox.id)


async def with_policy(prov: SandboxProvider, folder: Path, policy: EgressPolicy, n: int) -> float:
    tag = f"{policy.egress}{n}"
    prov.storage = HostStorage(folder / "w", folder / "s")
    spec = SandboxSpec(f"egress-{tag}", egress=policy)
    sandbox = await prov.create(spec)
    try:
        result = await sandbox.exec(f"python3 -c '{RESOLVE_TIMER}' {NAME}", timeout=30, max_output=4096)
        return float(result.output.strip())
    finally:
        await prov.remove(sandbox.id)


async def measure_policy(backend: str, dns: str, rounds: int) -> Row:
    prov = provider(backend, dns)
    times: dict[str, list[float]] = {"allow": [], "internet": []}
    try:
        with data_dir() as folder:
            for n in range(rounds):
                times["allow"].append(await with_policy(prov, folder, EgressPolicy("allow", (NAME,)), n))
                times["internet"].append(await with_policy(prov, folder, EgressPolicy(), n))
    finally:
        await prov.close()
    p50 = {key: statistics.median(values) * 1000 for key, values in times.items()}
    added = p50["allow"] - p50["internet"]
    return Row(
        f"resolve + first connect under an allow policy, {backend}",
        round(p50["allow"], 2),
        "ms",
        f"<= internet + {TARGET_MS:g} ms",
        added <= TARGET_MS,
        round(p50["internet"], 2),
        "same under the default (internet)",
        extra={"added_ms": round(added, 2)},
    )


async def direct(host: str) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TIMER, host, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return float(out.decode().strip())


async def measure(backend: str, host: str, rounds: int) -> Row:
    prov = provider(backend)
    times: dict[str, list[float]] = {"ours": [], "shared": [], "direct": []}
    shared = "shared" if backend == "bubblewrap" else "bridge"
    try:
        with data_dir() as folder:
            for n in range(rounds):
                times["ours"].append(await in_sandbox(prov, folder, "isolated", host, n))
                times["shared"].append(await in_sandbox(prov, folder, shared, host, n))
                times["direct"].append(await direct(host))
    finally:
        await prov.close()
    p50 = {key: statistics.median(values) * 1000 for key, values in times.items()}
    added = p50["ours"] - p50["direct"]
    extra = {"today_path_ms": round(p50["shared"], 2), "added_ms": round(added, 2)}
    target = f"<= direct + {TARGET_MS:g} ms"
    what = f"first TCP connect from a sandbox, {backend}"
    return Row(
        what,
        round(p50["ours"], 2),
        "ms",
        target,
        added <= TARGET_MS,
        round(p50["direct"], 2),
        "direct connect",
        extra=extra,
    )


async def main() -> None:
    args = parse_args(__doc__)
    rounds = 3 if args.smoke else 15
    async with netns_host("203.0.113.0/24", dns={NAME: "self"}) as host:
        rows = []
        for backend in backends():
            rows.append(await measure(backend, host.address, rounds))
            rows.append(await measure_policy(backend, host.address, rounds))
    started = time.strftime("%H:%M:%S")
    report("egress", rows, smoke=args.smoke, started=started)


if __name__ == "__main__":
    asyncio.run(main())
