"""A sandbox removed, or its provider closed, while it is still starting leaves nothing behind.

The start is held (a wrapper around the backend's `_start` waits on an event) so the removal is
sure to come first; the start is let go afterwards, as a slow one would go on by itself. What must
not happen: a sandbox, a namespace or a pasta that comes up after the removal, owned by nobody
(a closed bubblewrap provider's stock used to refill itself: three namespaces and their pasta
outlived a server that had closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from crogia.errors import SandboxError, Unavailable
from crogia.sandbox.base import Sandbox, SandboxProvider
from crogia.sandbox.bubblewrap import BubblewrapProvider
from crogia.sandbox.cgroups import find_cgroup
from crogia.sandbox.executor import ExecutorSandbox
from crogia.sandbox.netns import NetnsStock, leftover_netns
from tests.conftest import storage
from tests.sandbox.conftest import new_spec, unavailable
from tests.support.pasta import pasta_of


class Held:
    """Every `_start` waits for `release` once it has told `reached` which sandbox it is."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached: asyncio.Queue[Sandbox] = asyncio.Queue()
        self.release = asyncio.Event()

        def hold(cls: type[ExecutorSandbox]) -> None:
            real: Callable[[ExecutorSandbox], Awaitable[None]] = cls._start

            async def held(sandbox: ExecutorSandbox) -> None:
                self.reached.put_nowait(sandbox)
                await self.release.wait()
                await real(sandbox)

            monkeypatch.setattr(cls, "_start", held)

        for cls in ExecutorSandbox.__subclasses__():
            hold(cls)


async def stock_tasks_done() -> None:
    """Whatever refills a stock of namespaces has finished (no one else would wait for it)."""
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("crogia-netns-stock")]
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


async def test_a_sandbox_removed_while_starting_never_comes_up(
    provider: SandboxProvider, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = Held(monkeypatch)
    creating = asyncio.create_task(provider.create(new_spec(provider, data_dir)))
    sandbox = await asyncio.wait_for(held.reached.get(), 30)
    await provider.remove(sandbox.id)
    held.release.set()
    outcome = (await asyncio.gather(creating, return_exceptions=True))[0]
    assert isinstance(outcome, SandboxError), outcome  # (Docker's: the container is gone)
    assert await sandbox.status() == "missing"
    assert sandbox.id not in await provider.managed_ids()
    await provider.remove_workspace(sandbox.spec.session_id)


async def test_a_closed_bubblewrap_provider_leaves_no_namespace(
    bwrap: BubblewrapProvider, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed with one sandbox up (its stock full) and one still starting: nothing of either stays."""
    await bwrap.create(new_spec(bwrap, data_dir))
    held = Held(monkeypatch)
    creating = asyncio.create_task(bwrap.create(new_spec(bwrap, data_dir)))
    late = await asyncio.wait_for(held.reached.get(), 30)
    await bwrap.close()
    held.release.set()
    outcome = (await asyncio.gather(creating, return_exceptions=True))[0]
    await stock_tasks_done()
    assert isinstance(outcome, SandboxError), outcome
    assert "removed while it was starting" in str(outcome)
    assert leftover_netns(bwrap._scope) == []
    assert find_cgroup(bwrap._scope, late.id) is None
    assert not pasta_of(bwrap._scope)
    with pytest.raises(Unavailable, match="closed"):
        await bwrap.create(new_spec(bwrap, data_dir))
    assert leftover_netns(bwrap._scope) == []


async def test_a_closed_stock_makes_no_namespace(tmp_path: Path) -> None:
    if not await BubblewrapProvider(storage=storage(tmp_path)).available():
        unavailable("bubblewrap")
    stock = NetnsStock("t" + tmp_path.name[-11:].replace("_", ""), tmp_path)
    await stock.close()
    with pytest.raises(Unavailable, match="closed"):
        await stock.take()
    await stock_tasks_done()
    assert leftover_netns(stock._scope) == []
