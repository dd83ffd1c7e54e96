"""Map Crogia's errors to HTTP statuses and `{"detail": ...}` bodies; never leak a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from crogia.api.schemas import ErrorBody
from crogia.errors import (
    Conflict,
    CrogiaError,
    Forbidden,
    InvalidInput,
    NotFound,
    SandboxError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

STATUS: dict[type[CrogiaError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    SandboxError: 502,
    Unavailable: 503,
    UpstreamTimeout: 504,
}


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Bad input: a bad path, pattern or value, or a body that is not valid JSON.",
        401: "A valid API token is required (only when API_TOKENS is set).",
        403: "Not allowed on this server (an image outside SANDBOX_IMAGES).",
        404: "Unknown session, task, process or file (also another tenant's session).",
        409: (
            "The request clashes with the current state (session stopped, task finished, file exists) "
            "or a cap (MAX_SESSIONS, MAX_SESSIONS_PER_TENANT)."
        ),
        413: "The body, the file or the output is larger than the configured limit.",
        502: "The sandbox failed in a way that is not the caller's fault.",
        503: "A dependency is down or busy: Docker engine, sandbox image, executor or database.",
    }.items()
}
"""Error answers every resource route may give, declared in the OpenAPI document (422 is FastAPI's)."""


def status_for(exc: CrogiaError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _deleted_meanwhile(request: Request) -> bool:
    """Whether the request's session is being deleted: its sandbox failing under it is then a 404."""
    session_id = request.path_params.get("session_id")
    runtime = getattr(request.app.state, "runtime", None)
    return bool(session_id) and runtime is not None and runtime.sessions.deleted(session_id)


async def crogia_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CrogiaError)
    status = status_for(exc)
    if status >= 500 and _deleted_meanwhile(request):
        return JSONResponse({"detail": "Session not found."}, status_code=404)
    if status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """The database could not answer (PostgreSQL down, SQLite locked by another process): retryable."""
    log.warning(
        "%s %s -> 503: database error: %s", request.method, request.url.path, str(exc).splitlines()[0]
    )
    body = {"detail": "The database is unavailable or busy; retry shortly."}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    if _deleted_meanwhile(request):  # e.g. its folders removed under a file request
        return JSONResponse({"detail": "Session not found."}, status_code=404)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "Internal server error; see the server log."}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(CrogiaError, crogia_error)
    app.add_exception_handler(OperationalError, database_error)
    app.add_exception_handler(Exception, unexpected_error)
