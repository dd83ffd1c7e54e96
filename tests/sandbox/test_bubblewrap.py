"""What only the bubblewrap backend promises: cgroups, fallbacks, restarts, dying with the server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from crogia.errors import NotFound, SandboxError
from crogia.sandbox.base import HostStorage, Limits, SandboxSpec
from crogia.sandbox.bubblewrap import BubblewrapProvider, BubblewrapSandbox
from crogia.sandbox.cgroups import find_cgroup
from tests.conftest import storage
from tests.sandbox.conftest import new_spec, unavailable


def spec_for(provider: BubblewrapProvider, data_dir: Path, **kw: object) -> SandboxSpec:
    return new_spec(provider, data_dir, **kw)


async def test_cgroup_holds_the_sandbox_and_goes_with_it(bwrap: BubblewrapProvider, data_dir: Path) -> None:
    sandbox = await bwrap.create(spec_for(bwrap, data_dir, limits=Limits(memory_mb=256, pids=100)))
    assert isinstance(sandbox, BubblewrapSandbox)
    if not sandbox.enforced_limits:
        pytest.skip("no writable cgroups on this host")
    group = find_cgroup(bwrap._scope, sandbox.id)
    assert group is not None
    handle = await sandbox.spawn("sleep 60")
    assert len(group.pids()) >= 3  # bwrap, its pid 1, the daemon, and more
    assert handle.pid > 0
    await bwrap.remove(sandbox.id)
    assert find_cgroup(bwrap._scope, sandbox.id) is None
    assert sandbox.id not in await bwrap.managed_ids()


async def test_rlimit_fallback_without_cgroups(data_dir: Path) -> None:
    provider = BubblewrapProvider(cgroups=False, storage=storage(data_dir))
    try:
        sandbox = await provider.create(spec_for(provider, data_dir, limits=Limits(memory_mb=200)))
        assert isinstance(sandbox, BubblewrapSandbox)
        assert sandbox.enforced_limits == frozenset()
        result = await sandbox.exec("ulimit -v", timeout=10, max_output=100)
        assert result.output == f"{200 * 1024}\n"
        big = await sandbox.exec("python3 -c \"b = b'x' * (400 << 20)\"", timeout=20, max_output=10_000)
        assert "MemoryError" in big.output
    finally:
        await provider.close()


async def test_privileges_are_dropped(bwrap: BubblewrapProvider, data_dir: Path) -> None:
    sandbox = await bwrap.create(spec_for(bwrap, data_dir))
    status = await sandbox.exec(
        "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status", timeout=10, max_output=1000
    )
    assert status.output.split() == ["CapEff:", "0000000000000000", "NoNewPrivs:", "1"]
    mount = await sandbox.exec("mount -t tmpfs none /tmp", timeout=10, max_output=1000)
    assert mount.exit_code != 0
    assert (await sandbox.exec("touch /usr/x /etc/x", timeout=10, max_output=1000)).exit_code != 0
    assert (await sandbox.exec("hostname", timeout=10, max_output=100)).output.startswith("crogia-")


async def test_network_none_leaves_only_loopback(bwrap: BubblewrapProvider, data_dir: Path) -> None:
    sandbox = await bwrap.create(spec_for(bwrap, data_dir, limits=Limits(network="none")))
    result = await sandbox.exec("tail -n +3 /proc/net/dev | cut -d: -f1", timeout=10, max_output=1000)
    assert result.output.split() == ["lo"]


async def test_attach_restarts_or_recreates(bwrap: BubblewrapProvider, data_dir: Path) -> None:
    spec = spec_for(bwrap, data_dir)
    sandbox = await bwrap.create(spec)
    handle = await sandbox.spawn("echo from-before")
    await asyncio.sleep(0.2)
    await sandbox.stop()
    assert await bwrap.attach(spec, sandbox.id) is sandbox
    assert await sandbox.status() == "running"
    # A new server process knows nothing: it re-creates the sandbox around the same folders.
    later = BubblewrapProvider(storage=bwrap.storage)
    try:
        again = await later.attach(spec, sandbox.id)
        assert again is not sandbox
        assert await again.status() == "running"
        # Process logs live on the sandbox's state tmpfs: they end with the sandbox (a clear 404).
        with pytest.raises(NotFound, match="logs live in the sandbox"):
            await again.tail_log(handle.pid, lines=5)
    finally:
        await bwrap.remove(sandbox.id)
        await later.close()


async def test_create_twice_conflicts_and_remove_is_idempotent(
    bwrap: BubblewrapProvider, data_dir: Path
) -> None:
    spec = spec_for(bwrap, data_dir)
    sandbox = await bwrap.create(spec)
    with pytest.raises(Exception, match="already exists"):
        await bwrap.create(spec)
    await bwrap.remove(sandbox.id)
    await bwrap.remove(sandbox.id)
    await bwrap.remove("bwrap-never-existed")
    assert await sandbox.status() == "missing"


async def test_failed_start_is_fast_and_clean(data_dir: Path) -> None:
    provider = BubblewrapProvider(python="/usr/bin/no-such-python", storage=storage(data_dir))
    try:
        assert not await provider.available()
        started = time.monotonic()
        spec = spec_for(provider, data_dir)
        with pytest.raises(SandboxError):
            await provider.create(spec)
        assert time.monotonic() - started < 5
        assert f"bwrap-{spec.session_id}" not in await provider.managed_ids()
    finally:
        await provider.close()


async def test_long_state_path_still_connects(bwrap: BubblewrapProvider, data_dir: Path) -> None:
    deep = data_dir / ("d" * 60) / ("e" * 60)
    provider = BubblewrapProvider(storage=HostStorage(data_dir / "ws", deep))
    try:
        spec = spec_for(provider, data_dir)
        assert len(str(provider.paths(spec.session_id).state_dir / "executor.sock")) > 108
        sandbox = await provider.create(spec)
        assert (await sandbox.exec("echo ok", timeout=10, max_output=100)).output == "ok\n"
    finally:
        await provider.close()


SERVER = """
import asyncio, sys
from pathlib import Path
from crogia.sandbox.base import HostStorage, SandboxSpec
from crogia.sandbox.bubblewrap import BubblewrapProvider

async def main():
    storage = HostStorage(Path(sys.argv[2]), Path(sys.argv[3]))
    sandbox = await BubblewrapProvider(scope=sys.argv[4], storage=storage).create(SandboxSpec(sys.argv[1]))
    await sandbox.spawn("while true; do date +%s%N > /workspace/beat; sleep 0.05; done")
    print(sandbox.id, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_sandbox_dies_with_the_server(bwrap: BubblewrapProvider, data_dir: Path) -> None:
    spec = spec_for(bwrap, data_dir)
    folders = (str(data_dir / "ws"), str(data_dir / "st"))
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, spec.session_id, *folders, bwrap._scope,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        sandbox_id = (await asyncio.wait_for(server.stdout.readline(), 20)).decode().strip()
        beat = bwrap.paths(spec.session_id).workspace / "beat"
        for _ in range(100):
            if beat.exists():
                break
            await asyncio.sleep(0.05)
    finally:
        os.kill(server.pid, signal.SIGKILL)
        await server.wait()
    await asyncio.sleep(0.3)
    last = beat.read_text()
    await asyncio.sleep(0.4)
    assert beat.read_text() == last, "the sandbox outlived its server"
    # Its cgroup may be left behind; the next server finds and removes it.
    await bwrap.remove(sandbox_id)
    assert find_cgroup(bwrap._scope, sandbox_id) is None


async def test_a_killed_servers_private_folder_goes_with_the_next_of_its_scope(data_dir: Path) -> None:
    """resolv.conf and pasta's pid files live in `crogia-net-<scope>-*` in the temporary folder: one a
    server killed -9 left is removed by the next provider of that scope; a link planted under such a
    name (anyone may write there) is not followed, and a folder of another user's is left alone."""
    provider = BubblewrapProvider(storage=storage(data_dir))
    if not await provider.available():
        unavailable("bubblewrap")
    scope = provider._scope
    stale = Path(tempfile.mkdtemp(prefix=f"crogia-net-{scope}-"))
    (stale / "crogia-x.pasta.pid").write_text("1\n")
    keep = data_dir / "keep"
    keep.mkdir()
    (keep / "file").write_text("kept")
    planted = Path(tempfile.gettempdir()) / f"crogia-net-{scope}-planted"
    planted.symlink_to(keep)
    others = Path(tempfile.mkdtemp(prefix=f"crogia-net-{scope}-"))
    os.chown(others, 65534, 65534)  # (the test is root)
    try:
        await provider.create(spec_for(provider, data_dir))
        assert not stale.exists()
        assert len(ours(scope)) == 1 and (ours(scope)[0] / "resolv.conf").exists()
        await provider.close()
        assert not ours(scope)
        assert (keep / "file").read_text() == "kept"
        assert others.is_dir()
    finally:
        planted.unlink()
        others.rmdir()
        await provider.close()


def ours(scope: str) -> list[Path]:
    """The private folders of `scope` that are folders of root's (not links, not another user's)."""
    found = Path(tempfile.gettempdir()).glob(f"crogia-net-{scope}-*")
    return [p for p in found if not p.is_symlink() and p.lstat().st_uid == 0]
