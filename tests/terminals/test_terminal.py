"""Interactive terminals through a real server and a real WebSocket client, on every backend."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tests.conftest import make_settings
from tests.support.server import RunningServer, run_server
from tests.terminals.helpers import TermClient, new_shell, refused, run_in_sandbox

CURSES = (
    "python3 -c \"import curses; curses.wrapper(lambda s: (s.addstr(0, 0, 'CURSES %d %d' % s.getmaxyx()),"
    ' s.refresh()))"'
)
WINCH = (  # the handler writes with os.write (a print could be interrupted by the signal) and exits
    'python3 -c "import os, signal, time; signal.signal(signal.SIGWINCH, lambda *a: os._exit(os.write(1,'
    " b'WINCH %d %d' % tuple(os.get_terminal_size())) * 0)); print('READY', flush=True); time.sleep(60)\""
)


async def test_typing_runs_commands_on_a_real_pty(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell = await new_shell(server, sid, cols=100, rows=30)
    term = await TermClient.open(server, shell["shell_id"])
    out = await term.run("tty; pwd; echo $TERM; stty size; shopt -q login_shell && echo LOGIN", "t1")
    assert re.search(r"/dev/pts/\d+\r\n/workspace\r\nxterm-256color\r\n30 100\r\nLOGIN\r\n", out), out
    health = (await server.client.get("/api/health")).json()
    assert health["active_shells"] == 1
    await term.close()


async def test_resize_reaches_the_program(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    term = await TermClient.open(server, (await new_shell(server, sid))["shell_id"])
    await term.type(WINCH + "\r")
    await term.expect(r"READY\r\n")
    await term.resize(33, 111)
    await term.expect(r"WINCH 111 33")
    assert "33 111" in await term.run("stty size", "t2")
    for bad in ((0, 50), (1001, 50), ("40", 50), (True, 50), (None, None)):  # ignored, the socket stays
        await term.resize(*bad)
    assert "33 111" in await term.run("stty size", "t3")
    await term.close()


async def test_full_screen_programs_work(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    term = await TermClient.open(server, (await new_shell(server, sid, cols=90, rows=28))["shell_id"])
    out = await term.run(CURSES, "t4")
    assert "\x1b[?1049h" in out and "CURSES 28 90" in out  # the alternate screen, at the pty's size
    out = await term.run("top -b -n1 | head -3", "t5")
    assert re.search(r"top - \d", out) and "Tasks:" in out, out
    await term.close()


async def test_reconnect_replays_scrollback_then_streams(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell_id = (await new_shell(server, sid))["shell_id"]
    first = await TermClient.open(server, shell_id)
    await first.run("seq 1 3000", "t6")
    seen = first.text
    await first.close()
    again = await TermClient.open(server, shell_id)
    await again.expect(r"t6-42")
    await again.run("echo live-again", "t7")
    assert again.text.startswith(seen)  # the whole past, once, then what came after
    lines = [line.rsplit("\r", 1)[-1] for line in again.text.split("\r\n")]  # after a mode switch's \r
    assert [line for line in lines if line.isdigit()] == [str(n) for n in range(1, 3001)]
    assert again.text.count("live-again\r\n") == 1 and again.text.count("t6-42\r\n") == 1
    await again.close()


async def test_a_second_socket_replaces_the_first(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell_id = (await new_shell(server, sid))["shell_id"]
    first = await TermClient.open(server, shell_id)
    second = await TermClient.open(server, shell_id)
    assert await first.closed() == (1000, "Replaced by new connection")
    await second.run("echo still", "t8")
    await second.close()


async def test_delete_leaves_no_process_behind(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell_id = (await new_shell(server, sid))["shell_id"]
    term = await TermClient.open(server, shell_id)
    jobs = (
        "sleep 1000 & setsid sleep 1001; nohup sleep 1002 >/dev/null 2>&1 & (trap '' HUP; sleep 1003) & true"
    )
    await term.run(jobs, "t9")
    count = "ps -eo args | grep -c '^sleep 100[0-3]$'"
    # The marker can come before every job is `sleep` by name: the background ones are forks that
    # exec later, and `setsid` (leading the process group the shell made for it) forks its child and
    # returns at once. Wait for all four, up to 5 s.
    four = f"for i in $(seq 500); do n=$({count}); [ $n -ge 4 ] && break; sleep 0.01; done; echo $n"
    assert (await run_in_sandbox(server, sid, four)).strip() == "4"
    response = await server.client.delete(f"/api/shells/{shell_id}")
    assert response.status_code == 200 and "message" in response.json()
    assert (await run_in_sandbox(server, sid, count)).strip() == "0"
    assert (await term.next())["type"] == "shell_exited"
    assert (await server.client.get(f"/api/sessions/{sid}/shells")).json() == {"shells": []}
    assert (await server.client.delete(f"/api/shells/{shell_id}")).status_code == 404


async def test_shell_exit_is_reported_with_its_code(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell_id = (await new_shell(server, sid))["shell_id"]
    term = await TermClient.open(server, shell_id)
    await term.type("sleep 1004 & exit 3\r")
    exited = await term.next()
    assert exited["type"] == "shell_exited" and exited["exit_code"] == 3
    assert (await term.closed())[0] == 1000
    count = "ps -eo args | grep -c '^sleep 1004$'"
    assert (await run_in_sandbox(server, sid, count)).strip() == "0"
    late = await refused(server, shell_id)
    assert late == (1008, "Shell session not found")


async def test_output_is_decoded_across_reads_and_binary_frames_on_request(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell_id = (await new_shell(server, sid))["shell_id"]
    term = await TermClient.open(server, shell_id)
    await term.run("printf '\\xe2\\x82\\xac%.0s' $(seq 1 40000); echo", "u1")  # 120 kB of 3-byte chars
    assert term.text.count("€") == 40000 and "\ufffd" not in term.text
    await term.close()
    raw = await TermClient.open(server, shell_id, "?binary=1")
    await raw.ws.send(b"printf 'B\\377Z'; echo\r")  # binary input, raw output
    await raw.expect(r"B\ufffdZ", raw=True)
    assert b"B\xffZ" in raw.raw
    await raw.close()


async def test_a_slow_client_loses_the_oldest_output_not_the_servers_memory(
    data_dir: Path, backend: str
) -> None:
    async with run_server(make_settings(data_dir, backend, terminal_scrollback_bytes=65536)) as server:
        sid = str((await server.create_session())["session_id"])
        shell_id = (await new_shell(server, sid))["shell_id"]
        term = await TermClient.open(server, shell_id, max_queue=1)  # stops reading: TCP pushes back
        await term.type("seq 1 500000; echo END-$((6*7))\r")  # 3.4 MB, 52 times the ring
        held = server.runtime.terminals.find(shell_id)
        assert held is not None
        for _ in range(1200):  # the shell is done once the ring holds the marker
            if b"END-42\r\n" in held.ring.buf:
                break
            assert len(held.ring.buf) <= 65536
            await asyncio.sleep(0.05)
        await term.expect(r"END-42\r\n")
        lines = [line for line in term.text.split("\r\n") if line.isdigit()]
        assert lines[-1] == "500000" and len(lines) < 500000  # the tail arrived; the middle was dropped
        await term.close()


async def test_input_nobody_reads_is_held_back_and_delete_still_works(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell_id = (await new_shell(server, sid))["shell_id"]
    term = await TermClient.open(server, shell_id)
    await term.run("stty -echo -icanon", "h0")  # sleep takes the foreground and never reads its input
    await term.type("sleep 1005\r")
    count = "ps -eo args | grep -c '^sleep 1005$'"
    for _ in range(300):
        if (await run_in_sandbox(server, sid, count)).strip() == "1":
            break
    held = server.runtime.terminals.find(shell_id)
    assert held is not None and held.tid is not None
    stream = held.sandbox._client.ptys.stream(held.tid)  # type: ignore[attr-defined]
    assert stream is not None

    async def flood() -> None:
        for _ in range(160):  # 10 MiB, past the 4 MiB window the daemon may hold
            await term.ws.send(b"z" * 65536)

    typing = asyncio.create_task(flood())
    try:
        for _ in range(3000):  # the server sent a window's worth, then waits for credit
            if stream._credit == 0:
                break
            await asyncio.sleep(0.01)  # polling the condition (the client pushes on its own)
        assert stream._credit == 0, stream._credit
        response = await server.client.delete(f"/api/shells/{shell_id}")
        assert response.status_code == 200
        assert (await run_in_sandbox(server, sid, count)).strip() == "0"
        assert (await term.closed())[0] == 1000
    finally:
        typing.cancel()
        await asyncio.gather(typing, return_exceptions=True)
    assert any(e["type"] == "shell_exited" for e in term.events)
