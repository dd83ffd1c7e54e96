"""The Docker network's firewall rules: idempotent, scoped to one instance, removed completely."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest

from crogia.sandbox.docker_network import install_rules, remove_rules
from tests.conftest import IN_CI


def _rules(tool: str = "iptables") -> list[str]:
    return subprocess.run([tool, "-S"], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.fixture
def iptables() -> None:
    if (
        os.geteuid() != 0
        or shutil.which("iptables") is None
        or subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True).returncode
    ):
        if IN_CI:
            pytest.fail("the firewall tests need root, iptables and Docker's DOCKER-USER chain under CI")
        pytest.skip("needs root, iptables and Docker's DOCKER-USER chain")


@pytest.mark.usefixtures("iptables")
def test_install_twice_then_remove_leaves_nothing_and_spares_others() -> None:
    mine, theirs = f"t{secrets.token_hex(4)}", f"t{secrets.token_hex(4)}"
    try:
        install_rules(theirs, f"crg{theirs}", [])
        install_rules(mine, f"crg{mine}", ["203.0.113.53"])
        once = [r for r in _rules() if mine in r]
        install_rules(mine, f"crg{mine}", ["203.0.113.53"])
        assert [r for r in _rules() if mine in r] == once  # refilled, not doubled
        assert sum(f"-j CROGIA-{mine}" in r for r in once) == 1
        assert any("-d 203.0.113.53/32 -p udp" in r for r in once)
        remove_rules(mine, f"crg{mine}")
        assert not [r for r in _rules() + _rules("ip6tables") if mine in r]
        assert [r for r in _rules() if theirs in r]  # another instance's rules stay
    finally:
        remove_rules(mine, f"crg{mine}")
        remove_rules(theirs, f"crg{theirs}")
