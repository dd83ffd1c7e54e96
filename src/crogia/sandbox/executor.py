"""The server's side of the executor: `ExecutorSandbox`, the base of every backend's sandbox.

Every sandbox runs `daemon/executor.py` as its main process; the server reaches it through a
`Channel` it made itself (`crogia.sandbox.channel`) and speaks `daemon/executor_proto.py` with it
through an `ExecutorClient` that believes nothing unchecked. A command then costs a millisecond
or two instead of a `docker exec`.
"""

from __future__ import annotations

import abc
import asyncio
import compileall
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from crogia.errors import CrogiaError, NotFound, SandboxError, Unavailable
from crogia.sandbox import pty_channel
from crogia.sandbox.base import (
    WORKDIR,
    ExecResult,
    ExitListener,
    HostPaths,
    OutputListener,
    PortState,
    ProcessHandle,
    ProcessState,
    Sandbox,
    SandboxSpec,
    SandboxStatus,
)
from crogia.sandbox.channel import Channel
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.executor_client import ByteStream
from crogia.sandbox.executor_client import ExecutorClient as ExecutorClient
from crogia.sandbox.files import Files
from crogia.sandbox.pty_channel import PtyListener
from crogia.sandbox.tunnel_channel import open_tunnel
from crogia.sandbox.tunnel_socket import AnyTunnel, SocketTunnel

log = logging.getLogger(__name__)

Reply = asyncio.Future[dict[str, Any]]

DAEMON_DIR = Path(__file__).resolve().parent / "daemon"
"""Host folder holding the daemon's source; bind it read-only at `DAEMON_MOUNT`."""
DAEMON_MOUNT = "/opt/crogia"
# A reply may lag its command's own timeout by this much before the daemon counts as hung.
REPLY_MARGIN = 30.0
TAIL_MAX_BYTES = 4 * 1024 * 1024
"""What the daemon reads of a log for `tail` (executor_procs.TAIL_MAX_BYTES)."""
_MARKER_SLACK = 200


_BOOT = "import sys; sys.path[0] = sys.argv.pop(1); import executor; executor.main()"
_daemon_override: list[str] | None = None
"""Tests only: the command that replaces the daemon (a misbehaving one), before its channel options."""


def daemon_command(channel: list[str], python: str = "/usr/bin/python3") -> list[str]:
    """The command line that starts the executor inside a sandbox, with its channel options.

    The daemon is imported, not run as a script: a script's whole syntax tree stays alive until it
    returns (~2 MB held by every idle sandbox), an imported module's does not, and an import can use
    the bytecode `compile_daemon()` left beside the sources (starts ~4 ms sooner, ~0.4 MB less).
    `-S`: the daemon needs nothing from site-packages.
    """
    if _daemon_override is not None:
        return [*_daemon_override, *channel]
    return [python, "-S", "-c", _BOOT, DAEMON_MOUNT, *channel]


def compile_daemon() -> None:
    """Write the daemon's bytecode into its folder (blocking), for sandboxes whose Python matches ours.

    A sandbox sees the folder read-only, so it could never cache the bytecode itself. Where the
    folder is not writable (a read-only install) sandboxes compile at each start: slower, not wrong.
    """
    if not compileall.compile_dir(DAEMON_DIR, quiet=2):
        log.info("executor daemon bytecode not written to %s: sandboxes compile it at start", DAEMON_DIR)


def log_max(state_mb: int) -> int:
    """Bytes one process's log may hold on a state tmpfs of `state_mb` (an eighth of it, >= 1 MiB)."""
    return max(state_mb * 1024 * 1024 // 8, 1 << 20)


def recap(output: str, max_output: int) -> tuple[str, bool]:
    """`output` cut to its head and tail when it is over `max_output` bytes (a daemon may lie)."""
    data = output.encode("utf-8", "surrogatepass")
    if len(data) <= max_output + _MARKER_SLACK:
        return output, False
    head, tail = data[: max_output - max_output // 2], data[len(data) - max_output // 2 :]
    cut = len(data) - len(head) - len(tail)
    text = f"{head.decode(errors='replace')}\n\n[... {cut} bytes of output truncated ...]\n\n"
    return text + tail.decode(errors="replace"), True


class ExecutorSandbox(Sandbox):
    """A sandbox whose commands run through the executor daemon inside it.

    Subclass contract (a backend implements four hooks; the public methods wrap them):

    * `_start()`: bring the sandbox up with the daemon (`daemon_command(...)`, given the options of
      its `channel`) as its main process, `DAEMON_DIR` bound read-only at `/opt/crogia`, a
      size-limited tmpfs at `/run/crogia` (`Limits.state_mb`: process logs) and `paths.workspace`
      at `/workspace`; return once it is launched (`start()` then waits for the daemon's hello,
      for `connect_timeout` seconds). If it already runs, do nothing.
    * `_stop()`: stop it and everything in it, restartable by `_start()`. The client is
      already closed when this runs. `_destroy()`: stop and remove it (idempotent).
    * `_status()`: the backend's view (`running`, `exited`, `missing`, `unknown`).
    * `_reconnect()` (optional): come back after a lost connection; by default wait for the daemon
      on the channel for 2 s (a channel that cannot reconnect must restart the sandbox instead).

    A provider attaching to an already running sandbox calls `connect()` instead of `start()`.
    Exit notices sent while no connection is open are lost; `processes()` tells the truth.

    `start`, `stop` and `destroy` take turns (one lock): nothing a start makes can come up after
    a destroy has run. A destroy cancels a start still going, whose backend hooks leave what they
    made for `_destroy` to remove; that start raises SandboxError.
    """

    connect_timeout: ClassVar[float] = 15.0

    def __init__(self, spec: SandboxSpec, sandbox_id: str, paths: HostPaths, channel: Channel) -> None:
        super().__init__(spec, sandbox_id, paths)
        self.channel = channel
        self._client: ExecutorClient | None = None
        self._exit_listener: ExitListener | None = None
        self._connect_lock = asyncio.Lock()
        self._hands_over = True
        """False once the daemon said it cannot hand sockets over (its tunnels are frames since)."""
        self._life = asyncio.Lock()
        self._starting: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _stop(self) -> None: ...

    @abc.abstractmethod
    async def _destroy(self) -> None: ...

    @abc.abstractmethod
    async def _status(self) -> SandboxStatus: ...

    async def start(self) -> None:
        async with self._life:
            self._starting = starting = asyncio.ensure_future(self._bring_up())
            try:
                await starting
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if starting.cancelled() and (task is None or not task.cancelling()):
                    raise SandboxError(
                        "the sandbox was removed while it was starting", sandbox_id=self.id
                    ) from None
                raise
            finally:
                self._starting = None

    async def _bring_up(self) -> None:
        """`start`'s work: launch (`_start`), then wait for the daemon."""
        await self._start()
        await self.connect()

    async def stop(self) -> None:
        async with self._life:
            await self.close()
            await self._stop()

    async def destroy(self) -> None:
        starting = self._starting
        if starting is not None:
            starting.cancel()  # (a no-op once it is done)
        async with self._life:
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
        await self.channel.close()

    async def connect(self, within: float | None = None) -> None:
        """Connect to the running daemon (no-op when connected), waiting up to `within` seconds."""
        async with self._connect_lock:
            if self._client is not None and not self._client.closed:
                return
            if self._client is not None:
                await self._client.close()
                self._client = None
            within = within or self.connect_timeout
            try:
                stream = await self.channel.connect(within)
            except (OSError, TimeoutError, proto.ProtocolError) as exc:
                raise Unavailable(
                    f"the sandbox's executor did not answer within {within:g} s", reason=str(exc)
                ) from exc
            self._client = ExecutorClient(stream)
            self._client.set_exit_listener(self._exit_listener)

    async def _reconnect(self) -> None:
        await self.connect(within=2.0)

    def set_exit_listener(self, listener: ExitListener | None) -> None:
        self._exit_listener = listener
        if self._client is not None:
            self._client.set_exit_listener(listener)

    async def _call(self, op: str, *, on_chunk: OutputListener | None = None, **args: Any) -> dict[str, Any]:
        client = await self._ready_client()
        return await client.request(op, on_chunk=on_chunk, **args)

    async def _ready_client(self) -> ExecutorClient:
        if self._client is None:
            raise Unavailable("the sandbox is not running", sandbox_id=self.id)
        if self._client.closed:
            # The daemon may have restarted under us (container restart), or its connection was
            # reset after it broke the protocol: try once to come back.
            await self._reconnect()
        if self._client is None:
            raise Unavailable("the sandbox is not running", sandbox_id=self.id)
        return self._client

    async def request(
        self, op: str, *, on_chunk: OutputListener | None = None, allow: int = 0, **args: Any
    ) -> dict[str, Any]:
        """One request to the daemon (reconnecting once if its connection was lost): its checked values."""
        return await self._call(op, on_chunk=on_chunk, allow=allow, **args)

    async def open_stream(self, op: str, *, lasting: bool = False, **args: Any) -> tuple[ByteStream, Reply]:
        """A request that opens a byte stream (`ExecutorClient.open_stream`): the stream and its reply."""
        client = await self._ready_client()
        return await client.open_stream(op, lasting=lasting, **args)

    def files(self, *, max_read_bytes: int, timeout: float = 60.0) -> Files:
        """This sandbox's files, served by its daemon (no host path needed)."""
        from crogia.sandbox.daemon_files import DaemonFiles  # it imports crogia.workspace, which imports us

        return DaemonFiles(lambda: self, max_read_bytes=max_read_bytes, timeout=timeout)

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
        # JSON may spell a byte of output in up to six (a control character's \u00XX).
        allow = 6 * max_output + 65536
        stream = on_output is not None
        call = self._call("exec", on_chunk=on_output, tty=tty, stream=stream, allow=allow, **args)
        try:
            reply = await asyncio.wait_for(call, timeout + REPLY_MARGIN)
        except TimeoutError as exc:
            raise SandboxError("the sandbox's executor stopped answering", sandbox_id=self.id) from exc
        output, cut = recap(reply["output"], max_output)
        return ExecResult(
            exit_code=reply["exit_code"],
            output=output,
            timed_out=reply["timed_out"],
            truncated=reply["truncated"] or cut,
        )

    async def spawn(
        self, cmd: str, *, cwd: str = WORKDIR, env: Mapping[str, str] | None = None
    ) -> ProcessHandle:
        reply = await self._call("spawn", cmd=cmd, cwd=cwd, env=dict(env or {}))
        return ProcessHandle(pid=reply["pid"], log_path=reply["log"][: proto.TEXT_MAX])

    async def terminate(self, pid: int, *, grace: float) -> int | None:
        reply = await self._call("terminate", pid=pid, grace=grace)
        code: int | None = reply["exit_code"]
        return code

    async def tail_log(self, pid: int, *, lines: int) -> str:
        reply = await self._call("tail", pid=pid, lines=lines, allow=6 * TAIL_MAX_BYTES)
        output: str = reply["output"]
        return output

    async def processes(self) -> list[ProcessState]:
        reply = await self._call("list", allow=16 << 20)
        return [
            ProcessState(pid=p["pid"], running=p["running"], exit_code=p["exit_code"])
            for p in reply["processes"]
        ]

    async def ports(self, *, owners: bool = True) -> list[PortState]:
        reply = await self._call("ports", owners=owners, allow=1 << 20)
        return [
            PortState(port=p["port"], address=p["address"], pid=p["pid"], pgid=p["pgid"])
            for p in reply["ports"]
        ]

    async def open_tunnel(self, port: int, *, hand_over: bool = False) -> AnyTunnel:
        if self._client is not None and self._client.closed:
            await self._reconnect()  # its connection was reset (a daemon that broke the protocol)
        client = await self._client_for_pty()
        if hand_over and client.hands_over and self._hands_over:
            try:
                return await SocketTunnel.over(await client.hand_over(port))
            except CrogiaError as exc:
                if exc.context.get("code") != "bad_request":  # (refused: nobody listens; or a lie)
                    raise
                self._hands_over = False  # this daemon or channel cannot: frames from now on
        return await open_tunnel(client, port)

    # --- terminals (message shapes: `pty_channel`) ---

    async def pty_open(self, *, cols: int, rows: int, listener: PtyListener) -> int:
        client = await self._client_for_pty()
        client.ptys.opening += 1
        try:
            args = pty_channel.open_args(cols=cols, rows=rows)
            stream, reply = await client.open_stream("pty_open", lasting=True, **args)
            stream.listen(listener.on_output)  # its output comes right behind the reply
            try:
                tid = pty_channel.open_reply(await reply)
            except BaseException:
                stream.abort()  # the daemon closes a terminal whose stream is reset
                raise
        finally:
            client.ptys.opening -= 1
        client.ptys.register(tid, listener, stream)
        return tid

    async def pty_input(self, tid: int, data: bytes) -> None:
        stream = (await self._client_for_pty()).ptys.stream(tid)
        if stream is None:
            raise NotFound("no such terminal in the sandbox", sandbox_id=self.id)
        await stream.write(data)  # frames on its stream: waits only for credit, never for a reply

    async def pty_resize(self, tid: int, *, cols: int, rows: int) -> None:
        await self._call(**pty_channel.resize_request(tid, cols=cols, rows=rows))

    async def pty_close(self, tid: int, *, grace: float) -> int | None:
        client = await self._client_for_pty()
        stream = client.ptys.unregister(tid)
        try:
            request = client.request(**pty_channel.close_request(tid, grace=grace))
            return pty_channel.close_reply(await asyncio.wait_for(request, grace + REPLY_MARGIN))
        finally:
            if stream is not None:
                stream.abort()

    async def _client_for_pty(self) -> ExecutorClient:
        if self._client is None or self._client.closed:
            raise Unavailable("the sandbox is not running", sandbox_id=self.id)
        return self._client
