"""A bubblewrap sandbox's own network namespace: firewall first, then pasta for egress.

Order: `ip netns add` makes an empty namespace (loopback only); nftables rules are loaded
inside it that reject every blocked destination (`crogia.sandbox.network`) and this host's own
addresses, then the session's egress chain (`crogia.sandbox.egress`); pasta attaches and
configures the interface; the server opens the sandbox's resolver (a `DnsGate` on the namespace's
loopback); only then is the namespace handed to a sandbox, whose `bwrap` is launched inside it
(`nsenter --net`, after the cgroup wrapper). `NetnsStock` keeps a few ready, off the start path.
The sandbox has no capability in that namespace (bwrap drops them all; with a user namespace
the netns belongs to the host's), so it can neither change the rules nor add routes.

pasta gives user-mode egress: the sandbox's packets become the host's own sockets, so the rules
above are what keeps it off the host: `--no-map-gw` stops the gateway from meaning the host's
loopback, `-t/-u/-T/-U none` forward no port either way; DNS does not go through pasta: the gate
asks the host's resolver (or `SANDBOX_DNS`) from the server, so a loopback resolver keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from crogia.errors import SandboxError, Unavailable
from crogia.sandbox.egress import (
    TABLE_PARTS,
    DnsGate,
    EgressPolicy,
    Element,
    NftLink,
    RefusalLog,
    chain_rules,
)
from crogia.sandbox.network import (
    BLOCKED_V4,
    BLOCKED_V6,
    DAEMON_PORT,
    GATEWAY,
    SANDBOX_ADDRESS,
    host_addresses,
    host_resolvers,
    replace_table,
)

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
_TIMEOUT = 20.0
_NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"  # absolute: the launch runs with an empty env


def _not_covered(addresses: list[str], ranges: tuple[str, ...]) -> list[str]:
    nets = [ipaddress.ip_network(r) for r in ranges]
    return sorted({a for a in addresses if not any(ipaddress.ip_address(a) in n for n in nets)})


def ruleset() -> str:
    """The nftables rules of a sandbox's namespace, with the host's addresses as of now (blocking)."""
    v4, v6 = host_addresses()
    host4, host6 = _not_covered(v4, BLOCKED_V4), _not_covered(v6, BLOCKED_V6)
    blocked = [f"ip daddr {{ {', '.join(BLOCKED_V4)} }}", f"ip6 daddr {{ {', '.join(BLOCKED_V6)} }}"]
    blocked += [f"ip daddr {{ {', '.join(host4)} }}"] if host4 else []
    blocked += [f"ip6 daddr {{ {', '.join(host6)} }}"] if host6 else []
    # The session's egress policy (crogia.sandbox.egress) comes after: it narrows, never widens.
    rejects = [f"{match} meta l4proto tcp reject with tcp reset\n{match} reject" for match in blocked]
    return "\n".join(
        [
            "table inet crogia {",
            *TABLE_PARTS,
            "chain output {",
            "type filter hook output priority 0; policy accept;",
            'oifname "lo" accept',
            *rejects,
            "jump egress",
            "}",
            "}",
        ]
    )


async def _run(*argv: str, data: bytes | None = None) -> None:
    """Run a set-up command to its exit (not to its pipes' end: pasta's background half keeps its
    stderr open, and a pipe there would be waited on for as long as pasta lives)."""
    err = await asyncio.to_thread(tempfile.TemporaryFile)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if data is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )
        except FileNotFoundError as exc:
            raise Unavailable(
                f"`{argv[0]}` is not installed: the isolated network needs it", command=argv[0]
            ) from exc
        try:
            await asyncio.wait_for(_feed_and_wait(proc, data), _TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            message = await asyncio.to_thread(_tail, err)
            raise SandboxError(f"{argv[0]} failed: {message}", command=argv[0])
    finally:
        await asyncio.to_thread(err.close)


async def _feed_and_wait(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
    if data is not None and proc.stdin is not None:
        try:
            proc.stdin.write(data)
            await proc.stdin.drain()
            proc.stdin.close()
        except (ConnectionError, RuntimeError):
            # It exited before reading it all (nsenter into a namespace already gone): its exit
            # status says why. asyncio raises a ConnectionError here, uvloop a RuntimeError.
            pass
    await proc.wait()


def _tail(file: Any) -> str:
    file.seek(0)
    return bytes(file.read()).decode(errors="replace").strip()[-500:]


DOCKER_TABLE = "\n".join(
    [
        "table inet crogia {",
        *TABLE_PARTS,
        "chain output {",
        "type filter hook output priority 0; policy accept;",
        "ip daddr 127.0.0.11 reject",  # Docker's embedded resolver: the gate is the only one
        'oifname "lo" accept',
        f"tcp sport {DAEMON_PORT} ct state established accept",  # the daemon's replies to the server
        "jump egress",
        "}",
        "}",
    ]
)
"""A Docker container's own table (the bridge's chains on the host keep the blocked ranges)."""


class EgressFence:
    """A namespace's egress policy: its `egress` chain and sets, and its resolver (`DnsGate`)."""

    def __init__(self, path: str, gate: DnsGate) -> None:
        self.path = path
        self.gate = gate
        """Its resolver, inside it (`crogia.sandbox.egress`): the egress policy's name half."""
        gate.add = self._add_elements
        self._link: NftLink | None = None
        self._log: RefusalLog | None = None

    async def _nft(self, batch: str) -> None:
        await _run(_NSENTER, f"--net={self.path}", "--", "nft", "-f", "-", data=batch.encode())

    async def open(self, table: str | None = None, policy: EgressPolicy | None = None) -> None:
        """Load `table` (`inet crogia`) with `policy`'s chain in one transaction if given, then open
        the gate in the namespace.

        A namespace Docker has just made holds no table of ours: `create table` (which fails, and
        so changes nothing, when one is there) spares the replace's delete, whose commit waits on
        the kernel (~13 ms of a 16 ms load here). A running container's namespace, fenced again
        after a restart, fails that and takes the replace; either way, one transaction."""
        if table is not None:
            policy = policy or EgressPolicy()
            rules = chain_rules(policy)
            try:
                await self._nft(f"create table inet crogia\n{table}\n{rules}")
            except SandboxError:
                await self._nft(replace_table("inet crogia", table) + rules)
            self._adopt(policy)
        await self.gate.open(self.path)
        self._link = await NftLink.open(self.path)
        self._log = await RefusalLog.open(self.path, self._refused)

    def _refused(self, destination: str) -> None:
        if self.gate.on_blocked is not None:
            self.gate.on_blocked(destination)

    async def set_policy(self, policy: EgressPolicy) -> None:
        """Load `policy` into the namespace's `egress` chain and sets (new connections follow it)."""
        await self._nft(chain_rules(policy))
        self._adopt(policy)

    def _adopt(self, policy: EgressPolicy) -> None:
        """The gate follows the policy just loaded (its sets were flushed with the chain)."""
        self.gate.forget()
        self.gate.policy = policy

    async def _add_elements(self, found: list[Element]) -> None:
        if self._link is None:
            raise SandboxError("the sandbox's egress fence is closed")
        await self._link.add(found)

    async def close(self) -> None:
        await self.gate.close()
        link, self._link = self._link, None
        if link is not None:
            link.close()
        refusals, self._log = self._log, None
        if refusals is not None:
            await refusals.close()


class SandboxNetns:
    """One sandbox's namespace and its pasta; `prepare`, launch into `enter_argv`, `attach`, `remove`."""

    def __init__(self, name: str, private_dir: Path, gate: DnsGate | None = None) -> None:
        self.name = name
        self.path = NETNS_DIR / name
        self._pidfile = private_dir / f"{name}.pasta.pid"
        self.fence = EgressFence(str(self.path), gate) if gate is not None else None

    @property
    def enter_argv(self) -> list[str]:
        """The launch step that runs the rest of the command line inside the namespace."""
        return [_NSENTER, f"--net={self.path}", "--"]

    async def prepare(self) -> None:
        """A fresh namespace with its rules loaded: nothing runs in it before this returns."""
        await self.remove()
        rules, _ = await asyncio.gather(asyncio.to_thread(ruleset), _run("ip", "netns", "add", self.name))
        await _run(*self.enter_argv, "nft", "-f", "-", data=rules.encode())

    async def attach(self) -> None:
        """Start pasta on the namespace; returns once the interface, address and routes are up."""
        argv = [
            "pasta",
            "--quiet",
            "--runas",
            "0",
            "--netns",
            str(self.path),
            "--config-net",
            "--pid",
            str(self._pidfile),
        ]
        argv += ["-t", "none", "-u", "none", "-T", "none", "-U", "none", "--no-map-gw"]
        argv += ["-a", SANDBOX_ADDRESS, "-n", "24", "-g", GATEWAY]
        await _run(*argv)  # pasta forks into the background once it has configured the namespace

    async def remove(self) -> None:
        """Delete the namespace (pasta then quits by itself) and make sure its pasta is gone."""
        if self.fence is not None:
            await self.fence.close()
        if await asyncio.to_thread(self.path.exists):
            await _run("ip", "netns", "del", self.name)
        pid = await asyncio.to_thread(_read_pid, self._pidfile)
        if pid:  # only if that pid is still a pasta: it may have exited and the pid been reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _read_pid(path: Path) -> int:
    """The pid in `path` (removed) if that process is still a pasta, else 0."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().strip())
        path.unlink()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        return pid if comm in ("pasta", "passt", "pasta.avx2", "passt.avx2") else 0
    return 0


def leftover_netns(scope: str) -> list[str]:
    """Namespaces an earlier server of this scope left behind (blocking)."""
    with contextlib.suppress(OSError):
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"crogia-{scope}-"))
    return []


class NetnsStock:
    """A few ready namespaces (rules loaded, pasta attached), so a sandbox start need not wait for one.

    Each is fresh (never used by another sandbox) and identical to the rest, so any serves any
    sandbox; a used one is deleted, never returned. Ones older than `max_age` are replaced, so
    their snapshot of this host's addresses stays recent. `take()` refills in the background.
    Once closed it makes none: a namespace made after its owner's last sweep would be nobody's.
    """

    def __init__(
        self, scope: str, private_dir: Path, dns: str = "", *, size: int = 2, max_age: float = 60.0
    ) -> None:
        self._scope = scope
        self._private = private_dir
        self._dns = dns
        self._size = size
        self._max_age = max_age
        self._ready: list[tuple[float, SandboxNetns]] = []
        self._filler: asyncio.Task[None] | None = None
        self._sweep_lock = asyncio.Lock()
        self._sweep_done = False
        self._closed = False

    async def take(self) -> SandboxNetns:
        """A ready namespace: one from the stock, else one made now (which raises if it cannot be)."""
        if self._closed:
            raise Unavailable("the sandbox network stock is closed: the server is shutting down")
        await self._sweep()
        now = asyncio.get_running_loop().time()
        while self._ready:
            made, netns = self._ready.pop(0)
            if now - made <= self._max_age:
                self._refill()
                return netns
            await netns.remove()
        netns = await self._make()
        self._refill()
        return netns

    async def _sweep(self) -> None:
        """Once, before the first namespace: delete what a killed server of this scope left behind."""
        async with self._sweep_lock:
            if self._sweep_done:
                return
            self._sweep_done = True
            for name in await asyncio.to_thread(leftover_netns, self._scope):
                log.info("removing leftover sandbox network namespace %s", name)
                await SandboxNetns(name, self._private).remove()

    async def _make(self) -> SandboxNetns:
        upstream = self._dns or next(iter(await asyncio.to_thread(host_resolvers)), "")
        netns = SandboxNetns(f"crogia-{self._scope}-{secrets.token_hex(6)}", self._private, DnsGate(upstream))
        try:
            await netns.prepare()
            await netns.attach()
            assert netns.fence is not None
            await netns.fence.open()  # before anything runs in it: the port is the gate's
        except BaseException:
            await netns.remove()
            raise
        return netns

    def _refill(self) -> None:
        if not self._closed and (self._filler is None or self._filler.done()):
            self._filler = asyncio.create_task(self._fill(), name=f"crogia-netns-stock-{self._scope}")

    async def _fill(self) -> None:
        try:
            while len(self._ready) < self._size:
                netns = await self._make()
                self._ready.append((asyncio.get_running_loop().time(), netns))
        except (SandboxError, Unavailable, OSError) as exc:  # the next take() makes its own and says why
            log.warning("could not prepare a sandbox network namespace ahead: %s", exc)

    async def close(self) -> None:
        """Stop refilling and delete every namespace still in stock; make none from now on."""
        self._closed = True
        if self._filler is not None:
            self._filler.cancel()
            await asyncio.gather(self._filler, return_exceptions=True)
            self._filler = None
        ready, self._ready = self._ready, []
        for _, netns in ready:
            await netns.remove()
