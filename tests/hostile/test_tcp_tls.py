"""TLS on the TCP channel (SANDBOX_TCP_TLS, issue 11, item 4).

A real daemon (`--listen --tls-cert --tls-key`) on a loopback port, with a certificate made the
way the Docker provider makes one, and the server's real `TcpChannel` pinning it: the server gets
through; a plain-TCP client gets nothing (not even a challenge); a TLS client without the secret
gets a challenge and a closed connection; a man in the middle with another certificate is refused
by the server, and one the server were made to trust anyway cannot splice the real daemon's
proofs through (they are bound to the certificate); a peer that answers in plain TCP where TLS is
expected is refused (no downgrade). A plain `--listen` daemon does not import `ssl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crogia.sandbox.daemon import executor_auth as auth
from crogia.sandbox.daemon.executor_proto import ProtocolError
from crogia.sandbox.docker import self_signed
from crogia.sandbox.executor import _BOOT, DAEMON_DIR
from crogia.sandbox.executor_client import ExecutorClient
from crogia.sandbox.tcp_channel import TcpChannel
from tests.hostile.test_tcp_channel import _at, _ping
from tests.support.postgres import free_port


@dataclass
class TlsDaemon:
    port: int
    secret: str
    cert: str
    proc: asyncio.subprocess.Process

    def channel(self, cert: str | None = None, port: int | None = None) -> TcpChannel:
        pinned = self.cert if cert is None else cert
        return TcpChannel(_at(("127.0.0.1", port or self.port)), lambda: self.secret, lambda: pinned)


async def _start(
    tmp_path: Path, tls: bool, stderr: Path | None = None
) -> tuple[int, asyncio.subprocess.Process]:
    port = free_port()
    cmd = [sys.executable, "-S"] + (["-X", "importtime"] if stderr else [])
    cmd += ["-c", _BOOT, str(DAEMON_DIR), "--listen", str(port)]
    cmd += ["--secret-file", str(tmp_path / "secret"), "--log-dir", str(tmp_path / "logs")]
    if tls:
        cmd += ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    with open(stderr or "/dev/null", "wb") as err:
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=err)
    return port, proc


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    await proc.wait()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[TlsDaemon]:
    secret = secrets.token_urlsafe(32)
    cert, key = await self_signed()
    (tmp_path / "secret").write_text(secret)
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_bytes(key)
    port, proc = await _start(tmp_path, tls=True)
    running = TlsDaemon(port, secret, cert, proc)
    try:
        client = ExecutorClient(await running.channel().connect(10))  # it listens once this answers
        await client.close()
        yield running
    finally:
        await _stop(proc)


def _insecure() -> ssl.SSLContext:
    """A TLS client that trusts whatever certificate it is shown (it has not got the pinned one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_the_pinned_server_gets_through_and_moves_megabytes(daemon: TlsDaemon) -> None:
    channel = daemon.channel()
    client = ExecutorClient(await channel.connect(5))
    try:
        assert (await client.request("ping"))["pid"] == daemon.proc.pid
        # Many TLS records each way: a 100 kB request in, 3 MB of output out (writes that would block).
        word = secrets.token_hex(50_000)
        cmd = f"printf %s {word}; head -c 3000000 /dev/zero | tr '\\0' a"
        done = await client.request("exec", cmd=cmd, cwd="/", env={}, max_output=4 << 20, allow=5 << 20)
        assert done["exit_code"] == 0 and not done["truncated"]
        assert done["output"] == word + "a" * 3_000_000
        assert (await client.request("ping"))["pid"] == daemon.proc.pid
    finally:
        await client.close()


async def test_a_plain_tcp_client_gets_nothing(daemon: TlsDaemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    ours = auth.nonce()
    writer.write((json.dumps({"type": "auth", "nonce": ours, "proof": "0" * 64}) + "\n").encode())
    heard = await _rest(reader, writer)
    assert b"challenge" not in heard and b"hello" not in heard  # at most a TLS alert, then closed
    # Nor does the server's channel without TLS get anywhere.
    plain = TcpChannel(_at(("127.0.0.1", daemon.port)), lambda: daemon.secret)
    with pytest.raises(ProtocolError):
        await plain.connect(1.0)
    assert await _ping(await daemon.channel().connect(5)) == daemon.proc.pid  # it still serves


async def test_a_tls_client_without_the_secret_gets_only_a_challenge(daemon: TlsDaemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port, ssl=_insecure())
    challenge = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert challenge["type"] == "challenge"
    ours = auth.nonce()
    guess = auth.proof("a-guess", "server", challenge["nonce"], ours, "0" * 64)
    writer.write((json.dumps({"type": "auth", "nonce": ours, "proof": guess}) + "\n").encode())
    assert await _rest(reader, writer) == b""
    # The right secret with a proof not bound to the certificate (as over plain TCP) is refused too.
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port, ssl=_insecure())
    challenge = json.loads(await asyncio.wait_for(reader.readline(), 5))
    unbound = auth.proof(daemon.secret, "server", challenge["nonce"], ours)
    writer.write((json.dumps({"type": "auth", "nonce": ours, "proof": unbound}) + "\n").encode())
    assert await _rest(reader, writer) == b""


async def _rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """What the daemon says before it closes the connection (a reset: nothing)."""
    try:
        return await asyncio.wait_for(reader.read(), auth.TIMEOUT + 5)
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()


class Relay:
    """A man in the middle: TLS with its own certificate to the server, TLS to the real daemon,
    bytes copied both ways; `heard` counts what it relayed."""

    def __init__(self, daemon_port: int, cert: str, key: bytes, tmp: Path) -> None:
        (tmp / "mitm-cert.pem").write_text(cert)
        (tmp / "mitm-key.pem").write_bytes(key)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tmp / "mitm-cert.pem", tmp / "mitm-key.pem")
        self.daemon_port, self.heard, self.dialled = daemon_port, 0, 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dialled += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.daemon_port, ssl=_insecure())

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while data := await src.read(1 << 16):
                    self.heard += len(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_man_in_the_middle_is_refused(daemon: TlsDaemon, tmp_path: Path) -> None:
    cert, key = await self_signed()
    relay = Relay(daemon.port, cert, key, tmp_path)
    port = await relay.start()
    try:
        # Another certificate than the pinned one: refused at the handshake.
        pinned = daemon.channel(port=port)
        with pytest.raises(ProtocolError):
            await pinned.connect(1.0)
        assert "TLS" in pinned.refused and "certificate" in pinned.refused.lower(), pinned.refused
        # Even a server made to trust the relay's certificate gets no daemon through it: the
        # daemon's proofs are bound to its own certificate, not the relay's.
        fooled = daemon.channel(cert=cert, port=port)
        with pytest.raises(ProtocolError):
            await fooled.connect(1.0)
        assert relay.dialled and relay.heard, "nothing went through the relay: the test proves nothing"
    finally:
        await relay.close()
    assert await _ping(await daemon.channel().connect(5)) == daemon.proc.pid


async def test_a_plain_peer_where_tls_is_expected_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(secrets.token_urlsafe(32))
    port, proc = await _start(tmp_path, tls=False)
    cert, _ = await self_signed()
    try:
        plain = TcpChannel(_at(("127.0.0.1", port)), lambda: (tmp_path / "secret").read_text())
        client = ExecutorClient(await plain.connect(10))  # it listens
        await client.close()
        expecting = TcpChannel(
            _at(("127.0.0.1", port)), lambda: (tmp_path / "secret").read_text(), lambda: cert
        )
        with pytest.raises(ProtocolError):
            await expecting.connect(1.0)
        assert "TLS" in expecting.refused
    finally:
        await _stop(proc)


async def test_a_plain_listener_does_not_import_ssl(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(secrets.token_urlsafe(32))
    imports = tmp_path / "imports"
    port, proc = await _start(tmp_path, tls=False, stderr=imports)
    try:
        channel = TcpChannel(_at(("127.0.0.1", port)), lambda: (tmp_path / "secret").read_text())
        assert await _ping(await channel.connect(10)) == proc.pid
    finally:
        await _stop(proc)
    names = {line.rsplit("|", 1)[-1].strip() for line in imports.read_text().splitlines()}
    assert "executor_auth" in names, "-X importtime said nothing: the test proves nothing"
    assert "ssl" not in names and "_ssl" not in names


def test_tls_options_go_together() -> None:
    base = [sys.executable, "-S", "-c", _BOOT, str(DAEMON_DIR)]
    for args in (
        ["--listen", "7", "--secret-file", "s", "--tls-cert", "c"],
        ["--fd", "3", "--tls-cert", "c", "--tls-key", "k"],
    ):
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and "--tls" in done.stderr + done.stdout


def test_the_certificate_is_made_on_either_event_loop(tmp_path: Path) -> None:
    """`crogia serve --loop uvloop` made TLS sandboxes fail (502): uvloop's subprocess stdin is a
    socketpair, and `openssl -key /dev/stdin` cannot open a socket (ENXIO). Made on each loop, the
    pair is a CA certificate and the P-256 key that goes with it."""
    import uvloop

    for run in (asyncio.run, uvloop.run):
        cert, key = run(self_signed())
        (tmp_path / "cert.pem").write_text(cert)
        (tmp_path / "key.pem").write_bytes(key)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")  # the key matches
        text = subprocess.run(
            ["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "cert.pem")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "CA:TRUE" in text and "prime256v1" in text and "CN = crogia-sandbox" in text, text
