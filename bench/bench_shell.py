"""POST /shell with `echo hi`, p50, on each backend, against the raw ways to run a command, same run.

* ours: `POST /api/sessions/{id}/shell {"cmd": "echo hi"}`, one request at a time over a keep-alive
  connection, to a `crogia serve` process (on the stdlib loop and on uvloop: `--loop`);
* docker exec: `docker exec <the session's own container> echo hi` (what a naive backend does);
* bwrap spawn: a fresh bubblewrap sandbox with our mounts running `echo hi`;
* fork: `/bin/echo hi` as a child of this process (fork + exec + wait), for reference;
* isolation off: the same request to a second server with the shared network and host-root sandboxes
  (`UNISOLATED`), so the cost of network isolation and user namespaces shows as a ratio (target 1.2x);
* tcp (Docker): the same request to a third server with SANDBOX_TRANSPORT=tcp and
  DOCKER_WORKSPACE=volume, against the unix socket (target 1.3x);
* tcp+tls (Docker): a fourth server with SANDBOX_TCP_TLS=true as well, against plain TCP (target 1.2x).

Rounds interleave every side, so load from elsewhere hits all alike; medians are compared.
Target: ours p50 <= 5 ms on Docker and on bubblewrap. Writes bench/results/shell.json.
Usage: `python bench/bench_shell.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    UNISOLATED,
    Http,
    Row,
    backends,
    create_session,
    data_dir,
    parse_args,
    percentile,
    report,
    server,
    timed,
)
from crogia.cli import DEFAULT_LOOP
from crogia.sandbox.base import SandboxSpec
from crogia.sandbox.bubblewrap import bwrap_args, find_bwrap, sandbox_command

TARGET_MS = 5.0
TCP_TARGET = 1.3
TCP = {"SANDBOX_TRANSPORT": "tcp", "DOCKER_WORKSPACE": "volume", "SANDBOX_FILES": "daemon"}
TLS = {**TCP, "SANDBOX_TCP_TLS": "true"}
TLS_TARGET = 1.2
BODY = json.dumps({"cmd": "echo hi"}).encode()


async def ours(http: Http, sid: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status, body = await http.request("POST", f"/api/sessions/{sid}/shell", BODY)
        times.append(time.perf_counter() - started)
        if status != 200 or b'"hi\\n"' not in body:
            raise RuntimeError(f"shell failed: {status} {body[:200]!r}")
    return times


def bwrap_echo(folder: Path) -> list[str]:
    """The command line of a sandbox like ours (same mounts and namespaces) running `echo hi`."""
    bwrap = find_bwrap()
    if bwrap is None:
        raise SystemExit("bwrap not found")
    spec = SandboxSpec("bench")
    (folder / "ws").mkdir(parents=True, exist_ok=True)
    argv = bwrap_args(bwrap, spec, "/usr/bin/python3", 3, workspace=folder / "ws")
    return [*argv[: -len(sandbox_command(spec, "/usr/bin/python3", 3))], "/bin/echo", "hi"]


async def measure(backend: str, loop: str, rounds: int, per_round: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {
        "ours": [],
        "unisolated": [],
        "raw": [],
        "fork": [],
        "tcp": [],
        "tls": [],
    }
    with data_dir() as folder:
        async with contextlib.AsyncExitStack() as stack:
            # Every server is up before any connection opens (an idle keep-alive one would time out).
            tcp = (
                await stack.enter_async_context(server(backend, loop=loop, env=TCP))
                if backend == "docker"
                else None
            )
            tls = (
                await stack.enter_async_context(server(backend, loop=loop, env=TLS))
                if backend == "docker"
                else None
            )
            srv = await stack.enter_async_context(server(backend, loop=loop))
            off = await stack.enter_async_context(server(backend, loop=loop, env=UNISOLATED))
            http = await stack.enter_async_context(Http(srv.port))
            http_off = await stack.enter_async_context(Http(off.port))
            session = await create_session(http, task="bench shell")
            sid = session["session_id"]
            sid_off = (await create_session(http_off, task="bench shell, isolation off"))["session_id"]
            http_tcp, sid_tcp = None, ""
            if tcp is not None:
                http_tcp = await stack.enter_async_context(Http(tcp.port))
                sid_tcp = (await create_session(http_tcp, task="bench shell, tcp"))["session_id"]
                await ours(http_tcp, sid_tcp, 20)
            http_tls, sid_tls = None, ""
            if tls is not None:
                http_tls = await stack.enter_async_context(Http(tls.port))
                sid_tls = (await create_session(http_tls, task="bench shell, tcp+tls"))["session_id"]
                await ours(http_tls, sid_tls, 20)
            raw = ["docker", "exec", session["container_id"], "echo", "hi"]
            if backend != "docker":
                raw = bwrap_echo(folder)
            await ours(http, sid, 20)  # warm-up
            await ours(http_off, sid_off, 20)
            await timed(*raw)
            for _ in range(rounds):
                times["ours"] += await ours(http, sid, per_round)
                times["unisolated"] += await ours(http_off, sid_off, per_round)
                if http_tcp is not None:
                    times["tcp"] += await ours(http_tcp, sid_tcp, per_round)
                if http_tls is not None:
                    times["tls"] += await ours(http_tls, sid_tls, per_round)
                times["raw"] += [await timed(*raw) for _ in range(max(2, per_round // 10))]
                times["fork"] += [await timed("/bin/echo", "hi") for _ in range(max(2, per_round // 5))]
    return {
        side: {
            "p50_ms": round(statistics.median(t) * 1000, 3),
            "p90_ms": round(percentile(t, 90) * 1000, 3),
            "n": len(t),
        }
        for side, t in times.items()
        if t
    }


async def main() -> None:
    args = parse_args(__doc__)
    rounds, per_round = (2, 10) if args.smoke else (10, 50)
    loops = [DEFAULT_LOOP] if args.smoke else ["asyncio", "uvloop"]
    rows: list[Row] = []
    measured: dict[str, Any] = {}
    for backend in backends():
        raw_name = "docker exec" if backend == "docker" else "bwrap spawn"
        for loop in loops:
            result = await measure(backend, loop, rounds, per_round)
            measured[f"{backend}/{loop}"] = result
            p50 = result["ours"]["p50_ms"]
            default = loop == DEFAULT_LOOP
            rows.append(
                Row(
                    f"POST /shell echo hi p50, {backend}" + ("" if default else f" ({loop} loop)"),
                    p50,
                    "ms",
                    f"<= {TARGET_MS:g} ms",
                    p50 <= TARGET_MS if default else None,
                    baseline=result["raw"]["p50_ms"],
                    baseline_what=raw_name,
                    extra={
                        "loop": loop,
                        "p90_ms": result["ours"]["p90_ms"],
                        "fork_p50_ms": result["fork"]["p50_ms"],
                    },
                )
            )
            if default:
                off = result["unisolated"]["p50_ms"]
                rows.append(
                    Row(
                        f"POST /shell echo hi p50, {backend}, isolated vs isolation off",
                        p50,
                        "ms",
                        "<= 1.2x isolation off",
                        p50 / off <= 1.2,
                        baseline=off,
                        baseline_what="isolation off (shared network, host root)",
                    )
                )
            if default and "tcp" in result:
                tcp_p50 = result["tcp"]["p50_ms"]
                rows.append(
                    Row(
                        f"POST /shell echo hi p50, {backend}, TCP transport + volume vs unix socket",
                        tcp_p50,
                        "ms",
                        f"<= {TCP_TARGET:g}x unix",
                        tcp_p50 / p50 <= TCP_TARGET,
                        baseline=p50,
                        baseline_what="unix socket, bound workspace",
                    )
                )
            if default and "tls" in result and "tcp" in result:
                tls_p50, tcp_p50 = result["tls"]["p50_ms"], result["tcp"]["p50_ms"]
                rows.append(
                    Row(
                        f"POST /shell echo hi p50, {backend}, TCP with TLS vs plain TCP",
                        tls_p50,
                        "ms",
                        f"<= {TLS_TARGET:g}x plain TCP",
                        tls_p50 / tcp_p50 <= TLS_TARGET,
                        baseline=tcp_p50,
                        baseline_what="TCP transport without TLS",
                    )
                )
            print(
                f"{backend}/{loop}: ours p50 {p50:.2f} ms (p90 {result['ours']['p90_ms']:.2f}), "
                f"{raw_name} {result['raw']['p50_ms']:.2f} ms, fork {result['fork']['p50_ms']:.2f} ms",
                file=sys.stderr,
            )
    report("shell", rows, smoke=args.smoke, measured=measured, default_loop=DEFAULT_LOOP)


if __name__ == "__main__":
    asyncio.run(main())
