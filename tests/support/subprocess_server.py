"""The server as a separate process (`python -m crogia serve`), for crash and shutdown tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx

from tests.support.postgres import free_port


class ServerProcess:
    """Start, kill -9, or SIGTERM a real server process on a free port."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = {**os.environ, **env}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log = cwd / f"server-{self.port}.log"

    async def start(self, timeout: float = 60) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "crogia",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = asyncio.get_running_loop().time() + timeout
        async with httpx.AsyncClient() as client:
            while asyncio.get_running_loop().time() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
                try:
                    if (await client.get(f"{self.base_url}/api/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"server did not start: {self.log.read_text()[-2000:]}")

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                tail = self.log.read_text(errors="replace")[-3000:]  # how far its shutdown got
                raise TimeoutError(f"no graceful exit within {timeout} s; its log ends:\n{tail}") from None
        return self.proc.returncode or 0


def server_env(data_dir: Path, backend: str, model_url: str) -> dict[str, str]:
    """Settings for a server process on `data_dir` that talks to a scripted model."""
    return {
        "BASE_DIRECTORY": str(data_dir),
        "SANDBOX_BACKEND": backend,
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": model_url,
        "MODEL_RETRIES": "0",
        "LOG_LEVEL": "INFO",
        "SANDBOX_POOL_SIZE": "0",
    }
