"""The server's side of the executor protocol: `ExecutorClient` and the shared `ExecutorSandbox`.

Every sandbox runs `daemon/executor.py` (see its docstring for the wire protocol). The server
talks to it over the unix socket `<state_dir>/executor.sock`, which appears inside the sandbox
as `/run/crogia/executor.sock`; a command then costs a millisecond or two instead of a
`docker exec`.
"""

from __future__ import annotations

import abc
import asyncio
import compileall
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from crogia.errors import CrogiaError, InvalidInput, NotFound, SandboxError, Unavailable
from crogia.sandbox import pty_channel
from crogia.sandbox.base import (
    STATE_MOUNT,
    WORKDIR,
    ExecResult,
    ExitListener,
    OutputListener,
    ProcessHandle,
    ProcessState,
    Sandbox,
    SandboxSpec,
    SandboxStatus,
)
from crogia.sandbox.pty_channel import PTY_PUSHES, PtyListener, PtyRouter

log = logging.getLogger(__name__)

DAEMON_DIR = Path(__file__).resolve().parent / "daemon"
"""Host folder holding the daemon's source; bind it read-only at `DAEMON_MOUNT`."""
DAEMON_MOUNT = "/opt/crogia"
SOCKET_NAME = "executor.sock"
READ_LIMIT = 64 * 1024 * 1024
# A reply may lag its command's own timeout by this much before the daemon counts as hung.
REPLY_MARGIN = 30.0
CONNECT_POLL_FAST = 0.002
"""Pause between attempts to reach a starting daemon in its first `CONNECT_FAST_FOR` seconds."""
CONNECT_FAST_FOR = 0.25
CONNECT_POLL_MAX = 0.05
"""Longest pause between attempts after that (a daemon this slow is restarting or gone)."""
_MAX_SUN_PATH = 100  # sockaddr_un.sun_path holds 108 bytes; longer paths go through /proc/self/fd


_BOOT = "import sys; sys.path[0] = sys.argv.pop(1); import executor; executor.main()"


def daemon_command(python: str = "/usr/bin/python3") -> list[str]:
    """The command line that starts the executor inside a sandbox.

    The daemon is imported, not run as a script: a script's whole syntax tree stays alive until it
    returns (~2 MB held by every idle sandbox), an imported module's does not, and an import can use
    the bytecode `compile_daemon()` left beside the sources (starts ~4 ms sooner, ~0.4 MB less).
    `-S`: the daemon needs nothing from site-packages.
    """
    return [python, "-S", "-c", _BOOT, DAEMON_MOUNT, "--socket", f"{STATE_MOUNT}/{SOCKET_NAME}"]


def compile_daemon() -> None:
    """Write the daemon's bytecode into its folder (blocking), for sandboxes whose Python matches ours.

    A sandbox sees the folder read-only, so it could never cache the bytecode itself. Where the
    folder is not writable (a read-only install) sandboxes compile at each start: slower, not wrong.
    """
    if not compileall.compile_dir(DAEMON_DIR, quiet=2):
        log.info("executor daemon bytecode not written to %s: sandboxes compile it at start", DAEMON_DIR)


_ERRORS: dict[str, type[CrogiaError]] = {"not_found": NotFound, "bad_request": InvalidInput}


def _error_from(reply: Mapping[str, Any]) -> CrogiaError:
    kind = _ERRORS.get(str(reply.get("code")), SandboxError)
    return kind(str(reply.get("error") or "the sandbox's executor failed"), code=reply.get("code"))


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if len(os.fsencode(path)) < _MAX_SUN_PATH:
        return await asyncio.open_unix_connection(path, limit=READ_LIMIT)
    dir_fd = os.open(path.parent, os.O_PATH)
    try:
        return await asyncio.open_unix_connection(f"/proc/self/fd/{dir_fd}/{path.name}", limit=READ_LIMIT)
    finally:
        os.close(dir_fd)


class ExecutorClient:
    """One connection to an executor daemon, multiplexing requests by id.

    A single owned reader task routes replies to their waiting futures, streamed chunks to
    their `on_chunk` callbacks and exit notices to the exit listener.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._chunks: dict[int, Callable[[str], None]] = {}
        self._exit_listener: ExitListener | None = None
        self._closed = False
        self.ptys = PtyRouter()
        """The terminals opened over this connection (they end with it)."""
        self._reader_task = asyncio.create_task(self._read_loop(), name="executor-reader")

    @classmethod
    async def connect(cls, socket_path: Path, *, within: float) -> ExecutorClient:
        """Connect and ping, retrying until the daemon answers or `within` seconds pass."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + within
        delay = CONNECT_POLL_FAST
        while True:
            client: ExecutorClient | None = None
            try:
                client = cls(*await _open(socket_path))
                await asyncio.wait_for(client.request("ping"), max(deadline - loop.time(), 0.05))
                return client
            except (OSError, Unavailable, TimeoutError) as exc:
                if client is not None:
                    await client.close()
                if loop.time() + delay >= deadline:
                    raise Unavailable(
                        f"the sandbox's executor did not answer within {within:g} s", reason=str(exc)
                    ) from exc
            await asyncio.sleep(delay)
            # A failed attempt costs microseconds (no socket yet), while each ms of waiting adds to
            # every sandbox start (the daemon answers 13-20 ms after it starts): poll often, at first.
            if loop.time() - started > CONNECT_FAST_FOR:
                delay = min(delay * 2, CONNECT_POLL_MAX)

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost."""
        return self._closed

    def set_exit_listener(self, listener: ExitListener | None) -> None:
        self._exit_listener = listener

    async def request(
        self, op: str, *, on_chunk: Callable[[str], None] | None = None, **args: Any
    ) -> dict[str, Any]:
        """Send one request and wait for its reply; raises `CrogiaError` subclasses on failure.

        If the caller is cancelled while an `exec` is in flight, the daemon is told to kill it.
        """
        if self._closed:
            raise Unavailable("the connection to the sandbox's executor is closed")
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        if on_chunk is not None:
            self._chunks[rid] = on_chunk
        try:
            self._send({"id": rid, "op": op, **args})
            await self._writer.drain()
            return await future
        except asyncio.CancelledError:
            # Cancelling our task cancels `future` too, so only a real reply means it finished.
            answered = future.done() and not future.cancelled()
            if op == "exec" and not answered and not self._closed:
                self._send({"id": next(self._ids), "op": "cancel", "target": rid})
            raise
        except ConnectionError as exc:
            raise Unavailable("lost the connection to the sandbox's executor") from exc
        finally:
            self._pending.pop(rid, None)
            self._chunks.pop(rid, None)

    def _send(self, msg: dict[str, Any]) -> None:
        self._writer.write((json.dumps(msg, ensure_ascii=False) + "\n").encode())

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                self._dispatch(json.loads(line))
        except (ConnectionError, ValueError) as exc:
            log.warning("executor connection broke: %s", exc)
        finally:
            self._closed = True
            self._fail_pending(Unavailable("lost the connection to the sandbox's executor"))
            self.ptys.end_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "result":
            future = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                if msg.get("ok"):
                    future.set_result(msg)
                else:
                    future.set_exception(_error_from(msg))
        elif kind == "chunk":
            self._call(self._chunks.get(msg.get("id")), msg.get("data", ""))  # type: ignore[arg-type]
        elif kind in PTY_PUSHES:
            self.ptys.dispatch(msg)  # a malformed push raises ProtocolError: the connection breaks
        elif kind == "exit" and self._exit_listener is not None:
            self._call(self._exit_listener, int(msg["pid"]), int(msg["exit_code"]))

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # a faulty listener must not break the connection for everyone
            log.exception("executor listener %r failed", callback)

    def _fail_pending(self, error: CrogiaError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Close the connection; pending requests fail with `Unavailable`."""
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        self._fail_pending(Unavailable("the connection to the sandbox's executor was closed"))


class ExecutorSandbox(Sandbox):
    """A sandbox whose commands run through the executor daemon inside it.

    Subclass contract (a backend implements four hooks; the public methods wrap them):

    * `_start()`: bring the sandbox up with the daemon (`daemon_command()`) as its main process,
      `DAEMON_DIR` bound read-only at `/opt/crogia`, `spec.state_dir` bound read-write at
      `/run/crogia` and `spec.workspace` at `/workspace`; return once it is launched (no need to
      wait for the socket: `start()` then connects, retrying for `connect_timeout` seconds).
      If it already runs, do nothing.
    * `_stop()`: stop it and everything in it, restartable by `_start()`. The client is
      already closed when this runs. `_destroy()`: stop and remove it (idempotent).
    * `_status()`: the backend's view (`running`, `exited`, `missing`, `unknown`).

    A provider attaching to an already running sandbox calls `connect()` instead of `start()`.
    Exit notices sent while no connection is open are lost; `processes()` tells the truth.
    """

    connect_timeout: ClassVar[float] = 15.0

    def __init__(self, spec: SandboxSpec, sandbox_id: str) -> None:
        super().__init__(spec, sandbox_id)
        self._client: ExecutorClient | None = None
        self._exit_listener: ExitListener | None = None
        self._connect_lock = asyncio.Lock()

    @property
    def socket_path(self) -> Path:
        """The executor's socket as seen from the server's host."""
        return self.spec.state_dir / SOCKET_NAME

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _stop(self) -> None: ...

    @abc.abstractmethod
    async def _destroy(self) -> None: ...

    @abc.abstractmethod
    async def _status(self) -> SandboxStatus: ...

    async def start(self) -> None:
        await self._start()
        await self.connect()

    async def stop(self) -> None:
        await self.close()
        await self._stop()

    async def destroy(self) -> None:
        await self.close()
        await self._destroy()

    async def status(self) -> SandboxStatus:
        if self._client is not None and not self._client.closed:
            # Its executor holds an open connection: the sandbox runs. This spares the engine a
            # question (a Docker inspect is 5-15 ms of a CPU-bound dockerd) on every session read.
            return "running"
        return await self._status()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def connect(self, within: float | None = None) -> None:
        """Connect to the running daemon (no-op when connected), waiting up to `within` seconds."""
        async with self._connect_lock:
            if self._client is not None and not self._client.closed:
                return
            if self._client is not None:
                await self._client.close()
            self._client = await ExecutorClient.connect(
                self.socket_path, within=within or self.connect_timeout
            )
            self._client.set_exit_listener(self._exit_listener)

    def set_exit_listener(self, listener: ExitListener | None) -> None:
        self._exit_listener = listener
        if self._client is not None:
            self._client.set_exit_listener(listener)

    async def _call(self, op: str, *, on_chunk: OutputListener | None = None, **args: Any) -> dict[str, Any]:
        if self._client is None:
            raise Unavailable("the sandbox is not running", sandbox_id=self.id)
        if self._client.closed:
            # The daemon may have restarted under us (container restart): try once to come back.
            await self.connect(within=2.0)
        assert self._client is not None
        return await self._client.request(op, on_chunk=on_chunk, **args)

    async def exec(
        self,
        cmd: str,
        *,
        cwd: str = WORKDIR,
        env: Mapping[str, str] | None = None,
        timeout: float,
        max_output: int,
        tty: bool = False,
        on_output: OutputListener | None = None,
    ) -> ExecResult:
        args = {"cmd": cmd, "cwd": cwd, "env": dict(env or {}), "timeout": timeout, "max_output": max_output}
        call = self._call("exec", on_chunk=on_output, tty=tty, stream=on_output is not None, **args)
        try:
            reply = await asyncio.wait_for(call, timeout + REPLY_MARGIN)
        except TimeoutError as exc:
            raise SandboxError("the sandbox's executor stopped answering", sandbox_id=self.id) from exc
        return ExecResult(
            exit_code=int(reply["exit_code"]),
            output=str(reply["output"]),
            timed_out=bool(reply["timed_out"]),
            truncated=bool(reply["truncated"]),
        )

    async def spawn(
        self, cmd: str, *, cwd: str = WORKDIR, env: Mapping[str, str] | None = None
    ) -> ProcessHandle:
        reply = await self._call("spawn", cmd=cmd, cwd=cwd, env=dict(env or {}))
        return ProcessHandle(pid=int(reply["pid"]), log_path=str(reply["log"]))

    async def terminate(self, pid: int, *, grace: float) -> int | None:
        reply = await self._call("terminate", pid=pid, grace=grace)
        code = reply.get("exit_code")
        return None if code is None else int(code)

    async def tail_log(self, pid: int, *, lines: int) -> str:
        reply = await self._call("tail", pid=pid, lines=lines)
        return str(reply["output"])

    async def processes(self) -> list[ProcessState]:
        reply = await self._call("list")
        return [
            ProcessState(pid=int(p["pid"]), running=bool(p["running"]), exit_code=p.get("exit_code"))
            for p in reply["processes"]
        ]

    # --- terminals (message shapes: `pty_channel`) ---

    async def pty_open(self, *, cols: int, rows: int, listener: PtyListener) -> int:
        client = await self._client_for_pty()
        client.ptys.opening += 1
        try:
            reply = await client.request(**pty_channel.open_request(cols=cols, rows=rows))
        finally:
            client.ptys.opening -= 1
        tid = pty_channel.open_reply(reply)
        client.ptys.register(tid, listener)
        return tid

    async def pty_input(self, tid: int, data: bytes) -> None:
        await self._call(**pty_channel.input_request(tid, data))

    async def pty_resize(self, tid: int, *, cols: int, rows: int) -> None:
        await self._call(**pty_channel.resize_request(tid, cols=cols, rows=rows))

    async def pty_close(self, tid: int, *, grace: float) -> int | None:
        client = await self._client_for_pty()
        client.ptys.unregister(tid)
        request = client.request(**pty_channel.close_request(tid, grace=grace))
        return pty_channel.close_reply(await asyncio.wait_for(request, grace + REPLY_MARGIN))

    async def _client_for_pty(self) -> ExecutorClient:
        if self._client is None or self._client.closed:
            raise Unavailable("the sandbox is not running", sandbox_id=self.id)
        return self._client
