"""The TCP channel (SANDBOX_TRANSPORT=tcp) proves both ends to each other (issue 11, item 4).

A real daemon (`--listen`) on a loopback port and the server's real `TcpChannel`: a stranger that
does not know the secret gets nothing but a challenge and a closed connection, a recorded answer
is worth nothing on the next connection, and a peer that answers at the sandbox's address
without knowing the secret (a sandbox impersonating another's daemon) is refused by the server,
also when it replays a real daemon's hello or reflects the server's own proof. The Docker side
(another container dialling a sandbox's port) is in tests/sandbox/test_docker_tcp.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from crogia.errors import Unavailable
from crogia.sandbox.channel import Stream
from crogia.sandbox.daemon import executor_auth as auth
from crogia.sandbox.daemon.executor_proto import ProtocolError
from crogia.sandbox.executor import _BOOT, DAEMON_DIR
from crogia.sandbox.executor_client import ExecutorClient
from crogia.sandbox.tcp_channel import Address, TcpChannel
from tests.support.postgres import free_port


@dataclass
class Daemon:
    port: int
    secret_file: Path
    proc: asyncio.subprocess.Process

    @property
    def secret(self) -> str:
        return self.secret_file.read_text()

    def channel(self, secret: str | None = None) -> TcpChannel:
        return TcpChannel(_at(("127.0.0.1", self.port)), lambda: self.secret if secret is None else secret)


def _at(address: Address) -> Callable[[], Awaitable[Address]]:
    async def get() -> Address:
        return address

    return get


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    secret_file = tmp_path / "secret"
    secret_file.write_text(secrets.token_urlsafe(32))
    port = free_port()
    cmd = [sys.executable, "-S", "-c", _BOOT, str(DAEMON_DIR), "--listen", str(port)]
    cmd += ["--secret-file", str(secret_file), "--log-dir", str(tmp_path / "logs")]
    proc = await asyncio.create_subprocess_exec(*cmd, stderr=subprocess.DEVNULL)
    running = Daemon(port, secret_file, proc)
    try:
        client = ExecutorClient(await running.channel().connect(10))  # it listens once this answers
        await client.close()
        yield running
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A bare connection to the daemon, and the nonce of its challenge."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    challenge = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert challenge["type"] == "challenge" and auth.is_nonce(challenge["nonce"])
    return reader, writer, challenge["nonce"]


async def _refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True when the daemon closes the connection without a word more."""
    try:
        rest = await asyncio.wait_for(reader.read(), auth.TIMEOUT + 5)
    finally:
        writer.close()
    return rest == b""


async def _ping(stream: Stream) -> int:
    client = ExecutorClient(stream)
    try:
        return int((await client.request("ping"))["pid"])
    finally:
        await client.close()


async def test_the_server_with_the_secret_gets_through(daemon: Daemon) -> None:
    assert await _ping(await daemon.channel().connect(5)) == daemon.proc.pid


async def test_a_stranger_without_the_secret_gets_no_hello(daemon: Daemon) -> None:
    reader, writer, _ = await _raw(daemon.port)
    ours = auth.nonce()
    writer.write((json.dumps({"type": "auth", "nonce": ours, "proof": "0" * 64}) + "\n").encode())
    assert await _refused(reader, writer)
    # Nor with a proof made with a wrong secret, nor by skipping the answer and sending requests.
    wrong = daemon.channel(secret="not-the-secret")
    with pytest.raises(ProtocolError):
        await wrong.connect(1.0)
    reader, writer, _ = await _raw(daemon.port)
    writer.write(b'{"id": 1, "op": "exec", "cmd": "touch /tmp/pwned"}\n')
    assert await _refused(reader, writer)
    assert await _ping(await daemon.channel().connect(5)) == daemon.proc.pid  # and it still serves


async def test_a_replayed_answer_is_refused(daemon: Daemon) -> None:
    reader, writer, nonce = await _raw(daemon.port)
    ours = auth.nonce()
    answer = {"type": "auth", "nonce": ours, "proof": auth.proof(daemon.secret, "server", nonce, ours)}
    writer.write((json.dumps(answer) + "\n").encode())
    assert json.loads(await asyncio.wait_for(reader.readline(), 5))["type"] == "hello"
    writer.close()
    # Recorded on the wire, the same answer on a new connection (a new challenge) opens nothing.
    reader, writer, _ = await _raw(daemon.port)
    writer.write((json.dumps(answer) + "\n").encode())
    assert await _refused(reader, writer)


async def test_a_silent_stranger_is_dropped(daemon: Daemon) -> None:
    reader, writer, _ = await _raw(daemon.port)
    assert await _refused(reader, writer)  # within auth.TIMEOUT, without a word


class Impostor:
    """Listens where the sandbox's daemon should be, without its secret: `answer` makes its hello."""

    def __init__(self, answer: Callable[[dict[str, str], dict[str, str]], dict[str, object]]) -> None:
        self.answer = answer
        self.heard: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> Address:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        challenge = {"type": "challenge", "nonce": auth.nonce()}
        writer.write((json.dumps(challenge) + "\n").encode())
        line = await reader.readline()
        if line:
            heard = json.loads(line)
            self.heard.append(heard)
            writer.write((json.dumps(self.answer(challenge, heard)) + "\n").encode())
            await writer.drain()
            await reader.read()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("how", ["guess", "reflect", "replay", "no-proof"])
async def test_a_sandbox_impersonating_the_daemon_is_refused(daemon: Daemon, how: str) -> None:
    # A real daemon's hello, recorded: what a sandbox on the path could have seen.
    recorded: dict[str, object] = {}
    reader, writer, nonce = await _raw(daemon.port)
    ours = auth.nonce()
    writer.write(
        (
            json.dumps(
                {"type": "auth", "nonce": ours, "proof": auth.proof(daemon.secret, "server", nonce, ours)}
            )
            + "\n"
        ).encode()
    )
    recorded.update(json.loads(await asyncio.wait_for(reader.readline(), 5)))
    writer.close()

    def answer(challenge: dict[str, str], heard: dict[str, str]) -> dict[str, object]:
        hello: dict[str, object] = {"type": "hello", "version": recorded["version"], "pid": 7}
        if how == "guess":
            hello["secret"] = auth.proof("a-guess", "daemon", challenge["nonce"], heard["nonce"])
        elif how == "reflect":  # the server's own proof, sent back
            hello["secret"] = heard["proof"]
        elif how == "replay":
            hello = dict(recorded)
        else:
            hello["secret"] = ""
        return hello

    impostor = Impostor(answer)
    address = await impostor.start()
    try:
        channel = TcpChannel(_at(address), lambda: daemon.secret)
        with pytest.raises(ProtocolError):
            await channel.connect(1.0)
        assert impostor.heard, "the impostor was never dialled: the test proves nothing"
        assert "did not prove" in channel.refused or "secret" in channel.refused
        # What the impostor heard is no use against the real daemon either.
        reader, writer, _ = await _raw(daemon.port)
        writer.write((json.dumps(impostor.heard[-1]) + "\n").encode())
        assert await _refused(reader, writer)
    finally:
        await impostor.close()


async def test_a_dropped_connection_is_dialled_again(daemon: Daemon) -> None:
    channel = daemon.channel()
    client = ExecutorClient(await channel.connect(5))
    spawned = await client.request("spawn", cmd="sleep 30", cwd="/", env={})
    client._writer.transport.abort()  # type: ignore[attr-defined]  # the network drops it
    await client.close()
    client = ExecutorClient(await channel.connect(5))
    try:
        listing = await client.request("list", allow=1 << 20)
        assert (await client.request("ping"))["pid"] == daemon.proc.pid, "the daemon restarted"
        assert any(p["pid"] == spawned["pid"] and p["running"] for p in listing["processes"])
    finally:
        await client.request("terminate", pid=spawned["pid"], grace=0.1)
        await client.close()


async def test_the_newest_proven_connection_wins(daemon: Daemon) -> None:
    first = ExecutorClient(await daemon.channel().connect(5))
    second = ExecutorClient(await daemon.channel().connect(5))
    try:
        assert (await second.request("ping"))["pid"] == daemon.proc.pid
        with pytest.raises(Unavailable):  # the daemon closed the older one
            await asyncio.wait_for(first.request("ping"), 5)
    finally:
        await first.close()
        await second.close()
