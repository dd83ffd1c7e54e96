"""Shared fixtures: settings on a temp folder, a real server on a free port, PostgreSQL, backends."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from crogia.config import Settings
from crogia.sandbox.base import HostStorage

if TYPE_CHECKING:
    from tests.support.server import RunningServer
from tests.support.postgres import postgres_cluster

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = [
    pytest.param("bubblewrap", id="bubblewrap"),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]


def need_docker() -> None:
    """Skip Docker tests where there is no engine, but fail under CI: they must run there."""
    from tests.support.server import docker_ready

    reason = docker_ready()
    if reason:
        if IN_CI:
            pytest.fail(f"Docker tests must run under CI but cannot: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    try:
        with postgres_cluster() as url:
            yield url
    except FileNotFoundError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Short paths: unix socket paths (executor.sock) must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="cg-", dir="/tmp"))
    yield path
    remove_containers_of(path)
    remove_namespaces_of(path)
    shutil.rmtree(path, ignore_errors=True)


def remove_containers_of(data_dir: Path) -> None:
    """Docker sandboxes outlive their server on purpose; a test's ones must not outlive the test."""
    from crogia.sandbox import instance_id

    remove_instance(instance_id(make_settings(data_dir, "docker")))


def remove_namespaces_of(data_dir: Path) -> None:
    """A bubblewrap server killed in a test (a failing test's `finally`) leaves its namespaces, with
    their pasta, and its sandboxes' empty cgroups: the next server on that folder would sweep them,
    and none comes. (Its sandboxes themselves died with it: `bwrap --die-with-parent`.)"""
    from crogia.sandbox import instance_id
    from crogia.sandbox.cgroups import find_cgroup, leftover_names, remove_scope
    from crogia.sandbox.netns import leftover_netns

    scope = instance_id(make_settings(data_dir, "bubblewrap"))
    for name in leftover_netns(scope):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)  # pasta then quits
    for name in leftover_names(scope):
        group = find_cgroup(scope, name)
        if group is not None:
            group.remove()
    remove_scope(scope)


def remove_instance(instance: str) -> None:
    """Remove a Docker instance's containers and their workspace volumes, then its network and
    fence (the server keeps all of them while its sessions live)."""
    if shutil.which("docker") is None:
        return
    from crogia.sandbox.docker_network import has_rules, remove_rules, tag_of

    found = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=crogia.instance={instance}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    ids = found.stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)
    volumes = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label=crogia.instance={instance}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if names := volumes.stdout.split():
        subprocess.run(["docker", "volume", "rm", "-f", *names], capture_output=True, timeout=120)
    tag = tag_of(instance)
    gone = subprocess.run(
        ["docker", "network", "rm", f"crogia-{tag}"], capture_output=True, text=True, timeout=60
    )
    if shutil.which("nft") is not None and (gone.returncode == 0 or has_rules(tag)):
        remove_rules(tag, f"crg{tag}")


def storage(data_dir: Path) -> HostStorage:
    """Host folders for a provider a test builds itself: `<data_dir>/ws/<id>` and `<data_dir>/st/<id>`."""
    return HostStorage(data_dir / "ws", data_dir / "st")


def make_settings(data_dir: Path, backend: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "base_directory": data_dir,
        "sandbox_backend": backend,
        "openai_api_key": "test-key",
        "log_level": "INFO",
        "sandbox_memory_mb": 1024,
        "sandbox_pool_size": 0,  # the pool's tests turn it on; elsewhere it would only load the 2 cores
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "docker":
        need_docker()
    return name


@pytest.fixture
async def server(data_dir: Path, backend: str) -> AsyncIterator[RunningServer]:
    from tests.support.server import run_server

    async with run_server(make_settings(data_dir, backend)) as running:
        yield running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test its own node id: pytest-xdist schedules tests by it (scripts/test.sh runs it).

    schemathesis names each operation's test `test_x[GET /path]` but gives all of them the
    function's node id, and xdist would then run one of them in place of all. A duplicate left
    is an error, never a test silently not run.
    """
    seen: dict[str, int] = {}
    for item in items:
        module = item.getparent(pytest.Module)
        if item.name.endswith("]") and not item.nodeid.endswith("]") and module is not None:
            item._id = module.id.child(item.name)  # type: ignore[attr-defined]  # pytest's own, as it builds it
        seen[item.nodeid] = seen.get(item.nodeid, 0) + 1
    twice = sorted(nodeid for nodeid, count in seen.items() if count > 1)
    if twice:
        raise pytest.UsageError(f"tests sharing a node id (xdist would run one of them): {twice[:5]}")


if os.environ.get("CROGIA_TEST_LOOP") == "uvloop":

    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
        """`CROGIA_TEST_LOOP=uvloop`: the tests (and the servers they run in-process) on uvloop, as
        `crogia serve --loop uvloop` runs; `scripts/test.sh` runs a part of the suite that way."""
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
