"""The hardened Docker setup: a second dockerd with `--userns-remap`, made and removed by the test.

It runs on its own socket, data root and exec root (its own containerd), in a network
namespace of its own without a bridge or firewall rules, so the shared engine is never touched
(`--bridge=none` makes dockerd delete any `docker0` it sees: in its own namespace there is none).
The sandbox image is copied into it (`docker save | docker load`, ~25 s: hence `slow`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crogia.sandbox.base import HostStorage, Limits, SandboxSpec
from crogia.sandbox.docker import DockerProvider
from tests.conftest import need_docker
from tests.hostile.test_privilege import need_root

pytestmark = [pytest.mark.docker, pytest.mark.slow]
USER, FIRST, COUNT = "crogiaremap", 800_000_000, 65_536
IMAGE = "crogia-sandbox:latest"


def _docker(sock: str, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "-H", sock, *args], capture_output=True, text=True, timeout=timeout)


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


def _wait_for(check: object, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def remapped_engine() -> Iterator[str]:
    need_docker()
    need_root()
    if shutil.which("dockerd") is None:
        pytest.fail("the userns-remap test needs dockerd beside the docker CLI")
    root = Path(tempfile.mkdtemp(prefix="crogia-remap-"))
    root.chmod(0o755)  # dockerd wants its remapped root able to walk to its data root
    sock = f"unix://{root}/docker.sock"
    with _remap_user():
        argv = ["unshare", "--net", "--", "dockerd", f"--userns-remap={USER}"]
        argv += ["--data-root", f"{root}/data", "--exec-root", f"{root}/exec"]
        argv += ["-H", sock, "--pidfile", f"{root}/docker.pid", "--bridge=none", "--iptables=false"]
        argv += ["--ip-masq=false", "--ip6tables=false"]
        with open(root / "dockerd.log", "wb") as log:
            engine = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        try:
            assert _wait_for(lambda: _docker(sock, "info").returncode == 0, 30), (
                root / "dockerd.log"
            ).read_text()
            save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
            loaded = subprocess.run(
                ["docker", "-H", sock, "load", "-q"], stdin=save.stdout, timeout=300, check=False
            )
            assert save.wait(60) == 0 and loaded.returncode == 0
            yield sock
        finally:
            for cid in _docker(sock, "ps", "-aq").stdout.split():
                _docker(sock, "rm", "-f", cid, timeout=60)
            engine.send_signal(signal.SIGTERM)
            engine.wait(60)
            shutil.rmtree(root, ignore_errors=True)


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
