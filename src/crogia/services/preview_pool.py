"""Kept-alive connections from the preview proxy to servers in sandboxes (`previews.PreviewService`)."""

from __future__ import annotations

import time

import h11

from crogia.sandbox.tunnel_socket import AnyTunnel


class UpstreamPool:
    """Kept-alive connections to servers in sandboxes, by (session, port): a few each, for a while."""

    def __init__(self, per_port: int, idle_seconds: float) -> None:
        self.per_port, self.idle_seconds = per_port, idle_seconds
        self._idle: dict[tuple[str, int], list[tuple[AnyTunnel, h11.Connection, float]]] = {}

    async def take(self, key: tuple[str, int]) -> tuple[AnyTunnel, h11.Connection] | None:
        idle = self._idle.get(key)
        while idle:
            tunnel, conn, since = idle.pop()
            if not tunnel.ended and time.monotonic() - since < self.idle_seconds:
                return tunnel, conn
            await tunnel.close()
        self._idle.pop(key, None)
        return None

    async def put(self, key: tuple[str, int], tunnel: AnyTunnel, conn: h11.Connection) -> bool:
        """Keep it (True), unless this port has enough kept already."""
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.per_port or tunnel.ended:
            return False
        idle.append((tunnel, conn, time.monotonic()))
        return True

    async def sweep(self, *, everything: bool = False) -> None:
        """Close what has idled too long (or all of it)."""
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            keep = [e for e in idle if not everything and not e[0].ended and now - e[2] < self.idle_seconds]
            for entry in idle:
                if entry not in keep:
                    await entry[0].close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
