"""Health."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter

from crogia import __version__
from crogia.api.deps import RuntimeDep
from crogia.api.schemas import Health

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health", response_model=Health, summary="Health check (never needs a token)")
async def health(runtime: RuntimeDep) -> Health:
    return Health(
        status="healthy",
        timestamp=datetime.now(UTC),
        active_sessions=runtime.sessions.live_count(),
        docker_available=await runtime.docker_available(),
        sandbox_backend=runtime.provider.name,
        version=__version__,
        userns=await runtime.provider.userns_mode(),
        seccomp=await runtime.provider.seccomp_mode(),
    )
