"""Health."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter

from crogia import __version__
from crogia.api.deps import RuntimeDep
from crogia.api.schemas import Health
from crogia.sandbox.network import describe

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health", response_model=Health, summary="Health check (never needs a token)")
async def health(runtime: RuntimeDep) -> Health:
    store_error = runtime.bus.store_error
    return Health(
        status="degraded" if store_error else "healthy",
        timestamp=datetime.now(UTC),
        active_sessions=runtime.sessions.live_count(),
        active_shells=runtime.terminals.active_count(),
        docker_available=await runtime.docker_available(),
        sandbox_backend=runtime.provider.name,
        network=describe(runtime.settings.sandbox_network),
        version=__version__,
        store_error=store_error,
        userns=await runtime.provider.userns_mode(),
        seccomp=await runtime.provider.seccomp_mode(),
        files=runtime.settings.sandbox_files,
        transport=runtime.provider.transport + ("+tls" if runtime.provider.tls else ""),
    )
