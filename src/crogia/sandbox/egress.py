"""Per-session egress policy (issue 13 item 3): what an isolated sandbox may connect to.

`internet` (the default) is plain isolation: the public internet, never a blocked range
(`crogia.sandbox.network`). `none` rejects every connection. `allow` rejects all but the listed
CIDRs and the addresses the listed names resolve to. Design: DNS plus firewall.

* Every isolated sandbox sends its DNS to a `DnsGate` of its own: a UDP socket the server makes
  inside the sandbox's network namespace (`socket_in_netns`), on its loopback at `GATE_ADDRESS`
  (its resolv.conf names nothing else), before anything runs there; the gate asks the upstream
  resolver from the server's own namespace. The sandbox reaches no other resolver. Under `allow`
  it answers only allowed names (others: NXDOMAIN) and, before it relays an answer, adds the
  answer's A/AAAA addresses to the sandbox's `dyn4`/`dyn6` sets with a timeout from the TTL
  (over a netfilter netlink socket it made in the namespace too: `NftLink`); under
  `none` it answers nothing but NXDOMAIN. Each refusal is an `egress_blocked` event (rate-limited
  by `BlockedReporter`), and so is each connection the chain below refuses (`RefusalLog`).
* The sandbox's nftables table (in its own namespace, where it has no capability) has a chain
  `egress` after the blocked-range rejects: empty for `internet`; `none`: reject; `allow`: return
  for `@allow4`/`@allow6` (the CIDRs) and `@dyn4`/`@dyn6` (resolved addresses, timed), log
  (rate-limited) and reject the rest.
  Private and host ranges are rejected before that chain, so an allowed name that resolves to one
  stays unreachable; CIDRs that overlap them are refused at the API (422).

What is matched: the name a sandbox asks its resolver for, and the destination address. Not
matched: TLS SNI and HTTP Host (a sandbox may reach any name hosted on an allowed address, such
as another site on the same CDN address), and DNS over TCP (refused: the gate serves UDP only).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from crogia.buckets import TokenBucket
from crogia.sandbox.network import BLOCKED_V4, BLOCKED_V6

log = logging.getLogger(__name__)

Egress = Literal["internet", "none", "allow"]
MAX_ENTRIES = 256
_UNPRINTABLE = re.compile(r"[^a-z0-9_*-]")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_BLOCKED = [ipaddress.ip_network(n) for n in (*BLOCKED_V4, *BLOCKED_V6)]
QUERY_RATE, QUERY_BURST = 200.0, 400
"""Queries a sandbox's resolver takes per second (steady, and in a burst); the rest are dropped."""
MIN_TTL, MAX_TTL = 30, 3600
"""Bounds of a resolved address's lifetime in the allowed set (seconds)."""


def check_entry(entry: str) -> str:
    """`entry` normalised (lower case, CIDR form), or ValueError naming it."""
    value = entry.strip().lower().rstrip(".")
    if any(c in value for c in "/:") or value.replace(".", "").isdigit():
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"egress entry {entry!r} is not a host name, *.name or CIDR") from None
        if any(net.version == b.version and net.overlaps(b) for b in _BLOCKED):
            raise ValueError(
                f"egress entry {entry!r} overlaps a private, loopback or link-local range, "
                "which a sandbox never reaches"
            )
        return str(net)
    name = value[2:] if value.startswith("*.") else value
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"egress entry {entry!r} is not a host name, *.name or CIDR")
    return value


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """One session's policy; `allow` holds normalised entries (see `check_entry`)."""

    egress: Egress = "internet"
    allow: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> EgressPolicy:
        """From a stored `{"egress", "allow"}` (None or anything malformed: the default)."""
        if not isinstance(data, dict) or data.get("egress") not in ("internet", "none", "allow"):
            return cls()
        allow = data.get("allow") or []
        return cls(data["egress"], tuple(str(a) for a in allow if isinstance(a, str)))

    def to_json(self) -> dict[str, Any]:
        return {"egress": self.egress, "allow": list(self.allow)}

    @property
    def nets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in self.allow:
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_network(entry))
        return out

    def allows_name(self, name: str) -> bool:
        """Whether the sandbox may resolve `name` (exact names; `*.x`: any name below x, not x)."""
        if self.egress == "internet":
            return True
        if self.egress == "none":
            return False
        name = name.lower().rstrip(".")
        for entry in self.allow:
            if entry.startswith("*."):
                if name.endswith(entry[1:]):
                    return True
            elif name == entry:
                return True
        return False


def chain_rules(policy: EgressPolicy, table: str = "inet crogia") -> str:
    """The nft batch that sets the `egress` chain and static set members for `policy`."""
    lines = [f"flush chain {table} egress"]
    lines += [f"flush set {table} {name}" for name in ("allow4", "allow6", "dyn4", "dyn6")]
    v4 = [str(n) for n in policy.nets if n.version == 4]
    v6 = [str(n) for n in policy.nets if n.version == 6]
    if v4:
        lines.append(f"add element {table} allow4 {{ {', '.join(v4)} }}")
    if v6:
        lines.append(f"add element {table} allow6 {{ {', '.join(v6)} }}")
    if policy.egress == "allow":
        lines += [
            f"add rule {table} egress ip daddr @allow4 return",
            f"add rule {table} egress ip6 daddr @allow6 return",
            f"add rule {table} egress ip daddr @dyn4 return",
            f"add rule {table} egress ip6 daddr @dyn6 return",
        ]
    if policy.egress != "internet":
        lines += [
            f"add rule {table} egress limit rate 20/second burst 20 packets log group {LOG_GROUP}",
            f"add rule {table} egress meta l4proto tcp reject with tcp reset",
            f"add rule {table} egress reject",
        ]
    return "\n".join(lines) + "\n"


SET_SIZE = 65536
"""Addresses each of a sandbox's `dyn4`/`dyn6` sets holds (the kernel refuses more); the gate
remembers at most this many in all."""
TABLE_PARTS = (
    "set allow4 {\ntype ipv4_addr; flags interval;\n}",
    "set allow6 {\ntype ipv6_addr; flags interval;\n}",
    f"set dyn4 {{\ntype ipv4_addr; flags timeout; size {SET_SIZE};\n}}",
    f"set dyn6 {{\ntype ipv6_addr; flags timeout; size {SET_SIZE};\n}}",
    "chain egress {\n}",
)
"""What a sandbox table holds for the policy: the listed CIDRs (`allow4/6`), the addresses its
allowed names resolved to (`dyn4/6`, each with a timeout), and the (empty: internet) chain."""


# --- DNS ---


def _skip_name(data: bytes, pos: int) -> int:
    for _ in range(128):
        if pos >= len(data):
            raise ValueError("truncated name")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + length
    raise ValueError("name too long")


def query_name(query: bytes) -> str | None:
    """The question's name of a one-question query, or None if it is not one."""
    if len(query) < 12 or query[2] & 0x80 or struct.unpack("!H", query[4:6])[0] != 1:
        return None
    labels, pos = [], 12
    while pos < len(query) and query[pos]:
        length = query[pos]
        if length > 63 or pos + 1 + length > len(query):
            return None
        label = query[pos + 1 : pos + 1 + length].decode("ascii", errors="replace").lower()
        labels.append(_UNPRINTABLE.sub("?", label))  # a "." inside a label too: it names nothing listed
        pos += 1 + length
    if pos + 5 > len(query):
        return None
    return ".".join(labels)  # printable only: it ends up in events


def answer_addresses(reply: bytes) -> list[tuple[str, int]]:
    """The A and AAAA addresses in a reply's answer section, each with its TTL."""
    out: list[tuple[str, int]] = []
    try:
        qd, an = struct.unpack("!HH", reply[4:8])
        pos = 12
        for _ in range(qd):
            pos = _skip_name(reply, pos) + 4
        for _ in range(an):
            pos = _skip_name(reply, pos)
            rtype, _cls, ttl, size = struct.unpack("!HHIH", reply[pos : pos + 10])
            pos += 10
            rdata = reply[pos : pos + size]
            pos += size
            if rtype == 1 and size == 4:
                out.append((str(ipaddress.IPv4Address(rdata)), ttl))
            elif rtype == 28 and size == 16:
                out.append((str(ipaddress.IPv6Address(rdata)), ttl))
    except (struct.error, ValueError):
        pass
    return out


def nxdomain(query: bytes) -> bytes:
    """An NXDOMAIN reply to `query` (its header and question)."""
    end = _skip_name(query, 12) + 4
    flags = 0x8183 | (query[2] & 0x01) << 8  # response, RD copied, RA, NXDOMAIN
    return query[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + query[12:end]


class BlockedReporter:
    """Rate-limited `egress_blocked` reports: at most `burst` per `window` seconds per sandbox."""

    def __init__(self, report: Callable[[str], None], *, burst: int = 10, window: float = 10.0) -> None:
        self._report = report
        self._burst, self._window = burst, window
        self._start, self._count = 0.0, 0

    def blocked(self, destination: str) -> None:
        now = time.monotonic()
        if now - self._start > self._window:
            self._start, self._count = now, 0
        self._count += 1
        if self._count <= self._burst:
            self._report(destination)


Element = tuple[str, int, bool]
"""A resolved address for the allowed set: address, timeout (s), whether it may be there already."""
Adder = Callable[[list[Element]], Awaitable[None]]


GATE_ADDRESS = "127.0.0.53"
"""Where a sandbox's resolver listens, on the loopback of the sandbox's own namespace."""
_CLONE_NEWNET = 0x40000000
_NETLINK_NETFILTER = 12


def _bind_in(netns: str, local: tuple[str, int] | None) -> socket.socket:
    """A UDP socket bound to `local` in `netns`, or (None) a netfilter netlink socket there
    (blocking; switches the calling thread's netns and back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            if local is None:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind(local or (0, 0))  # no SO_REUSEPORT: nothing in the sandbox can share the port
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                os.abort()  # this thread must never run on in the sandbox's namespace
        return sock
    finally:
        os.close(target)
        os.close(own)


async def socket_in_netns(netns: str, local: tuple[str, int] | None) -> socket.socket:
    """`_bind_in` on a thread of its own (a socket keeps the namespace it was made in)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def run() -> None:
        try:
            result = _bind_in(netns, local)
        except BaseException as exc:  # handed to the awaiting task
            error = exc

            def fail() -> None:
                if not done.done():
                    done.set_exception(error)

            loop.call_soon_threadsafe(fail)
            return

        def hand() -> None:
            if done.done():
                result.close()
            else:
                done.set_result(result)

        loop.call_soon_threadsafe(hand)

    threading.Thread(target=run, name="crogia-netns-socket", daemon=True).start()
    return await done


class DnsGate(asyncio.DatagramProtocol):
    """One sandbox's resolver: forwards allowed queries to `upstream`, fills the allowed set."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.policy = EgressPolicy()
        self.on_blocked: Callable[[str], None] | None = None
        self.add: Adder | None = None
        """Puts resolved addresses in the sandbox's allowed set (set by its owner)."""
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._known: dict[str, float] = {}  # address -> when its set element expires (monotonic)
        self._pruned = 0.0
        self._failed, self._warned = 0, 0.0
        self._queries = TokenBucket(QUERY_BURST, QUERY_RATE)

    async def open(self, netns: str) -> None:
        """Listen on `GATE_ADDRESS`:53 inside the network namespace at path `netns`."""
        sock = await socket_in_netns(netns, (GATE_ADDRESS, 53))
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if len(self._tasks) >= 64 or not self._queries.take():
            return  # a flood: the rest is dropped (resolvers retry)
        task = asyncio.create_task(self._answer(data, addr), name="crogia-dns-gate")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, query: bytes, addr: tuple[str | Any, int]) -> None:
        name = query_name(query)
        if name is None or self._transport is None:
            return
        policy = self.policy
        if not policy.allows_name(name):
            if self.on_blocked is not None:
                self.on_blocked(name)
            with contextlib.suppress(ValueError):
                self._transport.sendto(nxdomain(query), addr)
            return
        try:
            reply = await asyncio.wait_for(self._ask(query), 3)
        except (TimeoutError, OSError):
            return
        if policy.egress == "allow":
            fresh = self._fresh(answer_addresses(reply), policy)
            if fresh and self.add is not None:
                try:
                    await self.add(fresh)
                except Exception:
                    for address, _ttl, _known in fresh:
                        self._known.pop(address, None)
                    self._failed += 1
                    if time.monotonic() - self._warned > 10:  # (the answers are the sandbox's: no flood)
                        self._warned = time.monotonic()
                        log.warning(
                            "egress set updates failed (%d so far; the last for %s)", self._failed, name,
                            exc_info=True,
                        )  # fmt: skip
                    return
        if self._transport is not None:
            self._transport.sendto(reply, addr)

    def _fresh(self, found: list[tuple[str, int]], policy: EgressPolicy) -> list[Element]:
        """The answer's addresses the set lacks or holds for less than half their TTL now."""
        now, nets = time.monotonic(), policy.nets
        out: list[Element] = []
        for address, ttl in found:
            ip = ipaddress.ip_address(address)
            if any(ip.version == n.version and ip in n for n in nets):
                continue  # a listed CIDR covers it already
            ttl = min(max(ttl, MIN_TTL), MAX_TTL)
            if self._known.get(address, 0.0) - now < ttl / 2:
                if address not in self._known and not self._room(now):
                    continue  # the set is full of live addresses: the kernel would refuse it too
                out.append((address, ttl, address in self._known))
                self._known[address] = now + ttl
        return out

    def _room(self, now: float) -> bool:
        """Whether one more address may be remembered: at most SET_SIZE, forgetting those whose
        elements have timed out (looked for at most once a second: a full set of live ones is a
        scan of SET_SIZE entries)."""
        if len(self._known) < SET_SIZE:
            return True
        if now - self._pruned >= 1.0:
            self._pruned = now
            self._known = {address: until for address, until in self._known.items() if until > now}
        return len(self._known) < SET_SIZE

    def forget(self) -> None:
        """The set was flushed (a new policy): nothing is known to be in it."""
        self._known.clear()

    async def _ask(self, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class _Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                if data[:2] == query[:2] and not got.done():
                    got.set_result(data)

            def error_received(self, exc: Exception) -> None:
                if not got.done():
                    got.set_exception(exc)

        transport, _ = await loop.create_datagram_endpoint(_Up, remote_addr=(self.upstream, 53))
        try:
            transport.sendto(query)
            return await got
        finally:
            transport.close()

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- nf_tables over netlink: the gate's set updates without a process per answer ---

_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_CREATE = 0x1, 0x4, 0x400
_BATCH_BEGIN, _BATCH_END, _NLMSG_ERROR = 0x10, 0x11, 0x2
_NFTABLES = 10
_NEWSETELEM, _DELSETELEM = 12, 14
_NFPROTO_INET = 1
_NESTED = 0x8000


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _message(kind: int, seq: int, body: bytes, *, family: int, flags: int, res_id: int = 0) -> bytes:
    payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, _NLM_F_REQUEST | flags, seq, 0) + payload


def setelem_batch(
    found: list[Element], *, refresh: bool, table: str = "crogia", seq: int = 1
) -> tuple[bytes, int]:
    """A netlink batch adding `found` to the `dyn4`/`dyn6` sets (with `refresh`: deleting the known
    ones first); returns it and how many acks to expect."""
    messages, acks = [], 0
    for address, ttl, known in found:
        ip = ipaddress.ip_address(address)
        key = _attr(1 | _NESTED, _attr(1, ip.packed))  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
        timeout = _attr(4, struct.pack("!Q", ttl * 1000))  # NFTA_SET_ELEM_TIMEOUT, ms
        name = b"dyn6" if ip.version == 6 else b"dyn4"
        head = _attr(1, table.encode() + b"\0") + _attr(2, name + b"\0")
        steps = [(_DELSETELEM, key)] if refresh and known else []
        steps.append((_NEWSETELEM, key + timeout))
        for kind, element in steps:
            body = head + _attr(3 | _NESTED, _attr(1 | _NESTED, element))
            flags = _NLM_F_ACK | (_NLM_F_CREATE if kind == _NEWSETELEM else 0)
            seq += 1
            messages.append(_message(_NFTABLES << 8 | kind, seq, body, family=_NFPROTO_INET, flags=flags))
            acks += 1
    begin = _message(_BATCH_BEGIN, seq + 1, b"", family=0, flags=0, res_id=_NFTABLES)
    end = _message(_BATCH_END, seq + 2, b"", family=0, flags=0, res_id=_NFTABLES)
    return begin + b"".join(messages) + end, acks


LOG_GROUP = 7
"""The nflog group a sandbox's refused packets are copied to (per namespace), rate-limited."""
_ULOG = 4


def refused_destination(message: bytes) -> str | None:
    """`address:port` (or the address) of the packet in one NFULNL_MSG_PACKET, or None."""
    if len(message) < 20:
        return None
    family, pos, payload = message[16], 20, b""
    while pos + 4 <= len(message):
        size, kind = struct.unpack_from("=HH", message, pos)
        if size < 4:
            break
        if kind & 0x7FFF == 9:  # NFULA_PAYLOAD: the packet from its IP header on
            payload = message[pos + 4 : pos + size]
        pos += (size + 3) & ~3
    try:
        if family == socket.AF_INET and len(payload) >= 20:
            address, proto, offset = (
                str(ipaddress.IPv4Address(payload[16:20])),
                payload[9],
                (payload[0] & 15) * 4,
            )
        elif family == socket.AF_INET6 and len(payload) >= 40:
            address, proto, offset = str(ipaddress.IPv6Address(payload[24:40])), payload[6], 40
        else:
            return None
    except ValueError:
        return None
    if proto in (6, 17) and len(payload) >= offset + 4:
        port = struct.unpack_from("!H", payload, offset + 2)[0]
        return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return address


class RefusalLog:
    """Reads the refused packets nftables logs (group `LOG_GROUP`) in a sandbox's namespace."""

    def __init__(self, sock: socket.socket, report: Callable[[str], None]) -> None:
        self._sock = sock
        self._report = report
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, netns: str, report: Callable[[str], None]) -> RefusalLog:
        sock = await socket_in_netns(netns, None)
        log_ = cls(sock, report)
        try:
            config = _ULOG << 8 | 1  # NFULNL_MSG_CONFIG
            bind = _attr(1, b"\x01")  # NFULA_CFG_CMD: NFULNL_CFG_CMD_BIND
            mode = _attr(2, struct.pack("!IBB", 96, 2, 0))  # NFULA_CFG_MODE: copy 96 bytes of packet
            qthresh = _attr(4, struct.pack("!I", 1))  # NFULA_CFG_QTHRESH: each packet at once
            for seq, body in ((1, bind), (2, mode + qthresh)):
                sock.send(_message(config, seq, body, family=0, flags=0, res_id=LOG_GROUP))
        except BaseException:
            sock.close()
            raise
        log_._task = asyncio.create_task(log_._read(), name="crogia-egress-log")
        return log_

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self._sock, 65536)
            except OSError:  # ENOBUFS when it falls behind: what was lost is lost
                continue
            if not data:
                return
            pos = 0
            while pos + 16 <= len(data):
                size, kind = struct.unpack_from("=IH", data, pos)
                if size < 16:
                    break
                if kind == _ULOG << 8:  # NFULNL_MSG_PACKET
                    destination = refused_destination(data[pos : pos + size])
                    if destination is not None:
                        self._report(destination)
                pos += (size + 3) & ~3

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close()


class NftLink:
    """A netfilter netlink socket inside a sandbox's namespace, for its set updates (one at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, netns: str) -> NftLink:
        return cls(await socket_in_netns(netns, None))

    async def add(self, found: list[Element]) -> None:
        """Add the addresses; OSError with the kernel's errno if it refused the batch."""
        async with self._lock:
            try:
                await self._send(*setelem_batch(found, refresh=True))
            except OSError:  # a known element expired meanwhile: add them all afresh
                await self._send(*setelem_batch(found, refresh=False))

    async def _send(self, batch: bytes, acks: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self._sock, batch)
        error = 0
        while acks > 0:  # an aborted batch acks every message, each with the error
            data = await asyncio.wait_for(loop.sock_recv(self._sock, 65536), 2)
            pos = 0
            while pos + 16 <= len(data):
                size, kind = struct.unpack_from("=IH", data, pos)
                if kind == _NLMSG_ERROR and pos + 20 <= len(data):
                    code = struct.unpack_from("=i", data, pos + 16)[0]
                    error = error or -code
                    acks -= 1
                pos += max((size + 3) & ~3, 16)
        if error:
            raise OSError(error, os.strerror(error))

    def close(self) -> None:
        self._sock.close()
