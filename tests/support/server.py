"""Run the real app behind the front door (`crogia serve`'s protocol and limits) on a free port,
in the test's own event loop."""

from __future__ import annotations

import asyncio
import functools
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from crogia.app import create_app
from crogia.config import Settings
from crogia.frontdoor import fds
from crogia.frontdoor.limits import FrontDoorConfig, FrontDoorLimits
from crogia.frontdoor.serve import uvicorn_options
from crogia.runtime import Runtime


@dataclass
class RunningServer:
    base_url: str
    ws_url: str
    client: httpx.AsyncClient
    settings: Settings
    server: uvicorn.Server

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.server.config.app.state.runtime  # type: ignore[attr-defined]
        return runtime

    async def create_session(self, **body: object) -> dict[str, object]:
        response = await self.client.post("/api/sessions", json=body)
        assert response.status_code == 200, response.text
        data: dict[str, object] = response.json()
        return data


@asynccontextmanager
async def run_server(settings: Settings, *, token: str | None = None) -> AsyncIterator[RunningServer]:
    app = create_app(settings)
    options = {**uvicorn_options(settings), "ws_max_size": 4 << 20}
    limits = FrontDoorLimits.from_settings(settings, fds.plan(settings))
    config = FrontDoorConfig(  # the front door `crogia serve` runs (its protocol, its limits)
        app,
        front_door=limits,
        host="127.0.0.1",
        port=0,
        loop="asyncio",
        log_level="warning",
        lifespan="on",
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as client:
            yield RunningServer(base, f"ws://127.0.0.1:{port}", client, settings, server)
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)


@functools.cache
def docker_ready() -> str | None:
    """None when the Docker engine answers and the sandbox image exists; else why not."""
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker is not usable: {exc}"
    if info.returncode != 0:
        return "the Docker engine does not answer"
    image = Settings(_env_file=None).docker_base_image  # type: ignore[call-arg]
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=20)
    if inspect.returncode != 0:
        return f"the sandbox image {image} is missing (run `crogia image build`)"
    return None
