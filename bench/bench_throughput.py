"""Commands per second across 16 sessions, against the raw way to run them, in the same run.

* ours: 16 sessions, one client connection each, every client sending `POST /shell {"cmd": "echo hi"}`
  back to back for a fixed time; commands/s = all completed / elapsed;
* docker exec: 16 workers running `docker exec <container> echo hi` back to back on 16 containers
  (the sessions' own);
* bwrap spawn: 16 workers each spawning a bubblewrap sandbox (our mounts) running `echo hi`.

Target: >= 300 commands/s. Writes bench/results/throughput.json.
Usage: `python bench/bench_throughput.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from _common import Http, Row, backends, create_session, data_dir, parse_args, report, server, timed
from bench_shell import bwrap_echo
from crogia.cli import DEFAULT_LOOP

TARGET = 300.0
SESSIONS = 16
BODY = json.dumps({"cmd": "echo hi"}).encode()


async def drive(port: int, sid: str, until: float) -> int:
    done = 0
    async with Http(port) as http:
        while time.perf_counter() < until:
            status, body = await http.request("POST", f"/api/sessions/{sid}/shell", BODY)
            if status != 200 or b'"hi\\n"' not in body:
                raise RuntimeError(f"shell failed: {status} {body[:200]!r}")
            done += 1
    return done


async def rate(workers: int, seconds: float, job: Any) -> float:
    """Completed jobs per second with `workers` running `job(i, until)` concurrently."""
    started = time.perf_counter()
    until = started + seconds
    counts = await asyncio.gather(*(job(i, until) for i in range(workers)))
    return sum(counts) / (time.perf_counter() - started)


async def measure(backend: str, loop: str, seconds: float, raw_seconds: float) -> dict[str, float]:
    with data_dir() as folder:
        async with server(backend, loop=loop) as srv, Http(srv.port) as http:
            sessions = [await create_session(http, task=f"load {i}") for i in range(SESSIONS)]
            sids = [s["session_id"] for s in sessions]

            async def ours(i: int, until: float) -> int:
                return await drive(srv.port, sids[i], until)

            async def raw(i: int, until: float) -> int:
                argv = bwrap_echo(folder / str(i))
                if backend == "docker":
                    argv = ["docker", "exec", sessions[i]["container_id"], "echo", "hi"]
                done = 0
                while time.perf_counter() < until:
                    await timed(*argv)
                    done += 1
                return done

            await rate(SESSIONS, 0.5, ours)  # warm-up
            # ours, raw, ours: the two runs of ours bracket the baseline.
            first = await rate(SESSIONS, seconds / 2, ours)
            baseline = await rate(SESSIONS, raw_seconds, raw)
            second = await rate(SESSIONS, seconds / 2, ours)
    return {"ours": (first + second) / 2, "ours_runs": [first, second], "raw": baseline}


async def main() -> None:
    args = parse_args(__doc__)
    seconds, raw_seconds = (1.0, 1.0) if args.smoke else (10.0, 5.0)
    loops = [DEFAULT_LOOP] if args.smoke else ["asyncio", "uvloop"]
    rows: list[Row] = []
    measured: dict[str, Any] = {}
    for backend in backends():
        raw_name = "docker exec" if backend == "docker" else "bwrap spawn"
        for loop in loops:
            result = await measure(backend, loop, seconds, raw_seconds)
            measured[f"{backend}/{loop}"] = result
            default = loop == DEFAULT_LOOP
            print(f"{backend}/{loop}: {result}", file=sys.stderr)
            rows.append(
                Row(
                    f"commands/s across {SESSIONS} sessions, {backend}"
                    + ("" if default else f" ({loop} loop)"),
                    round(result["ours"], 1),
                    "/s",
                    f">= {TARGET:g}/s",
                    result["ours"] >= TARGET if default else None,
                    baseline=round(result["raw"], 1),
                    baseline_what=raw_name,
                    extra={"loop": loop, "runs": [round(r, 1) for r in result["ours_runs"]]},
                )
            )
    report("throughput", rows, smoke=args.smoke, measured=measured, default_loop=DEFAULT_LOOP)


if __name__ == "__main__":
    asyncio.run(main())
