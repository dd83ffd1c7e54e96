"""`make_provider`: which backend SANDBOX_BACKEND picks, and that Docker's library loads only for Docker."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from crogia.sandbox import instance_id, limits_from, make_provider
from crogia.sandbox.base import Limits
from crogia.sandbox.config import BackendConfig, BubblewrapConfig, DockerConfig, backend_config
from tests.conftest import make_settings, need_docker

NO_ENGINE = "unix:///tmp/no-docker-here.sock"


def test_limits_follow_the_settings(data_dir: Path) -> None:
    settings = make_settings(
        data_dir,
        "auto",
        sandbox_memory_mb=300,
        sandbox_cpus=0.5,
        sandbox_pids_limit=64,
        sandbox_network="none",
        sandbox_tmp_mb=200,
    )
    # /tmp is a tmpfs, counted in the memory limit: at most half of it, so a full /tmp is ENOSPC.
    limits = Limits(memory_mb=300, cpus=0.5, pids=64, network="none", tmp_mb=150)
    assert limits_from(settings) == limits
    assert limits_from(settings.model_copy(update={"sandbox_tmp_mb": 0})).tmp_mb == 0


def test_bubblewrap_choice_never_loads_aiodocker(data_dir: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from crogia.config import Settings\n"
        "from crogia.sandbox import make_provider\n"
        "async def main():\n"
        f"    provider = await make_provider(Settings(_env_file=None, base_directory={str(data_dir)!r},"
        " sandbox_backend='bubblewrap'))\n"
        "    print(provider.name, 'aiodocker' in sys.modules)\n"
        "    await provider.close()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bubblewrap", "False"]


async def test_auto_falls_back_to_bubblewrap_without_an_engine(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    caplog.set_level(logging.INFO, logger="crogia.sandbox")
    provider = await make_provider(make_settings(data_dir, "auto"))
    try:
        assert provider.name == "bubblewrap"
        assert f"bubblewrap (no Docker engine answers at {NO_ENGINE})" in caplog.text
    finally:
        await provider.close()


async def test_explicit_docker_is_kept_while_the_engine_is_down(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    provider = await make_provider(make_settings(data_dir, "docker"))
    try:
        assert provider.name == "docker"
        assert await provider.available() is False
    finally:
        await provider.close()


@pytest.mark.docker
async def test_auto_picks_docker_when_the_engine_answers(data_dir: Path) -> None:
    need_docker()
    provider = await make_provider(make_settings(data_dir, "auto"))
    try:
        assert provider.name == "docker"
    finally:
        await provider.close()


async def test_every_backend_is_built_with_this_servers_instance(data_dir: Path) -> None:
    """A restarted server (same data folder) looks where a crashed one left its sandboxes and cgroups."""
    settings = make_settings(data_dir, "bubblewrap")
    first, second = await make_provider(settings), await make_provider(settings)
    elsewhere = await make_provider(make_settings(data_dir / "elsewhere", "bubblewrap"))
    try:
        scopes = [provider._scope for provider in (first, second, elsewhere)]  # type: ignore[attr-defined]
    finally:
        for provider in (first, second, elsewhere):
            await provider.close()
    assert scopes[0] == scopes[1] == instance_id(settings) != scopes[2]
    docker = backend_config(settings, "docker")
    assert docker.type == "docker" and docker.instance == instance_id(settings)


def test_backend_configs_are_told_apart_by_their_type() -> None:
    adapter: TypeAdapter[BackendConfig] = TypeAdapter(BackendConfig)
    assert isinstance(adapter.validate_python({"type": "bubblewrap", "instance": "x"}), BubblewrapConfig)
    assert isinstance(adapter.validate_python({"type": "docker", "instance": "x"}), DockerConfig)
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "podman", "instance": "x"})


def test_transport_and_volume_settings_reach_the_docker_config(data_dir: Path) -> None:
    volume = {"sandbox_transport": "tcp", "docker_workspace": "volume", "sandbox_files": "daemon"}
    settings = make_settings(data_dir, "docker", **volume)
    config = backend_config(settings, "docker")
    assert isinstance(config, DockerConfig)
    assert (config.transport, config.workspace) == ("tcp", "volume")
    built = config.build()
    assert (built.transport, built.workspace) == ("tcp", "volume")
    with pytest.raises(ValidationError, match="SANDBOX_TRANSPORT=tcp"):
        make_settings(data_dir, "docker", docker_workspace="volume", sandbox_files="daemon")
    with pytest.raises(ValidationError, match="SANDBOX_DISK_MB"):
        make_settings(data_dir, "docker", **volume, sandbox_disk_mb=128)
    with pytest.raises(ValidationError, match="SANDBOX_FILES=daemon"):
        make_settings(data_dir, "docker", sandbox_transport="tcp", docker_workspace="volume")


def test_tls_setting_reaches_the_provider_and_needs_tcp(data_dir: Path) -> None:
    settings = make_settings(data_dir, "docker", sandbox_transport="tcp", sandbox_tcp_tls=True)
    config = backend_config(settings, "docker")
    assert isinstance(config, DockerConfig) and config.tls
    assert config.build().tls
    assert (
        not backend_config(make_settings(data_dir, "docker", sandbox_transport="tcp"), "docker").build().tls
    )
    with pytest.raises(ValidationError, match="SANDBOX_TCP_TLS=true needs SANDBOX_TRANSPORT=tcp"):
        make_settings(data_dir, "docker", sandbox_tcp_tls=True)
