"""Files, search, shell and processes through the REST API, on both backends, with the sandbox
writing to the same workspace at the same time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import make_settings, need_docker
from tests.support.postgres import free_port
from tests.support.server import RunningServer, run_server


@pytest.fixture
async def sid(server: RunningServer) -> str:
    return str((await server.create_session(task="workspace"))["session_id"])


@pytest.fixture(params=["host", "daemon"])
def files_mode(request: pytest.FixtureRequest) -> str:
    """SANDBOX_FILES: the files and search tests run with the server and with the daemon serving."""
    mode: str = request.param
    return mode


FILES_CASES = {
    "host": {"sandbox_files": "host"},
    "daemon": {"sandbox_files": "daemon"},
    # Docker over TCP with the workspace in a volume: no host folder, so only the daemon can serve it.
    "tcp-volume": {"sandbox_files": "daemon", "sandbox_transport": "tcp", "docker_workspace": "volume"},
}


@pytest.fixture(
    params=[
        pytest.param((backend, case), id=f"{backend}-{case}")
        for backend in ("bubblewrap", "docker")
        for case in FILES_CASES
        if backend == "docker" or case != "tcp-volume"
    ]
)
async def fserver(data_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    """A server for each backend and SANDBOX_FILES mode, plus Docker over TCP with a volume workspace."""
    backend, case = request.param
    if backend == "docker":
        need_docker()
    async with run_server(make_settings(data_dir, backend, **FILES_CASES[case])) as running:
        yield running


@pytest.fixture
async def fsid(fserver: RunningServer) -> str:
    return str((await fserver.create_session(task="workspace"))["session_id"])


async def shell(server: RunningServer, sid: str, cmd: str, **extra: object) -> dict:  # type: ignore[type-arg]
    response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd, **extra})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_files_written_by_api_are_seen_by_sandbox_and_back(fserver: RunningServer, fsid: str) -> None:
    health = (await fserver.client.get("/api/health")).json()
    assert health["files"] == fserver.settings.sandbox_files
    assert health["transport"] == fserver.settings.sandbox_transport
    base = f"/api/sessions/{fsid}/files"
    wrote = await fserver.client.post(
        f"{base}/content", json={"path": "src/app.py", "content": "print('hé')\n"}
    )
    assert wrote.status_code == 200 and "message" in wrote.json()
    out = await shell(fserver, fsid, "python3 src/app.py && echo made > from_sandbox.txt && ln -s / escape")
    assert out["output"] == "hé\n" and out["exit_code"] == 0 and out["command"].startswith("python3")
    read = (await fserver.client.get(f"{base}/content", params={"path": "from_sandbox.txt"})).json()
    assert read == {"path": "from_sandbox.txt", "content": "made\n"}
    listing = (await fserver.client.get(base, params={"path": "."})).json()
    kinds = {item["name"]: item["type"] for item in listing["items"]}
    assert kinds == {"src": "directory", "from_sandbox.txt": "file", "escape": "symlink"}
    sizes = {item["name"]: item["size"] for item in listing["items"]}
    assert sizes["src"] is None and sizes["from_sandbox.txt"] == 5
    assert listing["truncated"] is False


async def test_escapes_are_refused(fserver: RunningServer, fsid: str) -> None:
    await shell(fserver, fsid, "ln -s / root_link && ln -s /etc/passwd pw")
    base = f"/api/sessions/{fsid}/files"
    for path in ("../../etc/passwd", "/etc/passwd", "root_link/etc/passwd", "pw"):
        response = await fserver.client.get(f"{base}/content", params={"path": path})
        assert 400 <= response.status_code < 500, (path, response.text)
        assert "root:" not in response.text
    listing = await fserver.client.get(base, params={"path": "root_link"})
    assert 400 <= listing.status_code < 500
    grep = await fserver.client.post(
        f"/api/sessions/{fsid}/search/grep", json={"pattern": "root:", "path": "."}
    )
    assert grep.status_code == 200 and grep.json()["matches"] == []


async def test_binary_upload_download_move_delete(fserver: RunningServer, fsid: str) -> None:
    base = f"/api/sessions/{fsid}/files"
    blob = bytes(range(256)) * 1000
    up = await fserver.client.put(f"{base}/raw", params={"path": "bin/data.bin"}, content=blob)
    assert up.status_code == 200, up.text
    down = await fserver.client.get(f"{base}/raw", params={"path": "bin/data.bin"})
    assert down.content == blob
    not_text = await fserver.client.get(f"{base}/content", params={"path": "bin/data.bin"})
    assert not_text.status_code == 400
    moved = await fserver.client.post(f"{base}/move", json={"src": "bin/data.bin", "dst": "data2.bin"})
    assert moved.status_code == 200
    assert (await shell(fserver, fsid, "sha256sum data2.bin | cut -c1-8"))["exit_code"] == 0
    assert (await fserver.client.post(f"{base}/mkdir", json={"path": "a/b/c"})).status_code == 200
    assert (await fserver.client.delete(base, params={"path": "a"})).status_code in (400, 409)
    assert (await fserver.client.delete(base, params={"path": "a", "recursive": True})).status_code == 200
    assert (await fserver.client.get(f"{base}/content", params={"path": "a/b"})).status_code == 404


async def test_search_files_and_grep_compat_shapes(fserver: RunningServer, fsid: str) -> None:
    await shell(
        fserver,
        fsid,
        "mkdir -p pkg && printf 'from flask import Flask\\n' > pkg/app.py && echo '# Flask' > README.md",
    )
    files = await fserver.client.post(
        f"/api/sessions/{fsid}/search/files", json={"pattern": "*.py", "path": "."}
    )
    assert files.json()["matches"] == ["pkg/app.py"]
    grep = await fserver.client.post(
        f"/api/sessions/{fsid}/search/grep", json={"pattern": "Flask", "path": ".", "file_types": "*.py,*.md"}
    )
    body = grep.json()
    assert {(m["file"], m["line"]) for m in body["matches"]} == {("pkg/app.py", 1), ("README.md", 1)}
    assert body["pattern"] == "Flask" and body["path"] == "."
    bad = await fserver.client.post(f"/api/sessions/{fsid}/search/grep", json={"pattern": "(unclosed"})
    assert bad.status_code == 400


async def test_shell_timeout_output_cap_and_tty(server: RunningServer, sid: str) -> None:
    slow = await shell(server, sid, "sleep 30", timeout=0.5)
    assert slow["timed_out"] is True and slow["exit_code"] == 124
    big = await shell(server, sid, "yes | head -c 200000", max_output=10_000)
    assert big["truncated"] is True and len(big["output"]) < 20_000
    tty = await shell(server, sid, "test -t 1 && echo tty || echo notty", tty=True)
    assert tty["output"].strip() == "tty"
    failing = await shell(server, sid, "exit 3")
    assert failing["exit_code"] == 3 and failing["timed_out"] is False


async def test_shell_stream_sends_output_then_result(server: RunningServer, sid: str) -> None:
    events = []
    async with server.client.stream(
        "POST",
        f"/api/sessions/{sid}/shell/stream",
        json={"cmd": "for i in 1 2 3; do echo $i; sleep 0.05; done"},
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "result":
                result = json.loads(line[6:])
    assert events[-1] == "result" and "output" in events
    assert result["output"] == "1\n2\n3\n" and result["exit_code"] == 0


async def test_processes_start_logs_exit_and_stop(server: RunningServer, sid: str) -> None:
    base = f"/api/sessions/{sid}/processes"
    quick = (await server.client.post(base, json={"cmd": "echo started; exit 7"})).json()
    port = free_port()
    server_proc = (await server.client.post(base, json={"cmd": f"python3 -m http.server {port}"})).json()
    assert {"pid", "cmd", "status", "log", "started"} <= server_proc.keys()
    for _ in range(100):
        procs = {p["pid"]: p for p in (await server.client.get(base)).json()}
        if procs[quick["pid"]]["status"] == "exited":
            break
        await asyncio.sleep(0.05)
    assert procs[quick["pid"]]["exit_code"] == 7 and procs[quick["pid"]]["ended"]
    logs = (await server.client.get(f"{base}/{quick['pid']}/logs", params={"lines": 5})).json()
    assert logs == {"logs": "started\n", "pid": quick["pid"]}
    reached = await shell(
        server,
        sid,
        # Again until the server listens:
        f"for i in $(seq 200); do curl -sf -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/"
        " && break; sleep 0.05; done",
    )
    assert "200" in reached["output"]
    stopped = await server.client.post(f"{base}/{server_proc['pid']}/stop")
    assert stopped.status_code == 200 and "message" in stopped.json()
    final = {p["pid"]: p for p in (await server.client.get(base)).json()}
    assert final[server_proc["pid"]]["status"] == "stopped"
    assert (await server.client.post(f"{base}/999999/stop")).status_code == 404
    assert (await server.client.get(f"{base}/abc/logs")).status_code == 422


async def test_follow_log_streams_until_the_process_ends(server: RunningServer, sid: str) -> None:
    base = f"/api/sessions/{sid}/processes"
    proc = (
        await server.client.post(base, json={"cmd": "for i in 1 2 3 4; do echo line$i; sleep 0.2; done"})
    ).json()
    text, events = "", []
    async with server.client.stream(
        "GET", f"{base}/{proc['pid']}/logs/follow", params={"lines": 10}
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "output":
                text += json.loads(line[6:])["data"]
    assert events[-1] == "end"
    assert text.split() == ["line1", "line2", "line3", "line4"]


@pytest.mark.parametrize("files_mode", ["host", "daemon"])
async def test_size_limits_give_413_and_lose_nothing(data_dir: Path, files_mode: str) -> None:
    settings = make_settings(
        data_dir, "bubblewrap", request_max_bytes=64_000, file_read_max_bytes=10_000, sandbox_files=files_mode
    )
    async with run_server(settings) as small:
        sid = (await small.create_session())["session_id"]
        base = f"/api/sessions/{sid}/files"
        assert (
            await small.client.put(f"{base}/raw", params={"path": "ok.bin"}, content=b"k" * 1000)
        ).status_code == 200
        big = await small.client.put(f"{base}/raw", params={"path": "ok.bin"}, content=b"x" * 100_000)
        assert big.status_code == 413 and "limit" in big.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap is counted while streaming
            for _ in range(100):
                yield b"y" * 1000

        streamed = await small.client.put(f"{base}/raw", params={"path": "ok.bin"}, content=chunks())
        assert streamed.status_code == 413
        assert (await small.client.get(f"{base}/raw", params={"path": "ok.bin"})).content == b"k" * 1000
        await small.client.post(f"{base}/content", json={"path": "large.txt", "content": "z" * 20_000})
        too_large = await small.client.get(f"{base}/content", params={"path": "large.txt"})
        assert too_large.status_code == 413
        ranged = await small.client.get(f"{base}/content", params={"path": "large.txt", "max_bytes": 5})
        assert ranged.status_code == 413
        listing = (await small.client.get(base)).json()["items"]
        assert sorted(item["name"] for item in listing) == ["large.txt", "ok.bin"]


async def test_a_sandbox_swapping_symlinks_mid_request_never_leaks(fserver: RunningServer, fsid: str) -> None:
    """Inside the real sandbox, root swaps a folder and a file for symlinks to /etc while the API reads,
    lists and downloads them (both SANDBOX_FILES modes); /proc paths and `..` are refused as ever."""
    base = f"/api/sessions/{fsid}/files"
    client = fserver.client
    setup = "mkdir d && echo inside > d/f.txt && echo inside > f.txt && ln -s /proc/self/environ proc_link"
    assert (await shell(fserver, fsid, setup))["exit_code"] == 0
    swap = (
        "while true; do mv d d_ && ln -s /etc d && rm d && mv d_ d; "
        "mv f.txt f_ && ln -s /etc/passwd f.txt && rm f.txt && mv f_ f.txt; done"
    )
    started = await client.post(f"/api/sessions/{fsid}/processes", json={"cmd": swap})
    assert started.status_code == 200, started.text
    answered: dict[int, int] = {}
    deadline = asyncio.get_running_loop().time() + 3
    while asyncio.get_running_loop().time() < deadline:
        for path in ("d/f.txt", "f.txt", "d/passwd"):
            for response in (
                await client.get(f"{base}/content", params={"path": path}),
                await client.get(f"{base}/raw", params={"path": path}),
            ):
                assert response.status_code in (200, 400, 404), response.text
                assert "root:" not in response.text
                answered[response.status_code] = answered.get(response.status_code, 0) + 1
        listing = await client.get(base, params={"path": "d"})
        assert listing.status_code in (200, 400, 404) and "passwd" not in listing.text
    assert answered.get(200, 0) > 0 and answered.get(400, 0) + answered.get(404, 0) > 0, answered
    for path in ("/proc/self/environ", "proc_link", "../proc/1/environ", "d/../../etc/passwd"):
        response = await client.get(f"{base}/content", params={"path": path})
        assert 400 <= response.status_code < 500, (path, response.text)
        assert "PATH=" not in response.text
