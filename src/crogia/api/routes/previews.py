"""Previews: the ports a sandbox listens on, and any request to them proxied through its daemon channel."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, cast
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Path, Request, WebSocket
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.types import Send
from starlette.websockets import WebSocketState

from crogia.api import preview_auth
from crogia.api.deps import DEFAULT_TENANT, LiveDep, RuntimeDep, TenantDep, bearer, tenant_for
from crogia.api.errors import ERRORS, status_for
from crogia.api.schemas import ErrorBody, PortList, PortPublic, PreviewLink
from crogia.errors import CrogiaError, Unauthorized
from crogia.frontdoor.zero_copy import LEND, ZERO_COPY
from crogia.runtime import Runtime
from crogia.sandbox.frame_pipe import PipeChunk
from crogia.services.preview_ws import pump_websocket, websocket_handshake
from crogia.services.previews import ClientInfo

log = logging.getLogger(__name__)

PREVIEW_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    502: {"model": ErrorBody, "description": "Nothing listens on that port, or its server broke HTTP."},
    504: {
        "model": ErrorBody,
        "description": "The sandbox's server did not answer in PREVIEW_TIMEOUT.",
    },
}
router = APIRouter(prefix="/api/sessions/{session_id}/ports", tags=["previews"], responses=PREVIEW_ERRORS)


class PipedResponse(StreamingResponse):
    """A `StreamingResponse` whose `PipeChunk`s go out as `http.response.zerocopysend` (spliced)."""

    def __init__(self, chunks: AsyncIterator[bytes | memoryview | PipeChunk], status_code: int) -> None:
        super().__init__(cast(AsyncIterator[bytes], chunks), status_code=status_code)
        self.chunks = chunks

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.chunks:
            if isinstance(chunk, PipeChunk):
                await send({"type": ZERO_COPY, "file": chunk, "count": len(chunk), "more_body": True})
            else:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
"""Declares the bearer scheme in the OpenAPI document; `_preview_tenant` decides."""
PortPath = Annotated[int, Path(ge=1, le=65535, description="A TCP port inside the sandbox.")]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
PREVIEW_HOST = "crogia.preview_host"
"""Scope key the preview-host middleware sets: the request came as `{port}-{id}.PREVIEW_DOMAIN`."""


def preview_url(request: Request | WebSocket, session_id: str, port: int) -> str:
    domain = request.app.state.settings.preview_domain
    scheme = "https" if request.url.scheme in ("https", "wss") else "http"
    if domain:
        return f"{scheme}://{port}-{session_id}.{domain}/"
    base = str(request.base_url).rstrip("/").replace("ws://", "http://").replace("wss://", "https://")
    return f"{base}/api/sessions/{session_id}/ports/{port}/"


@router.get("", response_model=PortList, summary="What listens inside the sandbox now")
async def list_ports(request: Request, live: LiveDep, runtime: RuntimeDep) -> PortList:
    ports = await runtime.previews.ports(live)
    running = {row.pid for row in await runtime.processes.list(live.id) if row.status == "running"}
    return PortList(
        ports=[
            PortPublic(
                port=p.port,
                url=preview_url(request, live.id, p.port),
                address=p.address,
                pid=p.pid,
                process=next((pid for pid in (p.pgid, p.pid) if pid in running), None),
            )
            for p in ports
        ]
    )


@router.post("/{port}/link", response_model=PreviewLink, summary="A short-lived signed link for a browser")
async def preview_link(request: Request, port: PortPath, live: LiveDep, tenant: TenantDep) -> PreviewLink:
    settings = request.app.state.settings
    key: bytes = request.app.state.preview_key
    token, expires = preview_auth.make_token(key, "link", tenant, live.id, port, settings.preview_link_ttl)
    url = preview_url(request, live.id, port) + "?" + urlencode({preview_auth.LINK_PARAM: token})
    return PreviewLink(url=url, expires=datetime.fromtimestamp(expires, UTC))


def _preview_tenant(conn: Request | WebSocket, session_id: str, port: int) -> str:
    """The caller's tenant: a bearer token, or this preview's cookie (with API_TOKENS on)."""
    tokens: dict[str, str] = conn.app.state.tokens
    if not tokens:
        return DEFAULT_TENANT
    header = conn.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return tenant_for(tokens, header[7:].strip())
    cookie = conn.cookies.get(preview_auth.cookie_name(session_id, port))
    if cookie:
        tenant = preview_auth.verify(conn.app.state.preview_key, "cookie", cookie, session_id, port)
        if tenant is not None and tenant in tokens.values():
            return tenant
    raise Unauthorized("A valid API token or this preview's cookie (from POST .../link) is required.")


def _target(conn: Request | WebSocket, session_id: str, port: int) -> str:
    raw = conn.scope.get("raw_path") or conn.scope["path"].encode()
    path = raw.decode("latin-1")
    prefix = f"/api/sessions/{session_id}/ports/{port}"
    path = path[len(prefix) :] if path.startswith(prefix) else path
    query = conn.scope.get("query_string", b"").decode("latin-1")
    if preview_auth.LINK_PARAM in query:
        query = urlencode(
            [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != preview_auth.LINK_PARAM]
        )
    return (path or "/") + ("?" + query if query else "")


def _info(conn: Request | WebSocket, session_id: str, port: int) -> ClientInfo:
    via_host = bool(conn.scope.get(PREVIEW_HOST))
    scheme = conn.scope.get("scheme", "http")  # what `conn.url.scheme` says, without building the URL
    return ClientInfo(
        address=conn.client.host if conn.client else "",
        scheme="https" if scheme in ("https", "wss") else "http",
        host=conn.headers.get("host", ""),
        prefix="" if via_host else f"/api/sessions/{session_id}/ports/{port}",
        drop_cookie=True,
        drop_authorization=bool(conn.app.state.tokens),
    )


async def _open_link(request: Request, runtime: Runtime, session_id: str, port: int) -> Response | None:
    """A signed link being opened: set this preview's cookie and redirect to the clean URL."""
    if not request.app.state.tokens:
        return None
    token = request.query_params.get(preview_auth.LINK_PARAM)
    if token is None:
        return None
    key: bytes = request.app.state.preview_key
    tenant = preview_auth.verify(key, "link", token, session_id, port)
    if tenant is None:
        raise Unauthorized("The preview link is invalid or has expired: ask for a new one (POST .../link).")
    await runtime.sessions.get(session_id, tenant=tenant)  # the session is still there
    settings = request.app.state.settings
    cookie, _ = preview_auth.make_token(key, "cookie", tenant, session_id, port, settings.preview_cookie_ttl)
    clean = _target(request, session_id, port)
    via_host = bool(request.scope.get(PREVIEW_HOST))
    prefix = "" if via_host else f"/api/sessions/{session_id}/ports/{port}"
    response = RedirectResponse(prefix + clean, status_code=303)
    response.set_cookie(
        preview_auth.cookie_name(session_id, port),
        cookie,
        max_age=int(settings.preview_cookie_ttl),
        path="/" if via_host else prefix + "/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return response


@router.api_route("/{port}", methods=METHODS, include_in_schema=False, operation_id="preview_root")
async def preview_root(request: Request, session_id: str, port: PortPath) -> Response:
    query = request.url.query
    return RedirectResponse(f"{request.url.path}/" + (f"?{query}" if query else ""), status_code=307)


async def preview(
    request: Request, session_id: str, port: PortPath, path: str, runtime: RuntimeDep, credentials: BearerDep
) -> Response:
    """The bearer token (`credentials`, declared for the OpenAPI document) or the preview's cookie."""
    return await serve(request, session_id, port)


async def serve(request: Request, session_id: str, port: int) -> Response:
    """One HTTP preview request: the route's, and the fast path's (`crogia.api.preview_fast`) too."""
    runtime: Runtime = request.app.state.runtime
    opened = await _open_link(request, runtime, session_id, port)
    if opened is not None:
        return opened
    tenant = _preview_tenant(request, session_id, port)
    live = await runtime.sessions.live(session_id, tenant=tenant)
    extensions = request.scope.get("extensions", {})
    upstream = await runtime.previews.http(
        live,
        port,
        method=request.method,
        target=_target(request, session_id, port),
        headers=request.headers.raw,
        body=request.stream(),
        info=_info(request, session_id, port),
        zero_copy=runtime.settings.preview_splice and ZERO_COPY in extensions,
        lend=extensions.get(LEND, {}).get("lend"),
    )
    response: Response
    if isinstance(upstream.body, bytes):
        response = Response(upstream.body, status_code=upstream.status)
    else:
        response = PipedResponse(upstream.body, status_code=upstream.status)
    response.raw_headers = upstream.headers  # the sandbox's own, Content-Length included
    return response


for _method in METHODS:  # one route per method: each gets its own operation id in the OpenAPI document
    router.add_api_route(
        "/{port}/{path:path}",
        preview,
        methods=[_method],
        operation_id=f"preview_{_method.lower()}",
        summary="Any request, proxied to that port inside the sandbox (WebSocket upgrades too)",
        response_class=Response,
    )


@router.websocket("/{port}/{path:path}")
async def preview_ws(websocket: WebSocket, session_id: str, port: int, path: str) -> None:
    runtime = websocket.app.state.runtime
    if not 1 <= port <= 65535:
        await websocket.close(1008, "port must be within 1..65535")
        return
    try:
        tenant = _preview_tenant(websocket, session_id, port)
        live = await runtime.sessions.live(session_id, tenant=tenant)
        tunnel = await runtime.previews.open(live, port)
    except CrogiaError as exc:
        await _deny(websocket, status_for(exc), exc.message)
        return
    try:
        settings = runtime.settings
        protocol, early = await websocket_handshake(
            tunnel,
            port,
            _target(websocket, session_id, port),
            websocket.headers.raw,
            _info(websocket, session_id, port),
            timeout=settings.preview_timeout,
            max_size=4 << 20,
        )
    except CrogiaError as exc:
        await tunnel.close()
        await _deny(websocket, status_for(exc), exc.message)
        return
    except BaseException:
        await tunnel.close()
        raise
    await websocket.accept(subprotocol=protocol.subprotocol)
    with live.in_use():
        await pump_websocket(protocol, tunnel, websocket, early, timeout=settings.preview_timeout)
    if WebSocketState.DISCONNECTED not in (websocket.client_state, websocket.application_state):
        # The sandbox's side failed (gave up on, broke the protocol) without a close of its own.
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(1011, "the server in the sandbox stopped answering")


async def _deny(websocket: WebSocket, status: int, detail: str) -> None:
    try:
        await websocket.send_denial_response(Response(detail, status_code=status, media_type="text/plain"))
    except RuntimeError:  # the server cannot send an HTTP answer to an upgrade
        await websocket.close(1011, detail[:120])
