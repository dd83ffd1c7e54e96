"""Per-session uids (SANDBOX_UID_RANGE) and the engine-security parsing, without sandboxes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from crogia.config import Settings
from crogia.sandbox.docker import EngineSecurity
from crogia.sandbox.userns import UidAllocator, UidRange, give_tree
from tests.hostile.test_privilege import need_root


def test_each_session_gets_its_own_uid_and_keeps_it(tmp_path: Path) -> None:
    span = UidRange.parse("700000000-700000003")  # the first is the access gid: three to give
    uids = UidAllocator(span)
    got = [uids.claim(name, tmp_path / name) for name in ("a", "b", "c")]
    assert len(set(got)) == 3 and span.first not in got and all(uid in span for uid in got)
    assert uids.claim("b", tmp_path / "b") == got[1]
    with pytest.raises(RuntimeError, match="no free uid"):
        uids.claim("d", tmp_path / "d")
    uids.release("a")
    assert uids.claim("d", tmp_path / "d") == got[0]


def test_a_new_allocator_finds_the_uids_workspaces_already_own(tmp_path: Path) -> None:
    need_root()
    span = UidRange.parse("700000000-700000009")
    (tmp_path / "old").mkdir()
    give_tree(tmp_path / "old", 700000005)
    fresh = UidAllocator(span)  # as after a server restart
    assert fresh.claim("old", tmp_path / "old") == 700000005
    others = {fresh.claim(f"s{i}", tmp_path / f"s{i}") for i in range(8)}
    assert 700000005 not in others and len(others) == 8


def test_give_tree_never_follows_a_symlink(tmp_path: Path) -> None:
    need_root()
    outside = tmp_path / "outside"
    outside.write_text("host file")
    tree = tmp_path / "ws"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "link").symlink_to(outside)
    give_tree(tree, 700000007)
    assert os.lstat(tree / "sub" / "link").st_uid == 700000007
    assert os.stat(outside).st_uid == 0


@pytest.mark.parametrize("bad", ["100", "5-1", "a-b", "0-10", "1-4294967295"])
def test_a_bad_uid_range_is_refused_at_start(bad: str) -> None:
    with pytest.raises(ValidationError, match="uid range"):
        Settings(sandbox_uid_range=bad)


def test_engine_security_from_docker_info() -> None:
    plain = EngineSecurity.from_info(
        {"SecurityOptions": ["name=seccomp,profile=default"], "ServerVersion": "20.10.24"}
    )
    assert (plain.userns, plain.seccomp, plain.root) == ("off", "crogia", None)
    profile = json.loads(plain.profile or "{}")
    denied = {name for rule in profile["syscalls"] for name in rule["names"]}
    assert {"io_uring_setup", "io_uring_enter", "mount", "keyctl", "bpf", "clone3"} <= denied
    remapped = EngineSecurity.from_info(
        {
            "SecurityOptions": ["name=seccomp,profile=default", "name=userns"],
            "ServerVersion": "27.1.0",
            "DockerRootDir": "/var/lib/docker/100000.100000",
        }
    )
    assert (remapped.userns, remapped.seccomp, remapped.profile, remapped.root) == (
        "userns-remap",
        "default",
        None,
        (100000, 100000),
    )
    rootless = EngineSecurity.from_info(
        {"SecurityOptions": ["name=rootless", "name=seccomp,profile=default"]}
    )
    assert rootless.userns == "rootless"
    assert EngineSecurity.from_info({"SecurityOptions": []}).seccomp == "off"
    loose = {"SecurityOptions": ["name=seccomp,profile=unconfined"], "ServerVersion": "27.0.1"}
    assert EngineSecurity.from_info(loose).seccomp == "crogia"  # a daemon-wide unconfined default is not kept


async def test_without_user_namespaces_bubblewrap_falls_back_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, data_dir: Path
) -> None:
    from crogia.sandbox import bubblewrap
    from crogia.sandbox.base import HostStorage, SandboxSpec

    async def disabled(*_: object) -> str:
        return "user namespaces are disabled (user.max_user_namespaces = 0)"

    monkeypatch.setattr(bubblewrap, "userns_problem", disabled)  # the kernel switch is host-wide
    provider = bubblewrap.BubblewrapProvider(
        storage=HostStorage(data_dir / "workspaces", data_dir / "sandboxes")
    )
    try:
        assert await provider.userns_mode() == "off" and await provider.seccomp_mode() == "crogia"
        assert "max_user_namespaces" in caplog.text and "host's user namespace" in caplog.text
        spec = SandboxSpec("fallback")
        sandbox = await provider.create(spec)
        out = await sandbox.exec("touch made; id -u", timeout=10, max_output=1000)
        assert out.output == "0\n" and os.stat(sandbox.paths.workspace / "made").st_uid == os.geteuid()
        await provider.remove(sandbox.id)
    finally:
        await provider.close()
