"""The Docker network Crogia owns for isolated sandboxes, and the firewall table that fences it.

One bridge network per server instance (`crogia-<tag>`, bridge interface `crg<tag>`), labelled
like its containers, with inter-container traffic off (`enable_icc=false`) and no IPv6. The fence
is an nftables table of its own in the host's namespace, `inet crogia-<tag>` (so two servers on
one engine never touch each other's), whose chains see only packets that came in on that bridge:

* hook `forward` (traffic the host routes on): reject every blocked range
  (`crogia.sandbox.network`) and all IPv6;
* hook `input` (traffic to this host itself, on any of its addresses): reject all but the daemon's
  replies on connections the server opened (SANDBOX_TRANSPORT=tcp).

No DNS is let through: a container's resolver is its gate, a socket the server opens inside the
container's own namespace (`crogia.sandbox.egress.DnsGate`), which asks upstream from the server's
namespace. So a private resolver (a router's, a cloud network's) is as unreachable as any private
host.

Both hook in just ahead of iptables' filter chains (priority -1). A verdict of ours stands
whatever Docker's own rules say after it, and Docker never edits a table it did not make. The
iptables `DOCKER-USER` chain, Docker's documented place for such rules, is not enough:
the engine deletes and re-inserts its `FORWARD -> DOCKER-USER` jump whenever anyone creates a
network on it, and in that gap forwarded traffic skips the chain (measured here: 3,373 of a
sandbox's 671,816 connects to a blocked range got through in 25 s while 75 networks were made).

Installing replaces the table in one nft transaction (a restarted server refreshes it with no
moment unfenced). The table goes when the network goes: at shutdown when no container is left on
it; containers that outlive the server (they are re-attached after a restart) stay fenced
meanwhile. The fence guards only a bridge in the server's own namespace: with an engine elsewhere
(remote, rootless, another namespace) `ensure` refuses rather than fence nothing. Earlier servers
fenced the bridge with iptables chains (`CROGIA-<tag>`, `CROGIA-IN-<tag>`); installing and removing
also remove those, once the table is in place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
from typing import Any

import aiodocker

from crogia.errors import SandboxError
from crogia.sandbox.network import BLOCKED_V4, DAEMON_PORT, replace_table

log = logging.getLogger(__name__)


def tag_of(instance: str | None) -> str:
    """The short name every object of this instance carries (12 characters at most)."""
    return (instance or "default")[:12]


def table_name(tag: str) -> str:
    """The nftables table (family `inet`) that fences this instance's bridge."""
    return f"crogia-{tag}"


def fence_table(tag: str, bridge: str) -> str:
    """The nft script that defines the fence of `bridge` (see the module's docstring)."""
    daemon = f"ip protocol tcp tcp sport {DAEMON_PORT} ct state established return"
    return "\n".join(
        [
            f"table inet {table_name(tag)} {{",
            "chain forward {",
            "type filter hook forward priority -1; policy accept;",
            f'iifname "{bridge}" jump out',
            "}",
            "chain input {",
            "type filter hook input priority -1; policy accept;",
            f'iifname "{bridge}" jump host',
            "}",
            "chain out {",
            "meta nfproto ipv6 jump refuse",
            f"ip daddr {{ {', '.join(BLOCKED_V4)} }} jump refuse",
            "}",
            "chain host {",
            daemon,  # a connection a sandbox opens is new, whatever its source port: refused
            "jump refuse",
            "}",
            "chain refuse {",
            "meta l4proto tcp reject with tcp reset",
            "reject",
            "}",
            "}",
        ]
    )


def _nft(script: str) -> None:
    """Run one nft transaction in the host's namespace (blocking)."""
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise SandboxError(
            "`nft` is not installed: the isolated network needs it (Debian: nftables)", command="nft"
        ) from exc
    if done.returncode != 0:
        raise SandboxError(f"nft failed: {done.stderr.strip()[-500:]}", command="nft")


def install_rules(tag: str, bridge: str) -> None:
    """Install (or replace, atomically) this instance's fence table (blocking)."""
    _nft(replace_table(f"inet {table_name(tag)}", fence_table(tag, bridge)))
    _remove_iptables_chains(tag, bridge)


def remove_rules(tag: str, bridge: str) -> None:
    """Remove this instance's fence table (a missing one is fine) and any older chains (blocking)."""
    _nft(replace_table(f"inet {table_name(tag)}"))
    _remove_iptables_chains(tag, bridge)


def has_rules(tag: str) -> bool:
    """Whether this instance's fence table is loaded (blocking)."""
    done = subprocess.run(["nft", "list", "table", "inet", table_name(tag)], capture_output=True, timeout=30)
    return done.returncode == 0


def _is_here(interface: str) -> bool:
    """Whether `interface` is in this process's network namespace (an ioctl: it does not block)."""
    try:
        socket.if_nametoindex(interface)
    except OSError:
        return False
    return True


def _iptables(tool: str, *args: str) -> bool:
    """Run one iptables/ip6tables command; True when it succeeded (blocking)."""
    done = subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, timeout=30)
    return done.returncode == 0


def _remove_iptables_chains(tag: str, bridge: str) -> None:
    """Remove the iptables chains an earlier server fenced this bridge with, if any (blocking)."""
    if shutil.which("iptables") is None or not _iptables("iptables", "-n", "-L", f"CROGIA-{tag}"):
        return
    jumps = [("iptables", "DOCKER-USER", f"CROGIA-{tag}"), ("iptables", "INPUT", f"CROGIA-IN-{tag}")]
    jumps += [("ip6tables", "INPUT", f"CROGIA-{tag}"), ("ip6tables", "FORWARD", f"CROGIA-{tag}")]
    for tool, parent, chain in jumps:
        while _iptables(tool, "-D", parent, "-i", bridge, "-j", chain):
            pass
    for tool, chain in [
        ("iptables", f"CROGIA-{tag}"),
        ("iptables", f"CROGIA-IN-{tag}"),
        ("ip6tables", f"CROGIA-{tag}"),
    ]:
        if _iptables(tool, "-F", chain):
            _iptables(tool, "-X", chain)


class DockerNetwork:
    """This instance's network: `ensure()` before a container is made, `close()` at shutdown."""

    def __init__(self, docker: aiodocker.Docker, instance: str | None, labels: dict[str, str]) -> None:
        self.tag = tag_of(instance)
        self.name = f"crogia-{self.tag}"
        self.bridge = f"crg{self.tag}"
        self._docker = docker
        self._labels = labels
        self._ready = False
        self._making: asyncio.Task[None] | None = None

    async def ensure(self) -> None:
        """Create the network if missing and install its fence (once per server).

        The work runs as a task of this object's, awaited through a shield: a caller cancelled
        mid-way leaves it to finish, since a cancelled request could leave the engine making the
        network after the next caller has looked for it (and that caller's create would conflict).
        """
        if self._ready:
            return
        making = self._making
        if making is None or making.done():  # done and not ready: it failed, so try again
            making = self._making = asyncio.create_task(self._make())
        await asyncio.shield(making)

    async def _make(self) -> None:
        # The fence first: the bridge gets fenced before any container can be on it.
        await asyncio.to_thread(install_rules, self.tag, self.bridge)
        if not await self._exists():
            await self._docker.networks.create(self._config())
        if not _is_here(self.bridge):
            await asyncio.to_thread(remove_rules, self.tag, self.bridge)
            raise SandboxError(
                f"SANDBOX_NETWORK=isolated needs the Docker engine on this machine: its bridge "
                f"{self.bridge} is not among this host's interfaces (a remote engine, or one in a "
                "namespace of its own, such as rootless Docker), so a fence here would guard nothing; "
                "run the server beside the engine, or use SANDBOX_NETWORK=none",
                bridge=self.bridge,
            )
        self._ready = True

    def _config(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "EnableIPv6": False,
            "Labels": self._labels,
            "Options": {
                "com.docker.network.bridge.enable_icc": "false",
                "com.docker.network.bridge.name": self.bridge,
            },
        }

    async def _exists(self) -> bool:
        try:
            await self._docker.networks.get(self.name)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def forget(self) -> None:
        """The network was found missing: the next `ensure()` makes it (and its fence) again."""
        self._ready = False
        self._making = None

    async def close(self) -> None:
        """Remove the network and its fence, unless containers (running or not) are still on it."""
        making, self._making = self._making, None
        if making is not None and not making.done():
            await asyncio.gather(making, return_exceptions=True)
        if not self._ready:
            return
        self._ready = False
        filters = json.dumps({"network": [self.name]})
        try:
            keep = bool(await self._docker.containers.list(all=True, filters=filters))
        except aiodocker.DockerError:
            keep = True
        if keep:
            log.info("network %s kept with its fence: containers of this server remain", self.name)
            return
        try:
            await (await self._docker.networks.get(self.name)).delete()
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                log.warning("network %s kept with its fence: %s", self.name, exc.message)
                return
        await asyncio.to_thread(remove_rules, self.tag, self.bridge)
