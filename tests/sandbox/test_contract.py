"""The sandbox contract: every backend must pass these (see `PROVIDER_FACTORIES` in conftest)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from crogia.errors import CrogiaError, NotFound
from crogia.sandbox.base import ExecResult, Limits, Sandbox
from tests.sandbox.conftest import MakeSandbox, host_view

REPO = Path(__file__).resolve().parents[2]


async def run(sandbox: Sandbox, cmd: str, **kw: Any) -> ExecResult:
    kw.setdefault("timeout", 20)
    kw.setdefault("max_output", 100_000)
    return await sandbox.exec(cmd, **kw)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


async def pid_gone(sandbox: Sandbox, pid: int) -> bool:
    # A zombie still answers `kill -0`, so read its state.
    state = f"$(cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null)"
    result = await run(sandbox, f's="{state}"; [ -z "$s" ] || [ "$s" = Z ]')
    return result.exit_code == 0


async def test_echo_and_exit_codes(sandbox: Sandbox) -> None:
    assert await run(sandbox, "echo hello; echo oops >&2") == ExecResult(0, "hello\noops\n")
    assert (await run(sandbox, "exit 7")).exit_code == 7
    assert (await run(sandbox, "kill -9 $$")).exit_code == 137


async def test_cwd_is_workspace_and_writes_reach_host(sandbox: Sandbox) -> None:
    result = await run(sandbox, "pwd && mkdir -p sub && echo data > sub/out.txt")
    assert result.output == "/workspace\n"
    assert (await host_view(sandbox) / "sub" / "out.txt").read_text() == "data\n"
    assert (await run(sandbox, "pwd", cwd="/workspace/sub")).output == "/workspace/sub\n"


async def test_bad_cwd_is_a_clear_error(sandbox: Sandbox) -> None:
    with pytest.raises(CrogiaError, match="does not exist"):
        await run(sandbox, "true", cwd="/no/such/dir")


async def test_env_from_request_and_spec(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(env={"SPEC_VAR": "from-spec"})
    result = await run(sandbox, 'echo "$FOO|$SPEC_VAR|$LANG"', env={"FOO": "bar baz"})
    assert result.output == "bar baz|from-spec|C.UTF-8\n"


async def test_timeout_kills_the_whole_process_group(sandbox: Sandbox) -> None:
    started = time.monotonic()
    result = await run(sandbox, "sleep 60 & echo $! > child.pid; sleep 60", timeout=0.5)
    assert (result.exit_code, result.timed_out) == (124, True)
    assert time.monotonic() - started < 5
    child = int((await host_view(sandbox) / "child.pid").read_text())
    assert await eventually(lambda: pid_gone(sandbox, child))


async def test_output_cap_keeps_head_and_tail(sandbox: Sandbox) -> None:
    result = await run(sandbox, "seq 1 100000", max_output=1000)
    assert result.truncated
    assert result.exit_code == 0
    assert result.output.startswith("1\n2\n3\n")
    assert result.output.endswith("99999\n100000\n")
    assert "bytes of output truncated" in result.output
    assert len(result.output) < 1200


async def test_invalid_utf8_is_replaced(sandbox: Sandbox) -> None:
    result = await run(sandbox, r"printf 'a\377b\n'")
    assert result.output == "a\ufffdb\n"


async def test_tty(sandbox: Sandbox) -> None:
    assert "is-tty" in (await run(sandbox, "test -t 1 && echo is-tty", tty=True)).output
    assert (await run(sandbox, "tty", tty=True)).exit_code == 0
    assert (await run(sandbox, "test -t 1 || echo no-tty")).output == "no-tty\n"


async def test_streaming_chunks_arrive_before_the_end(sandbox: Sandbox) -> None:
    chunks: list[tuple[float, str]] = []
    cmd = "for i in 1 2 3; do echo line$i; sleep 0.3; done"
    result = await run(sandbox, cmd, on_output=lambda text: chunks.append((time.monotonic(), text)))
    finished = time.monotonic()
    assert "".join(text for _, text in chunks) == result.output == "line1\nline2\nline3\n"
    assert len(chunks) >= 2
    assert finished - chunks[0][0] > 0.4


async def test_cancelling_exec_kills_the_command(sandbox: Sandbox) -> None:
    task = asyncio.create_task(run(sandbox, "echo $$ > me.pid; exec sleep 60", timeout=120))
    pid_file = await host_view(sandbox) / "me.pid"

    async def pid_written() -> bool:
        return pid_file.exists() and pid_file.read_text().strip() != ""

    assert await eventually(pid_written)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await eventually(lambda: pid_gone(sandbox, int(pid_file.read_text())))


async def test_spawn_exit_listener_and_tail(sandbox: Sandbox) -> None:
    exits: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    sandbox.set_exit_listener(lambda pid, code: exits.put_nowait((pid, code)))
    handle = await sandbox.spawn("for i in $(seq 1 20); do echo line$i; done; echo err >&2; exit 3")
    assert handle.log_path.startswith("/run/crogia/logs/")
    assert await asyncio.wait_for(exits.get(), 3) == (handle.pid, 3)
    assert await sandbox.tail_log(handle.pid, lines=3) == "line19\nline20\nerr\n"
    # The log lives in the sandbox (its state tmpfs), never on the host.
    assert (await run(sandbox, f"head -n 1 {handle.log_path}")).output == "line1\n"
    assert not list(sandbox.paths.state_dir.rglob("*.log"))
    with pytest.raises(NotFound):
        await sandbox.tail_log(999_999, lines=3)


async def test_terminate_falls_back_to_kill_after_grace(sandbox: Sandbox) -> None:
    stubborn = await sandbox.spawn("trap '' TERM; echo ready; sleep 60")

    async def ready() -> bool:
        return "ready" in await sandbox.tail_log(stubborn.pid, lines=1)

    assert await eventually(ready)
    started = time.monotonic()
    assert await sandbox.terminate(stubborn.pid, grace=0.5) == 137
    assert 0.4 < time.monotonic() - started < 3
    polite = await sandbox.spawn("exec sleep 60")
    assert await sandbox.terminate(polite.pid, grace=5) == 143
    with pytest.raises(NotFound):
        await sandbox.terminate(999_999, grace=1)


async def test_processes_lists_running_and_ended(sandbox: Sandbox) -> None:
    done = await sandbox.spawn("exit 2")
    running = await sandbox.spawn("sleep 60")

    async def done_exited() -> bool:
        return any(p.pid == done.pid and not p.running for p in await sandbox.processes())

    assert await eventually(done_exited)
    states = {p.pid: (p.running, p.exit_code) for p in await sandbox.processes()}
    assert states[done.pid] == (False, 2)
    assert states[running.pid] == (True, None)
    await sandbox.terminate(running.pid, grace=1)


async def test_stop_start_round_trip(sandbox: Sandbox) -> None:
    await run(sandbox, "echo kept > kept.txt")
    await sandbox.spawn("while true; do date +%s%N > /workspace/beat; sleep 0.05; done")
    beat = await host_view(sandbox) / "beat"
    assert await eventually(lambda: asyncio.sleep(0, beat.exists()))
    await sandbox.stop()
    assert await sandbox.status() == "exited"
    last = beat.read_text()
    await asyncio.sleep(0.4)
    assert beat.read_text() == last, "a background process outlived stop()"
    with pytest.raises(CrogiaError):
        await run(sandbox, "true")
    await sandbox.start()
    assert await sandbox.status() == "running"
    assert (await run(sandbox, "cat kept.txt")).output == "kept\n"


async def test_destroy(sandbox: Sandbox) -> None:
    await run(sandbox, "echo x > file")
    await sandbox.destroy()
    assert await sandbox.status() == "missing"
    assert (await host_view(sandbox) / "file").exists()
    with pytest.raises(CrogiaError):
        await run(sandbox, "true")


async def test_fifty_concurrent_execs(sandbox: Sandbox) -> None:
    results = await asyncio.gather(*(run(sandbox, f"sleep 0.1; echo {i}") for i in range(50)))
    assert [r.output for r in results] == [f"{i}\n" for i in range(50)]


async def test_isolation(make_sandbox: MakeSandbox, data_dir: Path) -> None:
    first, second = await make_sandbox(), await make_sandbox()
    (await host_view(second) / "secret.txt").write_text("s3cret")
    marker = f"crogia-marker-{uuid.uuid4().hex[:8]}"
    planted = [Path("/root", marker), Path("/home", marker)]
    try:
        for path in planted:
            path.touch()
        hidden = [
            *map(str, planted),
            str(REPO / "pyproject.toml"),
            str(await host_view(second)),
            str(data_dir),
        ]
        for path in hidden:
            assert (await run(first, f"test -e {path}")).exit_code == 1, f"{path} is visible"
        skip = " ".join(f"--exclude-dir={d}" for d in ("proc", "sys", "dev", "usr"))
        assert (await run(first, f"grep -rls s3cret / {skip}")).output == ""
        await run(first, "echo mine > /tmp/private")
        assert (await run(second, "test -e /tmp/private")).exit_code == 1
        assert not await asyncio.to_thread(Path("/tmp/private").exists)
    finally:
        for path in planted:
            path.unlink(missing_ok=True)


async def test_daemon_survives_malformed_requests(sandbox: Sandbox) -> None:
    # The server's own channel is the only way in; its client ignores replies to ids it never sent.
    client = sandbox._client  # type: ignore[attr-defined]
    bad = [b"not json\n", b"[1, 2]\n", b'{"op": "ping"}\n', b'{"id": 1, "op": "nope"}\n',
           b'{"id": 2, "op": "exec", "cmd": 5}\n', b'{"id": 3, "op": "exec", "cmd": "true", "env": [1]}\n',
           b'{"id": 4, "op": "terminate", "pid": "x"}\n']  # fmt: skip
    for line in bad:
        client._writer.write(line.replace(b'"id": ', b'"id": 100000'))
    await client._writer.drain()
    assert (await run(sandbox, "echo alive")).output == "alive\n"
    assert not client.closed


async def test_memory_limit(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(limits=Limits(memory_mb=128))
    result = await run(sandbox, "python3 -c \"b = b'x' * (512 << 20); print('allocated')\"")
    assert result.exit_code != 0
    assert "allocated" not in result.output


async def test_pids_limit(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(limits=Limits(memory_mb=512, pids=64))
    if "pids" not in getattr(sandbox, "enforced_limits", {"pids"}):
        pytest.skip("this host cannot enforce a pids limit")
    result = await run(sandbox, "for i in $(seq 1 100); do sleep 1 & done 2>&1; wait", timeout=30)
    assert "Resource temporarily unavailable" in result.output
