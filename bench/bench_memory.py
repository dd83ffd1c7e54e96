"""Host memory per idle session, against an idle container (or bwrap sandbox), in the same run.

Memory is PSS (proportional set size, /proc/PID/smaps_rollup): pages shared by N processes count
1/N to each, so N sessions sum to what they really cost the host.

* ours: N idle sessions on a `crogia serve` process. Per session = (server PSS with the N sessions -
  server PSS before them) / N + the sandbox's own processes: Docker: the container's processes (init
  and the executor daemon) plus its containerd shim; bubblewrap: the bwrap processes and the daemon.
* baseline: N idle `docker run -d IMAGE sleep` containers (their processes plus shims), or N idle
  bubblewrap sandboxes with our mounts running `sleep`.

Target: <= 8 MB per idle session. Writes bench/results/memory.json.
Usage: `python bench/bench_memory.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _common import (
    IMAGE,
    Http,
    Row,
    backends,
    create_session,
    data_dir,
    parse_args,
    report,
    run_quiet,
    server,
)
from bench_shell import bwrap_echo

TARGET_MB = 8.0
SETTLE = 3.0


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def tree_kib(pid: int) -> int:
    return pss_kib(pid) + sum(pss_kib(child) for child in descendants(pid))


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def container_kib(container_id: str) -> int:
    """The container's processes plus its containerd shim (the host-side cost of one container)."""
    proc = await asyncio.create_subprocess_exec(
        "docker", "inspect", "-f", "{{.State.Pid}}", container_id, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    init = int(out)
    return tree_kib(init) + pss_kib(parent(init))


async def ours(backend: str, count: int) -> dict[str, float]:
    async with server(backend) as srv, Http(srv.port) as http:
        warm = await create_session(http, task="warm-up")
        await http.request("DELETE", f"/api/sessions/{warm['session_id']}")
        await asyncio.sleep(SETTLE)
        before = pss_kib(srv.pid)
        sessions = [await create_session(http, task=f"idle {i}") for i in range(count)]
        await asyncio.sleep(SETTLE)
        server_kib = (pss_kib(srv.pid) - before) / count
        if backend == "docker":
            sandboxes = [await container_kib(s["container_id"]) for s in sessions]
            sandbox_kib = sum(sandboxes) / count
        else:
            sandbox_kib = sum(pss_kib(pid) for pid in descendants(srv.pid)) / count
    return {"server_kib": server_kib, "sandbox_kib": sandbox_kib, "total_kib": server_kib + sandbox_kib}


@contextlib.asynccontextmanager
async def idle_containers(count: int) -> AsyncIterator[list[str]]:
    label = f"crogia.bench={uuid.uuid4().hex[:8]}"
    ids: list[str] = []
    try:
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                "docker", "run", "-d", "--label", label, IMAGE, "sleep", "600", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            ids.append(out.decode().strip())
        yield ids
    finally:
        for container in ids:
            await run_quiet("docker", "rm", "-f", container)


async def baseline(backend: str, count: int) -> float:
    if backend == "docker":
        async with idle_containers(count) as ids:
            await asyncio.sleep(SETTLE)
            return sum([await container_kib(c) for c in ids]) / count
    with data_dir() as folder:
        argv = [*bwrap_echo(folder)[:-2], "/bin/sleep", "600"]
        procs = [await asyncio.create_subprocess_exec(*argv) for _ in range(count)]
        try:
            await asyncio.sleep(SETTLE)
            return sum(tree_kib(p.pid) for p in procs) / count
        finally:
            for p in procs:
                p.kill()
                await p.wait()


async def main() -> None:
    args = parse_args(__doc__)
    count = 3 if args.smoke else 20
    rows: list[Row] = []
    measured: dict[str, Any] = {}
    for backend in backends():
        mine = await ours(backend, count)
        base = await baseline(backend, count)
        measured[backend] = {**mine, "baseline_kib": base}
        print(f"{backend}: {json.dumps(measured[backend])}", file=sys.stderr)
        mb = mine["total_kib"] / 1024
        rows.append(
            Row(
                f"host memory per idle session, {backend}",
                round(mb, 2),
                "MB",
                f"<= {TARGET_MB:g} MB",
                mb <= TARGET_MB,
                baseline=round(base / 1024, 2),
                baseline_what="idle container" if backend == "docker" else "idle bwrap sandbox",
                extra={
                    "server_mb": round(mine["server_kib"] / 1024, 2),
                    "sandbox_mb": round(mine["sandbox_kib"] / 1024, 2),
                },
            )
        )
    report("memory", rows, smoke=args.smoke, sessions=count, measured=measured, unit="MiB (PSS)")


if __name__ == "__main__":
    asyncio.run(main())
