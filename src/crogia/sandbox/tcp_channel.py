"""`TcpChannel`: the server dials the daemon over TCP, and each proves itself to the other.

The transport for a sandbox that need not share the server's disk (SANDBOX_TRANSPORT=tcp): the
daemon listens (`--listen PORT`) on the sandbox's own network address, which the channel asks for
at each dial (a restarted container may have another). Before the hello both sides prove they
know the sandbox's secret (`daemon/executor_auth.py`: HMAC over a nonce from each side; the
secret never crosses the wire), so the server knows it talks to this sandbox's daemon and not
to whatever answers at that address (another sandbox given the address meanwhile), and the
daemon refuses anyone else on the network. A dropped connection is dialled again; the sandbox
goes on running. The stream is plain TCP, or with `cert` (SANDBOX_TCP_TLS) TLS 1.3 to a daemon
that must present exactly that certificate (pinned: no CA, no host name), with the proofs bound
to its fingerprint.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Awaitable, Callable

from crogia.errors import Unavailable
from crogia.sandbox.channel import HELLO_LIMIT, Channel, Stream, decode, dial, handshake, send
from crogia.sandbox.daemon import executor_auth as auth
from crogia.sandbox.daemon import executor_proto as proto

Address = tuple[str, int]
DIAL_FIRST, DIAL_MAX = 0.005, 0.25
"""Seconds between dials to a daemon that is not listening yet: doubling from the first to the most."""

KEEPALIVE = (
    (socket.TCP_KEEPIDLE, 10),
    (socket.TCP_KEEPINTVL, 3),
    (socket.TCP_KEEPCNT, 3),
    (socket.TCP_USER_TIMEOUT, 20_000),  # ms unacknowledged data may wait before the link counts as lost
)


class TcpChannel(Channel):
    """Dials `address()` until the daemon answers there and proves itself with `secret()`."""

    reconnects = True

    def __init__(
        self,
        address: Callable[[], Awaitable[Address]],
        secret: Callable[[], str],
        cert: Callable[[], str] | None = None,
    ) -> None:
        """`cert`: the PEM certificate the daemon must present (TLS); None or "": plain TCP."""
        self._address = address
        self._secret = secret
        self._cert = cert or (lambda: "")
        self._tls: tuple[str, ssl.SSLContext, str] | None = None  # (pem, its context, its fingerprint)
        self.refused = ""
        """Why the last peer was refused (it failed to prove itself), for messages and tests."""

    async def connect(self, within: float) -> Stream:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay, failure = DIAL_FIRST, ""
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise Unavailable(f"the sandbox's executor did not answer within {within:g} s ({failure})")
            tls = self._context()
            try:
                async with asyncio.timeout(left):
                    host, port = await self._address()
                    dialler = functools.partial(
                        loop.create_connection, host=host, port=port,
                        ssl=tls[1] if tls else None, server_hostname="" if tls else None,
                    )  # fmt: skip
                    stream = await dial(dialler, auth.LINE_MAX)
            except ssl.SSLError as exc:  # TLS, but not with the pinned certificate (or not TLS at all)
                self.refused = f"TLS: {getattr(exc, 'verify_message', '') or exc.reason or exc}"
                raise proto.ProtocolError(f"the peer at the sandbox's address: {self.refused}") from exc
            except (OSError, TimeoutError) as exc:  # not listening yet (it is starting), or unreachable
                failure = str(exc) or type(exc).__name__
            except Unavailable as exc:  # no address (yet): the container is not running
                failure = str(exc)
            else:
                writer, binding = stream[1], ""
                if tls is not None:
                    ssl_object = writer.get_extra_info("ssl_object")
                    peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
                    binding = auth.fingerprint(peer) if peer else ""
                    if binding != tls[2]:  # the CA check already says so; this says it exactly
                        writer.close()
                        self.refused = "TLS: the peer's certificate is not the sandbox's"
                        raise proto.ProtocolError(f"the peer at the sandbox's address: {self.refused}")
                return await self._prove(stream, deadline - loop.time(), binding)
            await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
            delay = min(delay * 2, DIAL_MAX)

    def _context(self) -> tuple[str, ssl.SSLContext, str] | None:
        """The client context pinning the sandbox's certificate (made again when it changes)."""
        pem = self._cert()
        if not pem:
            return None
        if self._tls is None or self._tls[0] != pem:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.check_hostname = False  # the certificate itself is pinned, whatever its name
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=pem)  # trust that one certificate and nothing else
            self._tls = (pem, context, auth.fingerprint(ssl.PEM_cert_to_DER_cert(pem)))
        return self._tls

    async def _prove(self, stream: Stream, within: float, binding: str = "") -> Stream:
        """Answer the daemon's challenge, then check its proof in the hello; the stream or an error."""
        lines, writer = stream
        sock = writer.get_extra_info("socket")
        if sock is not None:  # a link that silently went away is noticed within ~20 s
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in KEEPALIVE:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
        try:
            async with asyncio.timeout(max(within, 0.5)):
                line = await lines.line()
                challenge = decode(line) if line is not None else None
                if not isinstance(challenge, dict) or challenge.get("type") != "challenge":
                    raise proto.ProtocolError("the peer did not start with a challenge")
                theirs = challenge.get("nonce")
                if not auth.is_nonce(theirs):
                    raise proto.ProtocolError("the peer's challenge has no valid nonce")
                ours, secret = auth.nonce(), self._secret()
                send(
                    writer,
                    {
                        "type": "auth",
                        "nonce": ours,
                        "proof": auth.proof(secret, "server", theirs, ours, binding),
                    },
                )
                # The daemon's proof is its hello's `secret`.
                lines.limit = HELLO_LIMIT
                await handshake(stream, auth.proof(secret, "daemon", theirs, ours, binding), within)
        except (proto.ProtocolError, TimeoutError, ConnectionError) as exc:
            writer.close()
            self.refused = str(exc) or type(exc).__name__
            raise proto.ProtocolError(
                f"the peer at the sandbox's address did not prove itself: {self.refused}"
            ) from exc
        except BaseException:
            writer.close()
            raise
        return stream

    async def close(self) -> None:
        """Nothing to release: each connection is the client's to close."""
