"""The TCP channel's mutual proof: HMAC-SHA256 challenge-response over a nonce from each side.

Shared by both sides (standard library only, Python 3.9+; the daemon imports it only with
`--listen`). Before the daemon's hello, on a connection the server dialled:

    daemon -> {"type": "challenge", "nonce": Nd}
    server -> {"type": "auth", "nonce": Ns, "proof": proof(secret, "server", Nd, Ns)}
    daemon -> its hello, whose `secret` field is proof(secret, "daemon", Nd, Ns)

The daemon checks the server's proof before it says anything else, so a stranger learns nothing
but a fresh nonce and a closed connection; the server checks the daemon's proof in the hello.
Each proof covers both nonces (fresh on each side at each connection: nothing can be replayed)
and names its role (a proof cannot be reflected back at its sender). The secret never crosses
the wire. Without TLS the connection after the proofs is neither encrypted nor bound to them:
someone who can rewrite packets on the path (not another sandbox: the bridge has no
inter-container traffic) could take it over. With TLS (SANDBOX_TCP_TLS) the proofs run inside
it and also cover `binding`, the SHA-256 of the daemon's certificate (which the server pins):
a proof made on one TLS channel is worthless on a channel to another certificate.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeGuard

NONCE_BYTES = 32
LINE_MAX = 1024
"""The longest line the daemon reads before a peer has proven itself."""
TIMEOUT = 5.0
"""Seconds a peer has to prove itself."""
_CONTEXT = "crogia-tcp-1"


def nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def is_nonce(value: Any) -> TypeGuard[str]:
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def proof(secret: str, role: str, daemon_nonce: str, server_nonce: str, binding: str = "") -> str:
    """What `role` ("server" or "daemon") sends to show it knows `secret` (`binding`: the TLS
    certificate's fingerprint, "" on plain TCP)."""
    import hmac  # lazy: only a daemon that listens needs it

    bound = f"|tls|{binding}" if binding else ""
    message = f"{_CONTEXT}|{role}|{daemon_nonce}|{server_nonce}{bound}".encode()
    return hmac.new(secret.encode(), message, "sha256").hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two proofs."""
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def fingerprint(der: bytes) -> str:
    """The SHA-256 of a certificate (DER), hex: what the TLS proofs are bound to."""
    import hashlib

    return hashlib.sha256(der).hexdigest()
