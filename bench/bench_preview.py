"""Previews: a server in the sandbox reached through the preview proxy, against the same server reached
directly inside the sandbox (a client started there with a command, so no proxy and no channel).

Both sides run the same client, `CLIENT` below (http.client, one keep-alive connection, in a process
of its own): inside the sandbox against 127.0.0.1:8000, and on the host through the proxy.

* small GET: p50 of sequential `GET /` through `.../ports/8000/`, against the same loop inside the
  sandbox. Target: p50 overhead <= 2 ms.
* download: 100 MB from the sandbox's server through the proxy, against the same download inside
  the sandbox (read 64 KiB at a time); ROUNDS of each, alternating, medians compared. Target: >= 50%
  of direct.
* concurrency: 100 clients at once, 5 requests each, through the proxy. Target: no errors.

The server in the sandbox is `tests/previews/helpers.APP` (stdlib ThreadingHTTPServer). Writes
bench/results/preview.json. Usage: `python bench/bench_preview.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import httpx

from _common import Http, Row, backends, create_session, parse_args, percentile, report, server

OVERHEAD_MS, RATIO, CLIENTS = 2.0, 0.5, 100
ROUNDS = 3
"""Downloads each side, alternating (direct, proxy, direct, ...): the medians are compared, since
one download on these shared cores can be 2x off its neighbour."""

CLIENT = r"""
import http.client, json, sys, time
n, size, port, prefix = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
times = []
for _ in range(n):
    t = time.perf_counter()
    c.request("GET", prefix + "/")
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    times.append(time.perf_counter() - t)
t = time.perf_counter(); c.request("GET", f"{prefix}/big/{size}"); r = c.getresponse(); got = 0
while (b := r.read(1 << 16)):
    got += len(b)
rate = got / (time.perf_counter() - t)
print(json.dumps({"times": times, "rate": rate, "got": got}))
"""


async def shell(http: Http, sid: str, cmd: str, timeout: float = 300) -> str:
    status, body = await http.json("POST", f"/api/sessions/{sid}/shell", {"cmd": cmd, "timeout": timeout})
    assert status == 200, body
    output: str = body["output"]
    return output


async def through_the_proxy(port: int, prefix: str, n: int, size: int) -> dict[str, Any]:
    """`CLIENT` run on the host, in a process of its own, against the proxy."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(n), str(size), str(port), prefix, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


async def wait_port(http: Http, sid: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, body = await http.json("GET", f"/api/sessions/{sid}/ports")
        if any(p["port"] == port for p in body["ports"]):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listened on {port}")


async def measure(backend: str, n: int, size: int) -> dict[str, Any]:
    from tests.previews.helpers import APP  # here: `_common` has put the repo on sys.path by now

    async with server(backend) as srv, Http(srv.port) as http:
        sid = (await create_session(http))["session_id"]
        for path, content in (("app.py", APP), ("client.py", CLIENT)):
            status, _ = await http.json(
                "POST", f"/api/sessions/{sid}/files/content", {"path": path, "content": content}
            )
            assert status == 200
        status, _ = await http.json("POST", f"/api/sessions/{sid}/processes", {"cmd": "python3 app.py 8000"})
        assert status == 200
        await wait_port(http, sid, 8000)
        prefix = f"/api/sessions/{sid}/ports/8000"
        direct_rates, ours_rates = [], []
        for round_ in range(ROUNDS):
            gets = n if round_ == 0 else 0
            direct = json.loads(await shell(http, sid, f"python3 client.py {gets} {size} 8000 ''"))
            ours = await through_the_proxy(srv.port, prefix, gets, size)
            assert ours["got"] == size == direct["got"], (ours["got"], direct["got"])
            direct_rates.append(direct["rate"])
            ours_rates.append(ours["rate"])
            if round_ == 0:
                direct_times, ours_times = direct["times"], ours["times"]
        base = f"http://127.0.0.1:{srv.port}{prefix}"
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CLIENTS)) as client:
            why: list[str] = []  # the first few errors, for the report

            async def one_client() -> int:
                errors = 0
                for _ in range(5):
                    try:
                        answer = await client.get(f"{base}/")
                        if answer.status_code != 200:
                            errors += 1
                            why.append(f"{answer.status_code} {answer.text[:200]}")
                    except httpx.HTTPError as exc:
                        errors += 1
                        why.append(repr(exc)[:200])
                return errors

            started = time.perf_counter()
            errors = sum(await asyncio.gather(*(one_client() for _ in range(CLIENTS))))
            concurrent_s = time.perf_counter() - started
        return {
            "ours_p50_ms": round(percentile(ours_times, 50) * 1000, 3),
            "direct_p50_ms": round(percentile(direct_times, 50) * 1000, 3),
            "ours_mb_s": round(statistics.median(ours_rates) / 1e6, 1),
            "direct_mb_s": round(statistics.median(direct_rates) / 1e6, 1),
            "ours_mb_s_each": [round(r / 1e6) for r in ours_rates],
            "direct_mb_s_each": [round(r / 1e6) for r in direct_rates],
            "errors": errors,
            "concurrent_s": round(concurrent_s, 2),
            "errors_seen": why[:5],
        }


async def main() -> None:
    args = parse_args(__doc__)
    n, size = (30, 4 << 20) if args.smoke else (300, 100 << 20)
    rows, extra = [], {}
    only = os.environ.get("BENCH_BACKENDS")
    for backend in only.split(",") if only else backends():
        m = await measure(backend, n, size)
        overhead = round(float(m["ours_p50_ms"]) - float(m["direct_p50_ms"]), 3)
        rows.append(Row(f"preview small GET p50 ({backend})", m["ours_p50_ms"], "ms",
                        f"overhead <= {OVERHEAD_MS:g} ms", overhead <= OVERHEAD_MS, m["direct_p50_ms"],
                        "direct, inside the sandbox", extra={"overhead_ms": overhead}))  # fmt: skip
        ratio = round(float(m["ours_mb_s"]) / max(float(m["direct_mb_s"]), 1e-6), 3)
        rows.append(Row(f"preview {size >> 20} MB download ({backend})", m["ours_mb_s"], "MB/s",
                        f">= {RATIO:.0%} of direct", ratio >= RATIO, m["direct_mb_s"],
                        "direct, inside the sandbox", ratio))  # fmt: skip
        rows.append(Row(f"preview {CLIENTS} concurrent clients x 5 GETs: errors ({backend})", m["errors"],
                        "errors", "0", m["errors"] == 0, extra={"seconds": m["concurrent_s"]}))  # fmt: skip
        extra[f"raw_{backend}"] = m
    report("preview", rows, smoke=args.smoke, requests=n, download_bytes=size, **extra)


if __name__ == "__main__":
    asyncio.run(main())
