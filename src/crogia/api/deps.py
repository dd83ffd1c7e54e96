"""Dependencies: the runtime, the caller's tenant, and the session a route works on."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from crogia.errors import Unauthorized
from crogia.runtime import Runtime
from crogia.services.sessions import LiveSession
from crogia.store.tables import SessionRow

DEFAULT_TENANT = "default"

_bearer = HTTPBearer(auto_error=False, description="A token from API_TOKENS (when set).")
bearer = _bearer


def tenant_for(tokens: dict[str, str], token: str | None) -> str:
    if not tokens:
        return DEFAULT_TENANT
    if token:
        found = None
        for known, tenant in tokens.items():
            # Compare against every token so timing says nothing about which one was close.
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        if found is not None:
            return found
    raise Unauthorized("A valid API token is required (Authorization: Bearer <token>).")


# The dependencies are `async def` although they never wait: FastAPI runs a plain `def` dependency
# in a worker thread, a hop that cost every request more than the rest of its dependencies together.


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    tokens: dict[str, str] = request.app.state.tokens
    return tenant_for(tokens, credentials.credentials if credentials else None)


def ws_tenant(websocket: WebSocket) -> str:
    tokens: dict[str, str] = websocket.app.state.tokens
    header = websocket.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return tenant_for(tokens, header[7:].strip())
    token = websocket.query_params.get("token")
    return tenant_for(tokens, token)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
TenantDep = Annotated[str, Depends(get_tenant)]


async def get_session_row(session_id: str, runtime: RuntimeDep, tenant: TenantDep) -> SessionRow:
    return await runtime.sessions.get(session_id, tenant=tenant)


async def get_live_session(session_id: str, runtime: RuntimeDep, tenant: TenantDep) -> LiveSession:
    """The session with its sandbox running (the state machine starts a stopped one): every route
    that needs a sandbox comes here; 404 once a delete has started, 409 while it is being created."""
    return await runtime.sessions.live(session_id, tenant=tenant)


SessionRowDep = Annotated[SessionRow, Depends(get_session_row)]
LiveDep = Annotated[LiveSession, Depends(get_live_session)]
