"""Terminal limits, bad input, tenants and idle stops, through a real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from tests.conftest import make_settings
from tests.support.server import RunningServer, run_server
from tests.terminals.helpers import TermClient, new_shell, refused, run_in_sandbox


async def test_limits_and_bad_input(data_dir: Path, backend: str) -> None:
    async with run_server(make_settings(data_dir, backend, terminals_per_session=2)) as server:
        sid = str((await server.create_session())["session_id"])
        first = await new_shell(server, sid)
        await new_shell(server, sid)
        full = await server.client.post(f"/api/sessions/{sid}/shells")
        assert full.status_code == 409 and "2 terminals" in full.json()["detail"]
        for body in ({"cols": 0}, {"rows": 1001}, {"cols": "80"}):
            assert (await server.client.post(f"/api/sessions/{sid}/shells", json=body)).status_code == 422
        assert (await server.client.post("/api/sessions/nope/shells")).status_code == 404
        assert (await server.client.delete("/api/shells/shell_0123abcd")).status_code == 404
        assert await refused(server, "shell_0123abcd") == (1008, "Shell session not found")

        term = await TermClient.open(server, first["shell_id"])
        for junk in ("not json", "[1, 2]", json.dumps({"type": "what"}), json.dumps({"type": "shell_input"})):
            await term.ws.send(junk)  # ignored: the terminal goes on
        await term.ws.send(json.dumps({"type": "ping"}))
        assert (await term.next())["type"] == "pong"
        await term.run("echo fine", "l1")
        await term.ws.send(json.dumps({"type": "shell_input", "data": "x" * (64 * 1024)}))
        assert (await term.closed())[0] == 1009
        again = await TermClient.open(server, first["shell_id"])  # the terminal outlived its socket
        await again.run("echo alive", "l2")
        await again.close()


async def test_terminals_obey_tenants(data_dir: Path, backend: str) -> None:
    settings = make_settings(data_dir, backend, api_tokens="alice=tok-a,bob=tok-b")
    async with run_server(settings, token="tok-a") as alice:
        sid = str((await alice.create_session())["session_id"])
        shell = await new_shell(alice, sid)
        shell_id = shell["shell_id"]
        assert shell_id.startswith("shell_") and len(shell_id) >= len("shell_") + 16
        bob_auth = {"Authorization": "Bearer tok-b"}
        async with httpx.AsyncClient(base_url=alice.base_url, headers=bob_auth) as bob:
            assert (await bob.delete(f"/api/shells/{shell_id}")).status_code == 404
            assert (await bob.get(f"/api/sessions/{sid}/shells")).status_code == 404
            assert (await bob.post(f"/api/sessions/{sid}/shells")).status_code == 404
        listed = (await alice.client.get(f"/api/sessions/{sid}/shells")).json()["shells"]
        assert [s["shell_id"] for s in listed] == [shell_id]
        assert (await refused(alice, shell_id, "?token=tok-b"))[0] == 4404
        assert (await refused(alice, shell_id))[0] == 4401
        term = await TermClient.open(alice, shell_id, "?token=tok-a")
        await term.run("echo mine", "a1")
        await term.close()


async def test_an_idle_stop_ends_terminals_until_the_session_wakes(data_dir: Path, backend: str) -> None:
    async with run_server(make_settings(data_dir, backend, session_idle_ttl=0.5)) as server:
        sid = str((await server.create_session())["session_id"])
        shell_id = (await new_shell(server, sid))["shell_id"]
        live = server.runtime.sessions.peek(sid)
        assert live is not None
        watching = await TermClient.open(server, shell_id)
        await watching.run("echo watched", "i0")
        assert live.busy == 1 and not live.asleep  # a socket attached counts as use
        await watching.close()
        await _wait_until_stopped(server, sid)  # once nobody looks and nothing prints
        shells = (await server.client.get(f"/api/sessions/{sid}/shells")).json()["shells"]
        assert [(s["shell_id"], s["status"]) for s in shells] == [(shell_id, "stopped")]
        assert (await refused(server, shell_id))[0] == 4409
        stopped = await server.client.delete(f"/api/shells/{shell_id}")
        assert stopped.status_code == 409 and "stopped" in stopped.json()["detail"], stopped.text
        assert live.asleep  # asking about its terminals does not wake it
        await run_in_sandbox(server, sid, "true")  # woken another way: its old terminals are gone
        assert (await server.client.get(f"/api/sessions/{sid}/shells")).json()["shells"] == []
        assert (await server.client.delete(f"/api/shells/{shell_id}")).status_code == 404
        assert (await refused(server, shell_id))[0] == 1008

        second = (await new_shell(server, sid))["shell_id"]
        await _wait_until_stopped(server, sid)
        assert (await server.client.delete(f"/api/shells/{second}")).status_code == 409
        fresh = await new_shell(server, sid)  # wakes the session; the stopped terminal is gone
        listed = (await server.client.get(f"/api/sessions/{sid}/shells")).json()["shells"]
        assert [s["shell_id"] for s in listed] == [fresh["shell_id"]]
        assert (await server.client.delete(f"/api/shells/{second}")).status_code == 404
        term = await TermClient.open(server, fresh["shell_id"])
        await term.run("echo awake", "i1")
        await term.close()


async def _wait_until_stopped(server: RunningServer, sid: str) -> None:
    for _ in range(600):
        if (await server.client.get(f"/api/sessions/{sid}")).json()["status"] == "stopped":
            return
        await asyncio.sleep(0.1)  # polling the condition: the reaper ticks on its own clock
    raise AssertionError("the idle session was never stopped")


async def test_session_delete_ends_its_terminals(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    shell_id = (await new_shell(server, sid))["shell_id"]
    term = await TermClient.open(server, shell_id)
    await term.run("echo here", "d1")
    assert (await server.client.delete(f"/api/sessions/{sid}")).status_code == 200
    assert (await term.next())["type"] == "shell_exited"
    assert (await term.closed())[0] == 1000
    assert (await server.client.delete(f"/api/shells/{shell_id}")).status_code == 404
    assert (await server.client.get("/api/health")).json()["active_shells"] == 0
