"""A real browser (headless Chromium) opens a signed preview link: cookie, redirect, then the app's page."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.previews.helpers import serve_app
from tests.support.server import run_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


async def test_headless_chromium_opens_a_signed_link(
    data_dir: Path, backend: str, chromium: str, tmp_path: Path
) -> None:
    settings = make_settings(data_dir, backend, api_tokens="alice=tok-alice")
    async with run_server(settings, token="tok-alice") as server:
        sid = str((await server.create_session())["session_id"])
        await serve_app(server, sid, 8000)
        link = (await server.client.post(f"/api/sessions/{sid}/ports/8000/link")).json()["url"]
        browser = await asyncio.create_subprocess_exec(
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", link,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            page, _ = await asyncio.wait_for(browser.communicate(), 60)
        finally:
            if browser.returncode is None:
                browser.kill()
                await browser.wait()
        text = page.decode()
        assert "hello from the sandbox" in text, text[:2000]
        assert "path=/\n" in text  # the clean URL, without the token
        assert "crogia_preview" not in text  # the app never sees the cookie
