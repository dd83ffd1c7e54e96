"""The preview fast path (`crogia.api.preview_fast`) answers exactly as the preview route does.

It takes only what the route is sure to take, and everything it answers is compared with the
route's own answer to the same request: `.../ports/08000/` is the same port to the route (FastAPI
reads it as 8000) but not canonical, so the fast path leaves it to FastAPI.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.routing import Match

from crogia.api import routes
from crogia.api.preview_fast import preview_params
from tests.conftest import make_settings
from tests.previews.helpers import serve_app
from tests.support.server import RunningServer, run_server

TOKENS = "alice=tok-alice,bob=tok-bob"
ORIGIN = "http://localhost:5173"
ROUTERS = [
    importlib.import_module(f"{routes.__name__}.{m.name}") for m in pkgutil.iter_modules(routes.__path__)
]


def _scope(method: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "headers": [], **extra}


def _full_matches(scope: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every route of the app's routers that matches `scope` whole: (its name, its path parameters)."""
    found = []
    for module in ROUTERS:
        for route in module.router.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                found.append((route.name, child.get("path_params", {})))
    return found


def test_the_fast_path_takes_only_what_the_preview_route_takes() -> None:
    sid = "3f7c-a_b"
    taken = [
        ("GET", f"/api/sessions/{sid}/ports/8000/"),
        ("HEAD", f"/api/sessions/{sid}/ports/1/a/b%2F/c"),
        ("POST", f"/api/sessions/{sid}/ports/65535/upload"),
        ("GET", f"/api/sessions/{sid}/ports/8000/link"),  # only POST .../link is the link route
        ("POST", f"/api/sessions/{sid}/ports/8000/link/"),
        ("DELETE", f"/api/sessions/{sid}/ports/8000//x?"),
        ("OPTIONS", f"/api/sessions/{sid}/ports/8000/ports/9000/"),
    ]
    for method, path in taken:
        params = preview_params(_scope(method, path))
        assert params is not None, (method, path)
        matches = _full_matches(_scope(method, path))
        assert [name for name, _ in matches] == ["preview"], (method, path, matches)
        assert {**matches[0][1], "port": int(matches[0][1]["port"])} == params
    left = [
        _scope("POST", f"/api/sessions/{sid}/ports/8000/link"),  # the link route
        _scope("GET", f"/api/sessions/{sid}/ports/8000"),  # the redirect to the slash
        *(
            _scope("GET", f"/api/sessions/{sid}/ports/{port}/")
            for port in ("0", "65536", "08000", "+80", "http")
        ),
        _scope("TRACE", f"/api/sessions/{sid}/ports/8000/"),  # no route: FastAPI's 405
        _scope("GET", f"/api/sessions/{sid}/ports/8000/x\n"),
        _scope("GET", f"/api/sessions/{sid}/ports/8000/", root_path="/behind"),
        {**_scope("GET", f"/api/sessions/{sid}/ports/8000/"), "type": "websocket"},
        _scope("GET", f"/api/sessions/{sid}/files/x"),
    ]
    for scope in left:
        assert preview_params(scope) is None, scope


async def _same(
    client: httpx.AsyncClient, method: str, path: str, *, proxied: bool = False, **kwargs: Any
) -> httpx.Response:
    """The request through the fast path (port 8000) and through the route (08000): one answer.

    A callable `content` is called for each (a streamed body is read once). A `proxied` answer
    comes from the sandbox's server, which sees two paths: its body is not compared."""
    content = kwargs.pop("content", None)

    async def ask(url: str) -> httpx.Response:
        body = content() if callable(content) else content
        return await client.request(method, url, content=body, **kwargs)

    fast = await ask(path)
    routed = await ask(path.replace("/ports/8000/", "/ports/08000/"))
    assert fast.status_code == routed.status_code, (fast.text, routed.text)
    assert proxied or fast.content == routed.content
    names = (
        "content-type",
        "www-authenticate",
        "access-control-allow-origin",
        "access-control-allow-credentials",
    )
    assert {n: fast.headers.get(n) for n in names} == {n: routed.headers.get(n) for n in names}
    return fast


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 1000):
        yield b"b" * 1000


async def test_errors_auth_cors_and_limits_are_the_routes(data_dir: Path, backend: str) -> None:
    settings = make_settings(
        data_dir, backend, api_tokens=TOKENS, allowed_origins=[ORIGIN], request_max_bytes=100_000
    )
    async with run_server(settings, token="tok-alice") as server:
        sid = str((await server.create_session())["session_id"])
        base = f"/api/sessions/{sid}/ports/8000"
        client = server.client
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as anonymous:
            answer = await _same(anonymous, "GET", f"{base}/")
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            answer = await _same(anonymous, "GET", f"{base}/?preview_token=forged")
            assert answer.status_code == 401 and "invalid or has expired" in answer.json()["detail"]
        bob = {"Authorization": "Bearer tok-bob"}
        assert (await _same(client, "GET", f"{base}/", headers=bob)).status_code == 404  # another tenant's
        answer = await _same(client, "GET", "/api/sessions/no-such-session/ports/8000/x")
        assert answer.status_code == 404 and answer.json() == {"detail": "Session no-such-session not found."}
        answer = await _same(client, "GET", f"{base}/")  # nothing listens yet
        assert answer.status_code == 502 and "Nothing listens on port 8000" in answer.json()["detail"]
        declared = b"x" * 100_001
        answer = await _same(client, "POST", f"{base}/upload", content=declared)
        assert answer.status_code == 413 and "100000 bytes" in answer.json()["detail"]
        await serve_app(server, sid, 8000)
        answer = await _same(
            client, "POST", f"{base}/upload", content=lambda: _chunks(200_000)
        )  # no length: counted
        assert answer.status_code == 413
        # CORS: an allowed origin's answer carries the same headers as any other route's
        cors = {"Origin": ORIGIN}
        answer = await client.get(f"{base}/x", headers=cors)
        other = await client.get(f"/api/sessions/{sid}", headers=cors)
        assert answer.status_code == 200 and "hello from the sandbox" in answer.text
        assert (
            answer.headers["access-control-allow-origin"]
            == ORIGIN
            == other.headers["access-control-allow-origin"]
        )
        assert answer.headers["access-control-allow-credentials"] == "true"
        assert "x-secret" not in answer.headers  # the proxy's own header handling, as before
        await _same(client, "GET", f"{base}/", headers=cors, proxied=True)
        preflight = {**cors, "Access-Control-Request-Method": "PUT"}
        answer = await _same(client, "OPTIONS", f"{base}/x", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
        for bad in ("0", "65536", "http"):  # FastAPI's 422, in the shape of the app's other 422s
            answer = await client.get(f"/api/sessions/{sid}/ports/{bad}/")
            assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["path", "port"]


async def test_the_fast_path_wakes_a_stopped_session(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    await serve_app(server, sid, 8000)
    assert (await server.client.get(f"/api/sessions/{sid}/ports/8000/")).status_code == 200
    live = server.runtime.sessions.peek(sid)
    assert live is not None and await server.runtime.sessions.sleep(live, idle_for=0)
    assert live.state == "asleep"
    answer = await server.client.get(f"/api/sessions/{sid}/ports/8000/")
    assert answer.status_code == 502 and "Nothing listens on port 8000" in answer.json()["detail"]
    assert live.state == "running"  # woken by the preview; its server went with the old sandbox
    await serve_app(server, sid, 8000)
    assert (await server.client.get(f"/api/sessions/{sid}/ports/8000/")).status_code == 200
