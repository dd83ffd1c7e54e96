"""The sandbox image: mirror discovery for the offline route, reuse, contents, failure clean-up."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path

import aiodocker
import pytest

from crogia.config import Settings
from crogia.errors import SandboxError, Unavailable
from crogia.sandbox import image, rootfs
from tests.conftest import need_docker

SANDBOX_IMAGE = Settings(_env_file=None).docker_base_image  # type: ignore[call-arg]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_mirror_comes_from_the_hosts_deb822_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rootfs.MIRROR_ENV, raising=False)
    _write(
        tmp_path / "d/debian.sources",
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "# a comment\nTypes: deb-src deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
        "  bookworm-updates\nComponents: main\n",
    )
    assert rootfs.debian_mirror(tmp_path / "d", tmp_path / "none.list") == "http://mirror.example/debian"


def test_mirror_comes_from_a_one_line_sources_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rootfs.MIRROR_ENV, raising=False)
    listing = _write(
        tmp_path / "sources.list",
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://proxy.example/debian trixie main\n",
    )
    assert rootfs.debian_mirror(tmp_path / "missing-dir", listing) == "https://proxy.example/debian"


def test_mirror_falls_back_without_a_debian_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rootfs.MIRROR_ENV, raising=False)
    ubuntu = _write(tmp_path / "sources.list", "deb http://archive.ubuntu.com/ubuntu noble main\n")
    assert rootfs.debian_mirror(tmp_path / "d", ubuntu) == rootfs.FALLBACK_MIRROR
    monkeypatch.setenv(rootfs.MIRROR_ENV, "http://local.example/debian")
    assert rootfs.debian_mirror(tmp_path / "d", ubuntu) == "http://local.example/debian"


def test_package_list_has_the_promised_tools() -> None:
    wanted = {"bash", "coreutils", "python3", "python3-pip", "python3-venv", "git", "curl", "procps"}
    assert wanted | {"ripgrep", "build-essential", "ca-certificates"} <= set(rootfs.packages())


@pytest.mark.docker
async def test_existing_image_is_reused() -> None:
    need_docker()
    assert await image.image_exists(SANDBOX_IMAGE)
    assert not await image.image_exists(f"crogia-no-such-image:{uuid.uuid4().hex[:8]}")
    lines: list[str] = []
    started = asyncio.get_running_loop().time()
    await image.build_image(SANDBOX_IMAGE, progress=lines.append)
    assert asyncio.get_running_loop().time() - started < 5
    assert any("reusing" in line for line in lines)


@pytest.mark.docker
async def test_image_holds_the_tools_an_agent_expects() -> None:
    need_docker()
    script = (
        "set -e; python3 -m venv /tmp/v && /tmp/v/bin/pip --version; git --version; rg --version; "
        "gcc --version; make --version; curl --version; ps --version; "
        "test -s /etc/ssl/certs/ca-certificates.crt"
    )
    async with aiodocker.Docker() as docker:
        config = {
            "Image": SANDBOX_IMAGE,
            "Cmd": ["bash", "-c", script],
            "Labels": {"crogia.test-run": "image"},
        }
        container = await docker.containers.run(config)
        try:
            result = await container.wait(timeout=120)
            logs = "".join(await container.log(stdout=True, stderr=True))
        finally:
            await container.delete(force=True)
    assert result["StatusCode"] == 0, logs
    assert "ripgrep" in logs


@pytest.mark.docker
async def test_offline_layer_builds_on_the_kept_base() -> None:
    need_docker()
    if not await image.image_exists(image.LOCAL_BASE):
        pytest.skip(f"{image.LOCAL_BASE} is not here (the image came from the online route)")
    tag = f"crogia-sandbox-test:{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    try:
        await image.build_image(tag, offline=True, progress=lines.append)
        assert await image.image_exists(tag)
        assert any(f"reusing base {image.LOCAL_BASE}" in line for line in lines)
    finally:
        async with aiodocker.Docker() as docker:
            await docker.images.delete(tag, force=True)


@pytest.mark.docker
async def test_failed_offline_build_removes_its_work_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_docker()

    async def failing_debootstrap(target: Path, **_: object) -> None:
        _write(target / "etc/half-made", "x")
        raise SandboxError("debootstrap failed")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(image, "LOCAL_BASE", f"crogia-no-base:{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(rootfs, "build_rootfs", failing_debootstrap)
    with pytest.raises(SandboxError, match="debootstrap failed"):
        await image.build_image(f"crogia-never:{uuid.uuid4().hex[:8]}", offline=True, progress=print)
    assert os.listdir(tmp_path) == []


async def test_engine_down_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/no-docker-here.sock")
    with pytest.raises(Unavailable, match="Docker engine is not reachable"):
        await image.build_image("crogia-never:x", progress=print)
