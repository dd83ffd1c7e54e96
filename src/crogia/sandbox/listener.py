"""`ListenerChannel`: the server listens in a server-only folder, the daemon dials in (Docker).

The folder (`SandboxSpec.state_dir`) is the server's: the container sees it read-only, so the
sandbox can neither plant a file there nor move the socket; the server only ever binds its own
socket and replaces its own secret file in it (by name, from the folder's fd, never following
anything). The folder is bound rather than the socket, so a restarted server binds a new socket
that the running container sees at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
from pathlib import Path

from crogia.errors import Unavailable
from crogia.sandbox.channel import (
    HELLO_TIMEOUT,
    MAX_HANDSHAKES,
    SECRET_NAME,
    SOCKET_BUFFER,
    SOCKET_NAME,
    Channel,
    HandingListener,
    Stream,
    WireProtocol,
    WireReader,
    handshake,
    send,
)
from crogia.sandbox.daemon import executor_proto as proto

log = logging.getLogger(__name__)

_MAX_SUN_PATH = 100  # sockaddr_un.sun_path holds 108 bytes; longer paths go through /proc/self/fd


class ListenerChannel(Channel):
    """A unix socket the server listens on; the daemon that dials in must know the secret."""

    reconnects = True

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.peer_cgroup: str | None = None
        """When set (the container's id), a peer whose cgroup does not name it is refused."""
        self.secret_owner: tuple[int, int] | None = None
        """uid, gid the secret file is given to (a userns-remapped container root); None: root's."""
        self._server: asyncio.Server | None = None
        self._secret = ""
        self._ready: Stream | None = None
        self._arrived = asyncio.Event()
        self._handshakes = 0
        self._refused = ""

    async def listen(self) -> None:
        """Start listening (no-op when listening) with a fresh secret."""
        if self._server is not None:
            return
        self._secret = secrets.token_urlsafe(32)
        sock = await asyncio.to_thread(_bind, self.folder, self._secret, self.secret_owner)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: WireProtocol(WireReader(), self._accepted), sock=sock
        )

    async def connect(self, within: float) -> Stream:
        await self.listen()
        try:
            await asyncio.wait_for(self._arrived.wait(), within)
        except TimeoutError:
            why = f" (last refused: {self._refused})" if self._refused else ""
            raise Unavailable(f"the sandbox's executor did not answer within {within:g} s{why}") from None
        stream, self._ready = self._ready, None
        self._arrived.clear()
        assert stream is not None
        return stream

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._ready is not None:
            self._ready[1].close()
            self._ready = None
            self._arrived.clear()

    async def _accepted(self, wire: WireReader, writer: asyncio.StreamWriter) -> None:
        if self._handshakes >= MAX_HANDSHAKES or self._server is None:
            writer.close()
            return
        self._handshakes += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        stream = (wire, writer)
        try:
            stranger = await self._stranger(writer)
            if stranger:
                send(writer, {"type": "reject", "error": stranger})
                raise proto.ProtocolError(stranger)
            await handshake(stream, self._secret, HELLO_TIMEOUT)
        except (proto.ProtocolError, TimeoutError, ConnectionError) as exc:
            self._refused = str(exc) or type(exc).__name__
            log.warning("refused a connection to the executor channel in %s: %s", self.folder, self._refused)
            writer.close()
            return
        finally:
            self._handshakes -= 1
        if self._ready is not None:  # only the newest daemon counts
            self._ready[1].close()
        self._ready = stream
        self._arrived.set()

    async def _stranger(self, writer: asyncio.StreamWriter) -> str:
        """Why the peer (SO_PEERCRED) is not in the container's cgroup, where we can see it; else ""."""
        sock = writer.get_extra_info("socket")
        if self.peer_cgroup is None or sock is None:
            return ""
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if pid <= 0:  # in a pid namespace we cannot see into: the secret alone decides
            return ""
        cgroup = await asyncio.to_thread(_cgroup_of, pid)
        if cgroup is not None and self.peer_cgroup not in cgroup:
            return f"a process outside the sandbox (pid {pid}) dialled its channel"
        return ""


def _cgroup_of(pid: int) -> str | None:
    """`pid`'s /proc cgroup file (blocking); None once it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read(4096)
    except OSError:
        return None


def _bind(folder: Path, secret: str, owner: tuple[int, int] | None = None) -> socket.socket:
    """Write the secret (0400) and bind a new socket in `folder` (blocking; folder made by make_dirs)."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        tmp = f".{SECRET_NAME}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            if owner is not None:  # its owner could rewrite it, but never replace it: the folder is ours
                os.fchown(f.fileno(), *owner)
            f.write(secret)
        os.replace(tmp, SECRET_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_NAME, dir_fd=dir_fd)
        sock = HandingListener(socket.AF_UNIX, socket.SOCK_STREAM)
        path = str(folder / SOCKET_NAME)
        sock.bind(path if len(os.fsencode(path)) < _MAX_SUN_PATH else f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}")
        # Connecting needs write access to the socket: a remapped (userns) container root may need it.
        os.chmod(SOCKET_NAME, 0o666, dir_fd=dir_fd)
        sock.listen(16)
        sock.setblocking(False)
        return sock
    finally:
        os.close(dir_fd)
