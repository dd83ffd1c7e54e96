"""The hardened Docker setup: a second dockerd with `--userns-remap`, made and removed by the test
(`tests.support.engines.second_engine`). The sandbox image is copied into it (`docker save | docker
load`, ~25 s: hence `slow`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from crogia.sandbox.base import HostStorage, Limits, SandboxSpec
from crogia.sandbox.docker import DockerProvider
from tests.conftest import need_docker
from tests.hostile.test_privilege import need_root
from tests.support.engines import second_engine

pytestmark = [pytest.mark.docker, pytest.mark.slow]
USER, FIRST, COUNT = "crogiaremap", 800_000_000, 65_536
IMAGE = "crogia-sandbox:latest"


@contextlib.contextmanager
def _remap_user() -> Iterator[None]:
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True
    )
    try:
        for table in ("/etc/subuid", "/etc/subgid"):
            with open(table, "a") as f:
                f.write(f"{USER}:{FIRST}:{COUNT}\n")
        yield
    finally:
        for table in ("/etc/subuid", "/etc/subgid"):
            lines = Path(table).read_text().splitlines(keepends=True)
            Path(table).write_text("".join(line for line in lines if not line.startswith(f"{USER}:")))
        subprocess.run(["userdel", USER], check=False)


@pytest.fixture
def remapped_engine() -> Iterator[str]:
    need_docker()
    need_root()
    if shutil.which("dockerd") is None:
        pytest.fail("the userns-remap test needs dockerd beside the docker CLI")
    with _remap_user(), second_engine(f"--userns-remap={USER}") as (sock, _):
        save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
        loaded = subprocess.run(
            ["docker", "-H", sock, "load", "-q"], stdin=save.stdout, timeout=300, check=False
        )
        assert save.wait(60) == 0 and loaded.returncode == 0
        yield sock


async def test_container_root_is_an_unprivileged_host_uid(remapped_engine: str, data_dir: Path) -> None:
    provider = DockerProvider(
        url=remapped_engine, storage=HostStorage(data_dir / "workspaces", data_dir / "sandboxes")
    )
    try:
        assert await provider.userns_mode() == "userns-remap"
        spec = SandboxSpec(session_id="remap", limits=Limits(network="none", memory_mb=512))
        sandbox = await provider.create(spec)
        try:
            out = await sandbox.exec("id -u; touch /workspace/made", timeout=20, max_output=4096)
            assert out.exit_code == 0 and out.output == "0\n", out
            assert (
                os.stat(sandbox.paths.workspace / "made").st_uid == FIRST
            )  # root inside, nobody special outside
        finally:
            await provider.remove(sandbox.id)
    finally:
        await provider.close()
