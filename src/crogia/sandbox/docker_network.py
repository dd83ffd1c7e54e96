"""The Docker network Crogia owns for isolated sandboxes, and the firewall rules that fence it.

One bridge network per server instance (`crogia-<tag>`, bridge interface `crg<tag>`), labelled
like its containers, with inter-container traffic off (`enable_icc=false`) and no IPv6. Rules,
in chains of its own named after the same tag (so two servers on one engine never touch each
other's), jumped to for that bridge only:

* `DOCKER-USER` (forwarded traffic) -> `CROGIA-<tag>`: reject every blocked range
  (`crogia.sandbox.network`), except DNS to the resolvers the containers use;
* `INPUT` (traffic to this host itself, on any of its addresses) -> `CROGIA-IN-<tag>`: reject all
  but the daemon's replies on connections the server opened (SANDBOX_TRANSPORT=tcp);
* ip6tables `INPUT` and `FORWARD` -> `CROGIA-<tag>`: reject all (the network has no IPv6).

Installing is idempotent (chains flushed and refilled, a jump added only when missing). The
rules go when the network goes: at shutdown when no container is left on it;
containers that outlive the server (they are re-attached after a restart) stay fenced meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from typing import Any

import aiodocker

from crogia.errors import SandboxError
from crogia.sandbox.network import BLOCKED_V4, DAEMON_PORT, host_resolvers

log = logging.getLogger(__name__)

_REJECT_TCP = ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]


def tag_of(instance: str | None) -> str:
    """The short name every object of this instance carries (12 characters at most)."""
    return (instance or "default")[:12]


def _iptables(tool: str, *args: str) -> bool:
    """Run one iptables/ip6tables command; True when it succeeded (blocking)."""
    done = subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, timeout=30)
    return done.returncode == 0


def _must(tool: str, *args: str) -> None:
    done = subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SandboxError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()}", command=tool)


def _fill_chain(tool: str, chain: str, rules: list[list[str]]) -> None:
    if not _iptables(tool, "-N", chain):
        _must(tool, "-F", chain)
    for rule in rules:
        _must(tool, "-A", chain, *rule)


def _jump(tool: str, parent: str, bridge: str, chain: str) -> None:
    if not _iptables(tool, "-C", parent, "-i", bridge, "-j", chain):
        _must(tool, "-I", parent, "1", "-i", bridge, "-j", chain)


def install_rules(tag: str, bridge: str, resolvers: list[str]) -> None:
    """Install (or refresh) this instance's chains and the jumps to them (blocking)."""
    dns = [
        [*d, "-p", proto, "--dport", "53", "-j", "RETURN"]
        for d in (["-d", r] for r in resolvers)
        for proto in ("udp", "tcp")
    ]
    # A per-session allow-list would go here, as RETURNs ahead of the rejects.
    blocked = [
        rule for net in BLOCKED_V4 for rule in (["-d", net, *_REJECT_TCP], ["-d", net, "-j", "REJECT"])
    ]
    _fill_chain("iptables", f"CROGIA-{tag}", dns + blocked)
    # The daemon's replies on connections the server opened (SANDBOX_TRANSPORT=tcp); a connection
    # a sandbox opens is NEW, whatever its source port, and rejected.
    daemon = ["-p", "tcp", "--sport", str(DAEMON_PORT), "-m", "conntrack", "--ctstate", "ESTABLISHED"]
    _fill_chain(
        "iptables", f"CROGIA-IN-{tag}", [[*daemon, "-j", "RETURN"], *dns, _REJECT_TCP, ["-j", "REJECT"]]
    )
    _jump("iptables", "DOCKER-USER", bridge, f"CROGIA-{tag}")
    _jump("iptables", "INPUT", bridge, f"CROGIA-IN-{tag}")
    try:
        _fill_chain("ip6tables", f"CROGIA-{tag}", [_REJECT_TCP, ["-j", "REJECT"]])
        for parent in ("INPUT", "FORWARD"):
            _jump("ip6tables", parent, bridge, f"CROGIA-{tag}")
    except (SandboxError, OSError) as exc:  # no IPv6 filter on this host: nothing to fence
        log.warning("ip6tables rules for %s not installed: %s", bridge, exc)


def remove_rules(tag: str, bridge: str) -> None:
    """Remove this instance's jumps and chains; missing ones are fine (blocking)."""
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

    def __init__(
        self, docker: aiodocker.Docker, instance: str | None, labels: dict[str, str], dns: str = ""
    ) -> None:
        self.tag = tag_of(instance)
        self.name = f"crogia-{self.tag}"
        self.bridge = f"crg{self.tag}"
        self._docker = docker
        self._labels = labels
        self._dns = dns
        self._ready = False
        self._lock = asyncio.Lock()

    def resolvers(self) -> list[str]:
        """Where the containers' DNS goes: `SANDBOX_DNS`, else the host's non-loopback nameservers."""
        if self._dns:
            return [self._dns]
        return [r for r in host_resolvers() if ":" not in r and not r.startswith("127.")]

    async def ensure(self) -> None:
        """Create the network if missing and install its rules (once per server)."""
        async with self._lock:
            if self._ready:
                return
            # Rules first: the bridge gets fenced before any container can be on it.
            await asyncio.to_thread(lambda: install_rules(self.tag, self.bridge, self.resolvers()))
            if not await self._exists():
                await self._docker.networks.create(self._config())
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
        """The network was found missing: the next `ensure()` makes it (and its rules) again."""
        self._ready = False

    async def close(self) -> None:
        """Remove the network and its rules, unless containers (running or not) are still on it."""
        if not self._ready:
            return
        self._ready = False
        filters = json.dumps({"network": [self.name]})
        try:
            keep = bool(await self._docker.containers.list(all=True, filters=filters))
        except aiodocker.DockerError:
            keep = True
        if keep:
            log.info("network %s kept with its firewall rules: containers of this server remain", self.name)
            return
        try:
            await (await self._docker.networks.get(self.name)).delete()
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                log.warning("network %s kept with its firewall rules: %s", self.name, exc.message)
                return
        await asyncio.to_thread(remove_rules, self.tag, self.bridge)
