"""Previews: a server in the sandbox reached through the preview proxy, against the same server reached
directly inside the sandbox (a client started there with a command, so no proxy and no channel).

Both sides run the same client, `CLIENT` below (http.client, one keep-alive connection, in a process
of its own): inside the sandbox against 127.0.0.1:8000, and on the host through the proxy.

* small GET: p50 of sequential `GET /` through `.../ports/8000/`, against the same loop inside the
  sandbox. Target: p50 overhead <= 2 ms.
* download: 100 MB from the sandbox's server through the proxy, against the same download inside
  the sandbox (read 64 KiB at a time); ROUNDS of each, alternating, medians compared. Target: >= 50%
  of direct.
* concurrency: 100 clients at once, 5 requests each (`CROWD`), through the proxy; its seconds beside
  the same crowd's inside the sandbox. Target: no errors.
* for reference, the floor of a relay on this host (`_splice_floor.py`): the same size through one
  and two bare blocking-splice relays, against no relay, on the host (no target of its own), and the
  proxy's download against the one-relay rate (a handed-over socket leaves one relay, the server's).

The server in the sandbox is `tests/previews/helpers.APP` (stdlib ThreadingHTTPServer, listening
with Werkzeug's backlog of 128: socketserver's 5 drops a crowd's connections, even from inside). Writes
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

from _common import Http, Row, backends, create_session, parse_args, percentile, report, server

OVERHEAD_MS, RATIO, CLIENTS = 2.0, 0.5, 100
ROUNDS = 5
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

CROWD = r"""
import asyncio, json, sys, time
clients, port, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
why, times = [], []

async def one():
    errors = done = 0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        why.append(repr(exc))
        return 5
    try:
        for _ in range(5):
            t = time.perf_counter()
            writer.write(f"GET {prefix}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            status, length = (await reader.readline()).split(b" ")[1], 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            times.append(time.perf_counter() - t)
            done += 1
            if status != b"200":
                errors += 1
                why.append(f"{status.decode()} {body[:200]!r}")
    except (OSError, IndexError, asyncio.IncompleteReadError) as exc:
        why.append(repr(exc))
        errors += 5 - done
    finally:
        writer.close()
    return errors

async def main():
    t = time.perf_counter()
    tasks = [asyncio.ensure_future(one()) for _ in range(clients)]
    finished, late = await asyncio.wait(tasks, timeout=120)
    for task in late:
        task.cancel()
        why.append("no answer within 120 s")
    errors = sum(task.result() for task in finished) + 5 * len(late)
    took = time.perf_counter() - t
    times.sort()
    p50 = times[len(times) // 2] if times else 0.0
    print(json.dumps({"errors": errors, "seconds": took, "p50": p50, "why": why[:5]}))

asyncio.run(main())
"""
"""`CLIENTS` keep-alive connections at once, 5 `GET /` each (asyncio, one process): the same client
in the sandbox and through the proxy. (httpx spends ~3 ms of its own CPU per request with 100
connections in its pool: its time, not the proxy's.)"""


async def shell(http: Http, sid: str, cmd: str, timeout: float = 300) -> str:
    status, body = await http.json("POST", f"/api/sessions/{sid}/shell", {"cmd": cmd, "timeout": timeout})
    assert status == 200, body
    output: str = body["output"]
    return output


async def in_a_process(client: str, *args: str) -> dict[str, Any]:
    """`client` run on the host, in a process of its own, against the proxy."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", client, *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


async def splice_floor(size: int) -> dict[str, float]:
    """Median MB/s through 0, 1 and 2 bare splice relays on the host (`_splice_floor.py`)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_splice_floor.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, script, str(ROUNDS), str(size), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    rates: dict[str, list[float]] = json.loads(out)
    return {hops: round(statistics.median(each) / 1e6, 1) for hops, each in rates.items()}


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
        for path, content in (("app.py", APP), ("client.py", CLIENT), ("crowd.py", CROWD)):
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
            ours = await in_a_process(CLIENT, str(gets), str(size), str(srv.port), prefix)
            assert ours["got"] == size == direct["got"], (ours["got"], direct["got"])
            direct_rates.append(direct["rate"])
            ours_rates.append(ours["rate"])
            if round_ == 0:
                direct_times, ours_times = direct["times"], ours["times"]
        crowd_direct = json.loads(await shell(http, sid, f"python3 crowd.py {CLIENTS} 8000 ''"))
        crowd = await in_a_process(CROWD, str(CLIENTS), str(srv.port), prefix)
        return {
            "ours_p50_ms": round(percentile(ours_times, 50) * 1000, 3),
            "direct_p50_ms": round(percentile(direct_times, 50) * 1000, 3),
            "ours_mb_s": round(statistics.median(ours_rates) / 1e6, 1),
            "direct_mb_s": round(statistics.median(direct_rates) / 1e6, 1),
            "ours_mb_s_each": [round(r / 1e6) for r in ours_rates],
            "direct_mb_s_each": [round(r / 1e6) for r in direct_rates],
            "errors": crowd["errors"],
            "concurrent_s": round(crowd["seconds"], 2),
            "concurrent_p50_ms": round(crowd["p50"] * 1000, 1),
            "direct_concurrent_s": round(crowd_direct["seconds"], 2),
            "direct_errors": crowd_direct["errors"],
            "errors_seen": crowd["why"],
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
        crowd = {"seconds": m["concurrent_s"], "direct_seconds": m["direct_concurrent_s"],
                 "p50_ms": m["concurrent_p50_ms"]}  # fmt: skip
        rows.append(Row(f"preview {CLIENTS} concurrent clients x 5 GETs: errors ({backend})", m["errors"],
                        "errors", "0", m["errors"] == 0, extra=crowd))  # fmt: skip
        extra[f"raw_{backend}"] = m
    floor = await splice_floor(size)
    rows.append(Row(f"one bare splice relay, {size >> 20} MB (the floor of one hop)", floor["1"], "MB/s",
                    "reference", None, floor["0"], "no relay, on the host"))  # fmt: skip
    rows.append(Row(f"two bare splice relays, {size >> 20} MB (the floor of two hops)", floor["2"], "MB/s",
                    "reference", None, floor["0"], "no relay, on the host"))  # fmt: skip
    for backend in [key.removeprefix("raw_") for key in extra]:
        ours = float(extra[f"raw_{backend}"]["ours_mb_s"])
        rows.append(Row(f"preview {size >> 20} MB download against one bare relay ({backend})", ours, "MB/s",
                        "reference", None, floor["1"], "one bare splice relay, on the host"))  # fmt: skip
    report("preview", rows, smoke=args.smoke, requests=n, download_bytes=size, **extra)


if __name__ == "__main__":
    asyncio.run(main())
