"""Start-up reconciliation: the store's sessions become states, the sandboxes nobody owns go.

Every stored session enters the state machine `dormant`; the ones that were `active` when the
last server stopped are started at once (through the same `Lifecycle.up` as any request, so
there is one way a sandbox comes up). One whose sandbox cannot be started stays `dormant` and is
marked `stopped`: the next request that needs it tries again. Then managed sandboxes that no
session owns (orphans, the previous server's unclaimed pool sandboxes) are removed, and so is
what a crash left of sessions that are gone: their state folders, and their workspaces (host
folders, Docker volumes) unless WORKSPACE_RETENTION=keep; a dormant session's workspace stays.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from crogia.errors import CrogiaError
from crogia.store.tables import SessionRow

if TYPE_CHECKING:
    from crogia.services.sessions import SessionService

log = logging.getLogger(__name__)

PARALLEL = 8
"""Sandboxes started at once at start-up."""


async def reconcile(sessions: SessionService) -> None:
    """Give every active session its sandbox back; remove managed sandboxes no session owns."""
    await sessions.disks.probe()
    rows = await sessions.list(tenant=None)
    limit = asyncio.Semaphore(PARALLEL)

    async def start(row: SessionRow) -> None:
        async with limit:
            await _start(sessions, row)

    for row in rows:
        sessions.states.add(sessions.dormant(row))
    await asyncio.gather(*(start(row) for row in rows if row.status != "stopped"))
    owned = {live.sandbox_id for live in sessions.states.known() if live.sandbox_id}
    await _remove_orphans(sessions, owned)
    try:
        keep = sessions.settings.workspace_retention == "keep"
        await sessions.provider.sweep_workspaces({row.id for row in rows}, keep=keep)
    except CrogiaError as exc:
        log.warning("could not look for leftover workspaces: %s", exc.message)
    if sessions.pool is not None:  # the previous server's unclaimed pool sandboxes: their folders go too
        await sessions.pool.sweep({row.id for row in rows})


async def _start(sessions: SessionService, row: SessionRow) -> None:
    live = sessions.states.get(row.id)
    if live is None:
        return
    try:
        await sessions.states.up(live)
    except Exception as exc:
        log.error("session %s: sandbox could not be re-attached: %s", row.id, exc)
        await sessions.touch(row.id, status="stopped", last_activity=row.last_activity)


async def _remove_orphans(sessions: SessionService, owned: set[str]) -> None:
    try:
        managed = await sessions.provider.managed_ids()
    except CrogiaError as exc:
        log.warning("could not look for orphan sandboxes: %s", exc.message)
        return
    for sandbox_id in managed:
        if sandbox_id not in owned:
            log.info("removing orphan sandbox %s", sandbox_id)
            await sessions.provider.remove(sandbox_id)
