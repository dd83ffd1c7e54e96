"""Sandbox network isolation shared by both backends: modes, blocked ranges, host addresses.

A sandbox reaches the public internet and nothing else: never the server's machine on any of
its addresses, another sandbox, or a private, shared, link-local or metadata range. How each
backend enforces it: `crogia.sandbox.netns` (bubblewrap: a network namespace of its own, pasta
for egress, nftables rules inside it) and `crogia.sandbox.docker_network` (a bridge Crogia owns,
an nftables table of its own on the host). The destination lists here are the single place both read: a
per-session allow-list (issue 13) would add accepted destinations ahead of them.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Literal

log = logging.getLogger(__name__)

Mode = Literal["isolated", "none", "shared"]

BLOCKED_V4 = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)  # fmt: skip
"""IPv4 destinations a sandbox never reaches: this host, private, shared, link-local, multicast."""
BLOCKED_V6 = ("::/127", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8")
"""IPv6 ones: unspecified and loopback, v4-mapped, unique-local, link-local, multicast."""

DAEMON_PORT = 7345
"""Where a Docker sandbox's daemon listens under SANDBOX_TRANSPORT=tcp (on its own address): only
the server's host reaches it (replies on connections the host opened pass the sandbox's fences)."""

# The addressing inside every bubblewrap sandbox's namespace: the same in each, since each is alone.
SANDBOX_ADDRESS = "10.0.2.15"
GATEWAY = "10.0.2.2"
RESOLV_CONF = "nameserver 127.0.0.53\noptions timeout:2 attempts:2\n"
"""A bubblewrap sandbox's resolv.conf: its resolver is the server's gate inside its own namespace
(`crogia.sandbox.egress.GATE_ADDRESS`), the only resolver it reaches."""


def replace_table(table: str, body: str = "") -> str:
    """An nft script that replaces `table` (`family name`) with `body` in one transaction, or with
    no `body` removes it; a missing table is fine either way."""
    return f"table {table} {{\n}}\ndelete table {table}\n{body}\n"


def mode_of(value: str) -> Mode:
    """`isolated`, `none`, or `shared` for every old Docker value (bridge, host, a network name)."""
    if value in ("isolated", "none"):
        return value  # type: ignore[return-value]
    return "shared"


def describe(value: str) -> str:
    """What `/api/health` says about the network: `isolated`, `none` or `shared (not isolated)`."""
    mode = mode_of(value)
    return "shared (not isolated)" if mode == "shared" else mode


def warn_if_shared(value: str) -> None:
    """Log, once at start-up, that an old network value leaves sandboxes unisolated."""
    if mode_of(value) == "shared":
        log.warning(
            "SANDBOX_NETWORK=%s is not isolated: sandboxes can reach this host, its loopback services "
            "and each other; use SANDBOX_NETWORK=isolated (the default) or none",
            value,
        )


def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    """The nameservers the host's resolv.conf lists, in order (blocking)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    fields = (line.split() for line in lines)
    return [f[1].split("%")[0] for f in fields if len(f) >= 2 and f[0] == "nameserver"]


def host_addresses() -> tuple[list[str], list[str]]:
    """Every IPv4 and IPv6 address this host holds now, on any interface (blocking: runs `ip`)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10, check=True)
    v4: list[str] = []
    v6: list[str] = []
    for link in json.loads(out.stdout or "[]"):
        for info in link.get("addr_info", []):
            address = str(info.get("local", ""))
            if info.get("family") == "inet":
                v4.append(address)
            elif info.get("family") == "inet6":
                v6.append(address.split("%")[0])
    return v4, v6
