"""The egress policy's pure parts: entries, name matching, the gate's DNS parsing under hostile bytes."""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

import pytest

from crogia.sandbox import egress
from crogia.sandbox.egress import (
    BlockedReporter,
    DnsGate,
    EgressPolicy,
    answer_addresses,
    chain_rules,
    check_entry,
    nxdomain,
    query_name,
    refused_destination,
    setelem_batch,
)


def _query(name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


@pytest.mark.parametrize(
    ("entry", "normal"),
    [
        ("PyPI.org.", "pypi.org"),
        ("*.GitHubUserContent.com", "*.githubusercontent.com"),
        ("203.0.113.7", "203.0.113.7/32"),
        ("203.0.113.9/24", "203.0.113.0/24"),
        ("2001:db8::/32", "2001:db8::/32"),
    ],
)
def test_entries_are_normalised(entry: str, normal: str) -> None:
    assert check_entry(entry) == normal


@pytest.mark.parametrize(
    "entry",
    ["", "pypi", "a..b", "-a.com", "a-.com", "*.", "*.com.*", "x" * 64 + ".com", "1.2.3", "10.1.2.3",
     "192.168.0.0/16", "0.0.0.0/0", "::1", "fe80::/64", "::/0", "http://a.com", "a.com/x", "a_b.com",
     "a.com\0", "ä.com"],
)  # fmt: skip
def test_bad_entries_raise_naming_them(entry: str) -> None:
    with pytest.raises(ValueError, match="egress entry") as info:
        check_entry(entry)
    assert repr(entry) in str(info.value)


def test_names_match_exactly_or_below_a_wildcard() -> None:
    policy = EgressPolicy("allow", ("pypi.org", "*.github.com"))
    assert policy.allows_name("pypi.org") and policy.allows_name("PyPI.org.")
    assert not policy.allows_name("files.pypi.org")
    assert policy.allows_name("raw.github.com") and policy.allows_name("a.b.github.com")
    assert not policy.allows_name("github.com") and not policy.allows_name("evilgithub.com")
    assert EgressPolicy().allows_name("anything.example")
    assert not EgressPolicy("none").allows_name("pypi.org")


def test_chain_rules_follow_the_policy() -> None:
    assert "reject" not in chain_rules(EgressPolicy())
    assert "@dyn4" not in chain_rules(EgressPolicy("none")) and "reject" in chain_rules(EgressPolicy("none"))
    rules = chain_rules(EgressPolicy("allow", ("203.0.113.0/24", "2001:db8::/32", "pypi.org")))
    assert "allow4 { 203.0.113.0/24 }" in rules and "allow6 { 2001:db8::/32 }" in rules
    assert rules.index("@dyn4 return") < rules.index("reject with tcp reset")


def test_stored_policies_round_trip_and_garbage_is_the_default() -> None:
    policy = EgressPolicy("allow", ("pypi.org",))
    assert EgressPolicy.from_json(policy.to_json()) == policy
    for junk in (None, 3, {"egress": "everything"}, {"egress": "allow", "allow": [1, "a.com"]}):
        assert EgressPolicy.from_json(junk) in (EgressPolicy(), EgressPolicy("allow", ("a.com",)))


def test_dns_parsing_survives_hostile_bytes() -> None:
    rng = random.Random(13)
    good = _query("pypi.org")
    assert query_name(good) == "pypi.org"
    assert nxdomain(good)[3] & 0x0F == 3
    for _ in range(5000):
        data = bytearray(good if rng.random() < 0.5 else rng.randbytes(rng.randrange(0, 80)))
        for _ in range(rng.randrange(0, 6)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        blob = bytes(data)
        name = query_name(blob)
        if name is not None:
            nxdomain(blob)  # a query it accepted can always be refused
        answer_addresses(blob)
        answer_addresses(blob * 3)


def test_query_names_are_printable() -> None:
    assert (
        query_name(_query("a.example")[:12] + b'\x03a\x00"\x07example\x00\x00\x01\x00\x01') == "a??.example"
    )


def test_answer_addresses_reads_a_and_aaaa_with_compression() -> None:
    head = struct.pack("!HHHHHH", 7, 0x8180, 1, 2, 0, 0) + _query("a.example")[12:]
    a = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 120, 4) + socket.inet_aton("203.0.113.5")
    aaaa = b"\xc0\x0c" + struct.pack("!HHIH", 28, 1, 7, 16) + socket.inet_pton(socket.AF_INET6, "2001:db8::5")
    assert answer_addresses(head + a + aaaa) == [("203.0.113.5", 120), ("2001:db8::5", 7)]


def test_reports_are_rate_limited() -> None:
    seen: list[str] = []
    reporter = BlockedReporter(seen.append, burst=3, window=60)
    for n in range(10):
        reporter.blocked(f"n{n}.example")
    assert seen == ["n0.example", "n1.example", "n2.example"]


def test_netlink_batch_counts_its_acks() -> None:
    batch, acks = setelem_batch([("203.0.113.5", 60, True), ("2001:db8::5", 60, False)], refresh=True)
    assert acks == 3  # a delete and an add, then an add
    assert b"dyn4\0" in batch and b"dyn6\0" in batch


def _nflog(family: int, packet: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(packet), 9) + packet + b"\0" * (-len(packet) % 4)
    body = struct.pack("=BBH", family, 0, 0) + attr
    return struct.pack("=IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body


def test_refused_packets_name_their_destination() -> None:
    v4 = (
        bytes([0x45])
        + bytes(8)
        + bytes([6])
        + bytes(6)
        + socket.inet_aton("203.0.113.9")
        + b"\x9c\x40\x01\xbb"
    )
    assert refused_destination(_nflog(socket.AF_INET, v4)) == "203.0.113.9:443"
    v6 = (
        bytes(6)
        + bytes([17])
        + bytes(17)
        + socket.inet_pton(socket.AF_INET6, "2001:db8::9")
        + b"\x9c\x40\x00\x35"
    )
    assert refused_destination(_nflog(socket.AF_INET6, v6)) == "[2001:db8::9]:53"
    rng = random.Random(7)
    for _ in range(3000):
        refused_destination(_nflog(rng.choice((2, 10)), rng.randbytes(rng.randrange(0, 60))))
        refused_destination(rng.randbytes(rng.randrange(0, 80)))


def test_the_gate_remembers_no_more_addresses_than_the_set_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed name whose answers the sandbox controls (its own domain) can name a new address in
    every answer, 200 queries a second: what the gate remembers of the set must stay within the
    set's size, however long that goes on (the kernel's elements time out; the gate's memory must too)."""
    clock = [1000.0]
    monkeypatch.setattr(egress.time, "monotonic", lambda: clock[0])
    gate = DnsGate("127.0.0.1")
    policy = EgressPolicy("allow", ("evil.example",))
    fresh = 0
    for window in range(3):  # each window: a set's worth of new addresses, then they all expire
        for i in range(egress.SET_SIZE):
            found = [(str(ipaddress.IPv4Address(0x0B000000 + window * egress.SET_SIZE + i)), egress.MIN_TTL)]
            fresh += len(gate._fresh(found, policy))
            clock[0] += 1 / egress.QUERY_RATE / 10
        clock[0] += egress.MAX_TTL
    assert len(gate._known) <= egress.SET_SIZE
    assert fresh == 3 * egress.SET_SIZE  # every new address went to the set, once the old ones expired
    late = [(str(ipaddress.IPv4Address(0x0C000000 + i)), egress.MAX_TTL) for i in range(egress.SET_SIZE + 10)]
    taken = sum(len(gate._fresh([one], policy)) for one in late)  # all live: the last ten find no room
    assert taken == egress.SET_SIZE == len(gate._known)
