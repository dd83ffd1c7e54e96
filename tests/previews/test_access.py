"""Who may open a preview: signed links and their cookie (API_TOKENS on), tenants, PREVIEW_DOMAIN hosts,
and a server in the sandbox that hangs (504 after PREVIEW_TIMEOUT)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import make_settings
from tests.previews.helpers import serve_app
from tests.support.server import run_server

TOKENS = "alice=tok-alice,bob=tok-bob"


async def test_a_signed_link_sets_a_cookie_for_that_preview_only(data_dir: Path, backend: str) -> None:
    settings = make_settings(data_dir, backend, api_tokens=TOKENS, preview_link_ttl=60)
    async with run_server(settings, token="tok-alice") as server:
        sid = str((await server.create_session())["session_id"])
        await serve_app(server, sid, 8000)
        await serve_app(server, sid, 8001)
        async with httpx.AsyncClient(base_url=server.base_url) as browser:  # no bearer: a browser
            assert (await browser.get(f"/api/sessions/{sid}/ports/8000/")).status_code == 401
            link = (await server.client.post(f"/api/sessions/{sid}/ports/8000/link")).json()
            assert "preview_token=" in link["url"]
            response = await browser.get(link["url"], follow_redirects=True)
            assert response.status_code == 200 and "hello from the sandbox" in response.text
            assert str(response.url) == f"{server.base_url}/api/sessions/{sid}/ports/8000/"  # the clean URL
            assert (
                "crogia_preview" not in response.text and "preview_token" not in response.text
            )  # app never sees them
            assert response.history[0].status_code == 303
            cookie = response.history[0].headers["set-cookie"]
            assert f"Path=/api/sessions/{sid}/ports/8000/" in cookie and "HttpOnly" in cookie
            assert (await browser.get(f"/api/sessions/{sid}/ports/8000/other")).status_code == 200
            # the cookie authorises that preview and nothing else
            assert (await browser.get(f"/api/sessions/{sid}/ports/8001/")).status_code == 401
            assert (await browser.get(f"/api/sessions/{sid}")).status_code == 401
            assert (await browser.get(f"/api/sessions/{sid}/ports")).status_code == 401
            jar = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
            assert jar.startswith("crogia_preview_8000_")
            response = await browser.get(
                f"/api/sessions/{sid}/files", headers={"Cookie": jar}
            )  # sent on purpose
            assert response.status_code == 401
        async with httpx.AsyncClient(base_url=server.base_url) as browser:
            forged = link["url"].replace("preview_token=", "preview_token=x")
            assert (await browser.get(forged)).status_code == 401
            other_port = link["url"].replace("/ports/8000/", "/ports/8001/")
            assert (await browser.get(other_port)).status_code == 401
        bob = {"Authorization": "Bearer tok-bob"}
        assert (await server.client.get(f"/api/sessions/{sid}/ports/8000/", headers=bob)).status_code == 404
        assert (
            await server.client.post(f"/api/sessions/{sid}/ports/8000/link", headers=bob)
        ).status_code == 404
        response = await server.client.get(f"/api/sessions/{sid}/ports/8000/")
        assert "authorization: " not in response.text.lower()  # our bearer token never reaches the sandbox


async def test_an_expired_link_is_refused(data_dir: Path, backend: str) -> None:
    settings = make_settings(data_dir, backend, api_tokens=TOKENS, preview_link_ttl=0.001)
    async with run_server(settings, token="tok-alice") as server:
        sid = str((await server.create_session())["session_id"])
        link = (await server.client.post(f"/api/sessions/{sid}/ports/8000/link")).json()
        expires = int(link["url"].split("preview_token=")[1].split(".")[1])
        assert expires < time.time()  # whole seconds, rounded down: expired as soon as made
        async with httpx.AsyncClient(base_url=server.base_url) as browser:
            response = await browser.get(link["url"])
            assert response.status_code == 401 and "expired" in response.json()["detail"]


async def test_preview_domain_serves_a_preview_at_the_root_of_its_host(data_dir: Path, backend: str) -> None:
    settings = make_settings(data_dir, backend, preview_domain="preview.test")
    async with run_server(settings) as server:
        sid = str((await server.create_session())["session_id"])
        await serve_app(server, sid, 8000)
        entry = (await server.client.get(f"/api/sessions/{sid}/ports")).json()["ports"][0]
        assert entry["url"] == f"http://8000-{sid}.preview.test/"
        host = {"Host": f"8000-{sid}.preview.test"}
        response = await server.client.get("/static/app.js?v=2", headers=host)
        assert response.status_code == 200 and "path=/static/app.js?v=2" in response.text
        assert (
            "x-forwarded-prefix" not in response.text
            and f"x-forwarded-host: 8000-{sid}.preview.test" in response.text
        )
        response = await server.client.get("/api/health", headers=host)  # every path is the app's
        assert "path=/api/health" in response.text
        response = await server.client.get("/", headers={"Host": f"99999-{sid}.preview.test"})
        assert response.status_code == 422
        assert (await server.client.get("/api/health")).json()["status"] == "healthy"  # other hosts: the API


async def test_a_hanging_server_is_a_504(data_dir: Path, backend: str) -> None:
    settings = make_settings(data_dir, backend, preview_timeout=1.0)
    async with run_server(settings) as server:
        sid = str((await server.create_session())["session_id"])
        await serve_app(server, sid, 8000)
        started = time.monotonic()
        response = await server.client.get(f"/api/sessions/{sid}/ports/8000/hang")
        assert response.status_code == 504 and "did not answer within 1 s" in response.json()["detail"]
        assert time.monotonic() - started < 10
        assert (await server.client.get(f"/api/sessions/{sid}/ports/8000/")).status_code == 200
