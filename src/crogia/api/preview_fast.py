"""`PreviewFast`: HTTP preview requests served below FastAPI's routing (the small-GET overhead).

A pure-ASGI middleware, the innermost one (inside CORS, BodyLimit and PreviewHost, so their
answers stay as they are): a request that the `preview_{method}` route is sure to be the one for
goes straight to `routes.previews.serve`, the route's own handler, without FastAPI's route
matching over every route and its dependency resolution (most of the proxy's own cost for a
small GET). Errors go through the app's own exception handlers, as the route's do.

Anything it is not sure of falls through to FastAPI unchanged: WebSocket upgrades, a port that
is not a plain 1..65535 (the route's 422), a method without a preview route (405), `POST
.../{port}/link`, `.../{port}` without its slash (the redirect), a root path, a path with a
newline (Starlette's `$` would match before it). `tests/previews/test_fast_path.py` checks that
both answer alike.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from crogia.api.routes.previews import METHODS, serve

PATH = re.compile(r"/api/sessions/([^/]+)/ports/([1-9][0-9]{0,4})/(.*)")
"""The preview route's path, `/{session_id}/ports/{port}/{path:path}`, with a canonical port."""
ROUTED = frozenset(METHODS)


def preview_params(scope: Scope) -> dict[str, Any] | None:
    """The preview route's path parameters, when it is sure to be that route's request; else None."""
    if scope["type"] != "http" or scope["method"] not in ROUTED or scope.get("root_path"):
        return None
    path: str = scope["path"]
    found = PATH.fullmatch(path) if "\n" not in path else None
    if found is None or int(found[2]) > 65535 or (found[3] == "link" and scope["method"] == "POST"):
        return None
    return {"session_id": found[1], "port": int(found[2]), "path": found[3]}


class PreviewFast:
    def __init__(self, app: ASGIApp, *, api: FastAPI) -> None:
        self.app = app
        # The handlers FastAPI gives its ExceptionMiddleware (500/Exception: ServerErrorMiddleware's,
        # outside every middleware, so a bug here is answered as anywhere else).
        handlers: dict[Any, Any] = {
            key: value for key, value in api.exception_handlers.items() if key not in (500, Exception)
        }
        self.handled = ExceptionMiddleware(self._serve, handlers=handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = preview_params(scope)
        if params is None:
            await self.app(scope, receive, send)
            return
        scope["path_params"] = params  # as the route has them (the error handlers read session_id)
        await self.handled(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        response = await serve(Request(scope, receive, send), params["session_id"], params["port"])
        await response(scope, receive, send)
