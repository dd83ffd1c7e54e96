"""Sessions: list, create, get, delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, status

from crogia.api.deps import RuntimeDep, SessionRowDep, TenantDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import Message, NetworkPolicy, SessionCreate, SessionPatch, SessionPublic
from crogia.runtime import Runtime
from crogia.sandbox.egress import EgressPolicy
from crogia.store.tables import SessionRow

router = APIRouter(prefix="/api/sessions", tags=["sessions"], responses=ERRORS)


async def session_public(runtime: Runtime, row: SessionRow) -> SessionPublic:
    return SessionPublic(
        session_id=row.id,
        container_id=row.sandbox_id,
        workdir=runtime.provider.workdir(row.id) or str(runtime.settings.workspaces_dir / row.id),
        created=row.created,
        last_task=row.last_task,
        status=row.status,
        container_status=await runtime.sessions.container_status(row.id),
        sandbox=row.sandbox_backend,
        last_activity=row.last_activity,
        task_running=runtime.tasks.is_running(row.id),
        label=row.label,
        image=row.image,
        metadata=row.meta,
        network=NetworkPolicy.of(EgressPolicy.from_json(row.network)),
        usage=await runtime.tasks.usage(row.id),
    )


@router.get("", response_model=list[SessionPublic], summary="List sessions")
async def list_sessions(runtime: RuntimeDep, tenant: TenantDep) -> list[SessionPublic]:
    rows = await runtime.sessions.list(tenant=tenant)
    return list(await asyncio.gather(*(session_public(runtime, row) for row in rows)))


@router.post("", response_model=SessionPublic, status_code=status.HTTP_200_OK, summary="Create a session")
async def create_session(body: SessionCreate, runtime: RuntimeDep, tenant: TenantDep) -> SessionPublic:
    """Create the workspace and the sandbox. `task` is a label: the task is posted to `/tasks` next."""
    row = await runtime.sessions.create(
        tenant=tenant,
        label=body.task,
        image=body.image,
        env=body.env,
        metadata=body.metadata,
        network=body.network.policy() if body.network is not None else None,
    )
    return await session_public(runtime, row)


@router.get("/{session_id}", response_model=SessionPublic, summary="Get a session")
async def get_session(row: SessionRowDep, runtime: RuntimeDep) -> SessionPublic:
    return await session_public(runtime, row)


@router.patch("/{session_id}", response_model=SessionPublic, summary="Change a session")
async def patch_session(
    body: SessionPatch, row: SessionRowDep, runtime: RuntimeDep, tenant: TenantDep
) -> SessionPublic:
    """Change its egress policy (`network`): new connections follow it at once, open ones stay."""
    row = await runtime.sessions.set_network(row.id, tenant=tenant, policy=body.network.policy())
    return await session_public(runtime, row)


@router.delete("/{session_id}", response_model=Message, summary="Delete a session")
async def delete_session(row: SessionRowDep, runtime: RuntimeDep, tenant: TenantDep) -> Message:
    """Stop its tasks and processes and remove its sandbox; the workspace goes per WORKSPACE_RETENTION."""
    await runtime.delete_session(row.id, tenant=tenant)
    return Message(message=f"Session {row.id} deleted")
