"""Map Crogia's errors to HTTP statuses and `{"detail": ...}` bodies; never leak a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from crogia.errors import (
    Conflict,
    CrogiaError,
    InvalidInput,
    NotFound,
    SandboxError,
    TooLarge,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger(__name__)

STATUS: dict[type[CrogiaError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    SandboxError: 502,
    Unavailable: 503,
}


def status_for(exc: CrogiaError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def crogia_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CrogiaError)
    status = status_for(exc)
    if status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "Internal server error; see the server log."}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(CrogiaError, crogia_error)
    app.add_exception_handler(Exception, unexpected_error)
