"""The Docker network's fence table: replaced whole, scoped to one instance, removed completely,
the iptables chains of earlier servers cleared, and never installed for a bridge elsewhere."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from crogia.errors import SandboxError
from crogia.sandbox.base import Limits, SandboxSpec
from crogia.sandbox.docker import DockerProvider
from crogia.sandbox.docker_network import has_rules, install_rules, remove_rules, table_name, tag_of
from tests.conftest import IN_CI, need_docker, storage
from tests.support.engines import engine_cli, second_engine


def _table(tag: str) -> str:
    done = subprocess.run(["nft", "list", "table", "inet", table_name(tag)], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)


@pytest.fixture
def firewall() -> None:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("iptables") is None:
        if IN_CI:
            pytest.fail("the firewall tests need root, nft and iptables under CI")
        pytest.skip("needs root, nft and iptables")


@pytest.mark.usefixtures("firewall")
def test_install_twice_then_remove_leaves_nothing_and_spares_others() -> None:
    mine, theirs = f"t{secrets.token_hex(4)}", f"t{secrets.token_hex(4)}"
    try:
        install_rules(theirs, f"crg{theirs}")
        install_rules(mine, f"crg{mine}")
        once = _table(mine)
        assert f'iifname "crg{mine}" jump out' in once and f'iifname "crg{mine}" jump host' in once
        assert "dport" not in once  # no DNS let through: the containers' resolver is their gate
        assert "169.254.0.0/16" in once and "hook forward priority" in once
        install_rules(mine, f"crg{mine}")
        assert _table(mine) == once  # replaced, not doubled
        assert f"crg{mine}" not in _table(theirs)
        remove_rules(mine, f"crg{mine}")
        assert not has_rules(mine) and not _table(mine)
        assert has_rules(theirs)  # another instance's table stays
        remove_rules(mine, f"crg{mine}")  # a missing table is fine
    finally:
        remove_rules(mine, f"crg{mine}")
        remove_rules(theirs, f"crg{theirs}")


@pytest.mark.usefixtures("firewall")
def test_an_earlier_servers_iptables_chains_go_once_the_table_is_in() -> None:
    tag = f"t{secrets.token_hex(4)}"
    bridge = f"crg{tag}"
    parent = "DOCKER-USER"  # where earlier servers jumped from (Docker's chain)
    if _iptables("-n", "-L", parent).returncode != 0:
        if IN_CI:
            pytest.fail("Docker's DOCKER-USER chain is missing under CI")
        pytest.skip("needs Docker's DOCKER-USER chain")
    try:
        for chain, hook in ((f"CROGIA-{tag}", parent), (f"CROGIA-IN-{tag}", "INPUT")):
            assert _iptables("-N", chain).returncode == 0
            assert _iptables("-A", chain, "-j", "REJECT").returncode == 0
            assert _iptables("-I", hook, "1", "-i", bridge, "-j", chain).returncode == 0
        install_rules(tag, bridge)
        assert has_rules(tag)
        assert tag not in _iptables("-S").stdout
    finally:
        remove_rules(tag, bridge)
        for chain, hook in ((f"CROGIA-{tag}", parent), (f"CROGIA-IN-{tag}", "INPUT")):
            _iptables("-D", hook, "-i", bridge, "-j", chain)
            _iptables("-F", chain)
            _iptables("-X", chain)


async def test_an_engine_whose_bridge_is_not_here_is_refused_not_left_unfenced(data_dir: Path) -> None:
    """An engine in another network namespace (remote and rootless ones are the same to us): the
    host's fence would guard nothing, so an isolated sandbox is refused, and no table is left."""
    need_docker()
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        if IN_CI:
            pytest.fail("this test needs root and dockerd under CI")
        pytest.skip("needs root and dockerd")
    instance = f"t{secrets.token_hex(5)}"
    with second_engine() as (sock, _):
        provider = DockerProvider(url=sock, instance=instance, storage=storage(data_dir))
        try:
            spec = SandboxSpec(session_id="elsewhere", limits=Limits(network="isolated", memory_mb=512))
            with pytest.raises(SandboxError, match="needs the Docker engine on this machine"):
                await provider.create(spec)
            assert engine_cli(sock, "ps", "-aq").stdout.split() == []  # nothing was made there
        finally:
            await provider.close()
        assert not has_rules(tag_of(instance))
