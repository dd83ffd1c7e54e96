"""Signed preview links and the cookie they set: how a browser (which sends no bearer header) opens a preview.

A link carries `preview_token=<tenant>.<expiry>.<signature>`: an HMAC-SHA256, under the server's
preview key, of (purpose, tenant, session, port, expiry). Opening it sets a cookie holding a token
of the same form for purpose "cookie" (its own, longer expiry), scoped to that one preview (the
path `/api/sessions/{id}/ports/{port}/`, or the preview's own host), and redirects to the clean
URL. The cookie authorises that preview's routes and nothing else: `verify` checks session and
port, and no other route reads it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

LINK_PARAM = "preview_token"


def _sign(key: bytes, purpose: str, tenant: str, session_id: str, port: int, expires: int) -> str:
    message = "\0".join((purpose, tenant, session_id, str(port), str(expires))).encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_token(
    key: bytes, purpose: str, tenant: str, session_id: str, port: int, ttl: float
) -> tuple[str, int]:
    """A token and its expiry (epoch seconds)."""
    expires = int(time.time() + ttl)
    tenant_b64 = base64.urlsafe_b64encode(tenant.encode()).decode().rstrip("=")
    return f"{tenant_b64}.{expires}.{_sign(key, purpose, tenant, session_id, port, expires)}", expires


def verify(key: bytes, purpose: str, token: str, session_id: str, port: int) -> str | None:
    """The tenant a valid, unexpired token for this preview names; None otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(token) > 512:
        return None
    try:
        tenant = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    expires = int(parts[1])
    expected = _sign(key, purpose, tenant, session_id, port, expires)
    if not hmac.compare_digest(expected.encode(), parts[2].encode()) or expires < time.time():
        return None
    return tenant


def cookie_name(session_id: str, port: int) -> str:
    """One cookie per preview, so previews under one host never overwrite each other's."""
    return f"crogia_preview_{port}_{session_id.replace('-', '')[:32]}"
