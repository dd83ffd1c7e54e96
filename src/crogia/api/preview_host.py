"""`PreviewHost`: with PREVIEW_DOMAIN, `{port}-{session_id}.PREVIEW_DOMAIN` serves that preview at its root.

A pure-ASGI middleware in front of everything else: a request whose Host names a preview has its
path rewritten to `/api/sessions/{id}/ports/{port}/...` (so every path on that host reaches the
preview, never another route) and is marked, so the proxy sends no X-Forwarded-Prefix and a
signed link's cookie is scoped to that host.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from crogia.api.routes.previews import PREVIEW_HOST


class PreviewHost:
    def __init__(self, app: ASGIApp, *, domain: str) -> None:
        self.app = app
        self.pattern = re.compile(
            rf"(\d{{1,5}})-([A-Za-z0-9_-]{{1,64}})\.{re.escape(domain.lower())}(:\d{{1,5}})?"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1").lower()
            found = self.pattern.fullmatch(host)
            if found is not None:
                prefix = f"/api/sessions/{found[2]}/ports/{int(found[1])}"
                raw = scope.get("raw_path") or scope["path"].encode()
                scope = {
                    **scope,
                    "path": prefix + scope["path"],
                    "raw_path": prefix.encode() + raw,
                    PREVIEW_HOST: True,
                }
        await self.app(scope, receive, send)
