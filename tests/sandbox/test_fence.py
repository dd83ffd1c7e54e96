"""The Docker fence's table load (`EgressFence.open`): one nft transaction either way.

A namespace Docker has just made holds no table of ours, and the load uses `create table` (the
replace's delete waits on the kernel's commit); a namespace that has one (a running container fenced
again after a restart) falls back to the replace. Both must leave the same ruleset, with the policy
in it, and a stale rule in the old table must not survive. In a namespace the test makes (and removes).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from crogia.sandbox.egress import DnsGate, EgressPolicy
from crogia.sandbox.netns import DOCKER_TABLE, EgressFence
from tests.conftest import IN_CI


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _nft(name: str, *args: str) -> str:
    argv = ["ip", "netns", "exec", name, "nft", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


def _ruleset(name: str) -> str:
    return _nft(name, "list", "ruleset")


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        if IN_CI:
            pytest.fail("the fence tests need root, nft and ip under CI")
        pytest.skip("needs root, nft and ip")
    name = f"crogia-fence-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")  # (the gate listens on 127.0.0.53)
        yield name
    finally:
        _ip("netns", "del", name)


async def test_a_fresh_namespace_and_a_fenced_one_end_with_the_same_ruleset(netns: str) -> None:
    path = f"/run/netns/{netns}"
    policy = EgressPolicy("allow", ("192.0.2.0/24",))
    fresh = EgressFence(path, DnsGate("192.0.2.53"))
    await fresh.open(DOCKER_TABLE, policy)
    first = await asyncio.to_thread(_ruleset, netns)
    await fresh.close()
    await asyncio.to_thread(_nft, netns, "add", "rule", "inet", "crogia", "output", "counter", "accept")
    assert "counter" in await asyncio.to_thread(_ruleset, netns)
    again = EgressFence(path, DnsGate("192.0.2.53"))  # the table is there: the replace
    await again.open(DOCKER_TABLE, policy)
    second = await asyncio.to_thread(_ruleset, netns)
    await again.close()

    assert "192.0.2.0/24" in first and "@allow4" in first and "tcp reset" in first, first
    assert second == first  # the stale rule went with the old table
    assert again.gate.policy == policy
