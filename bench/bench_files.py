"""Files served by the sandbox's daemon (SANDBOX_FILES=daemon) against the host path, in the same run.

`crogia serve` processes on bubblewrap, one with SANDBOX_FILES=host and one with daemon (and, for
grep, a second daemon one whose sandbox has the host's cores), one session each, driven through the
REST API (one keep-alive connection each):

* 1 MiB write and read: `PUT` then `GET /files/raw` of a 1 MiB file, interleaved rounds; medians,
  daemon / host (target <= 2x);
* 200 MB upload and download through the daemon: the median of BIG_ROUNDS, MB/s (target >= 200
  MB/s), with the server's peak RSS growth over the transfers (bounded memory: a stream holds at
  most its 4 MiB window);
* grep of bench_grep.py's tree (~200 MB / 20,000 files) through the API with the daemon serving,
  against raw rg on the host in the same workspace (target <= 1.3x rg). rg spreads over every core
  and the host path runs it on the host, so the target row's sandbox gets the host's cores
  (SANDBOX_CPUS = os.cpu_count()): like against like. The default sandbox (SANDBOX_CPUS=1) and the
  host path are reference rows: the first measures the CPU limit, not the path.

Writes bench/results/files.json. Usage: `python bench/bench_files.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _common import Http, Row, create_session, parse_args, report, run_quiet, server
from bench_grep import CACHE, FULL, SMOKE, build_tree, tree_size
from bench_grep_api import ours as grep_api
from bench_grep_api import rg
from crogia.workspace.ripgrep import locate_rg

SMALL = 1 << 20
SMALL_RATIO = 2.0
BIG_RATE = 200.0
GREP_RATIO = 1.3
BIG_ROUNDS = 3
CORES = os.cpu_count() or 1


async def files_level(big: int) -> dict[str, float]:
    """200 MB through `Files` itself (no HTTP): DaemonFiles to the real daemon run on the host, and
    HostFiles, on one folder; MB/s each way and both processes' peak RSS growth."""
    from tests.support.local_daemon import daemon_files, local_daemon

    from crogia.workspace import HostFiles

    piece = b"\x5a" * (1 << 20)

    async def source() -> AsyncIterator[bytes]:
        for _ in range(big // len(piece)):
            yield piece

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cgb-files-") as folder:
        root, logs = Path(folder) / "ws", Path(folder) / "logs"
        root.mkdir()
        logs.mkdir()
        async with local_daemon(root, logs) as daemon:
            for side, files in (("host", HostFiles(root)), ("daemon", daemon_files(daemon))):
                before = (peak_rss_mb(os.getpid()), peak_rss_mb(daemon.process.pid))
                started = time.perf_counter()
                size = await files.upload("big.bin", source(), max_bytes=big)
                out[f"{side}_up"] = size / 1e6 / (time.perf_counter() - started)
                started = time.perf_counter()
                total, chunks = await files.download("big.bin")
                async for chunk in chunks:
                    total -= len(chunk)
                if total:
                    raise RuntimeError("download came short")
                out[f"{side}_down"] = size / 1e6 / (time.perf_counter() - started)
                out[f"{side}_server_rss"] = peak_rss_mb(os.getpid()) - before[0]
                out[f"{side}_daemon_rss"] = peak_rss_mb(daemon.process.pid) - before[1]
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def put(http: Http, sid: str, path: str, data: bytes) -> float:
    started = time.perf_counter()
    status, body = await http.request("PUT", f"/api/sessions/{sid}/files/raw?path={path}", data)
    if status != 200:
        raise RuntimeError(f"upload to {sid} failed: {status} {body[:300]!r}")
    return time.perf_counter() - started


async def get(http: Http, sid: str, path: str, size: int) -> float:
    started = time.perf_counter()
    status, body = await http.request("GET", f"/api/sessions/{sid}/files/raw?path={path}")
    if status != 200 or len(body) != size:
        raise RuntimeError(f"download failed: {status} {len(body)} bytes")
    return time.perf_counter() - started


async def main() -> None:
    args = parse_args(__doc__)
    shape, name = (SMOKE, "smoke") if args.smoke else (FULL, "full")
    runs, big = (5, 20 << 20) if args.smoke else (30, 200 * 10**6)
    tree = CACHE / name
    await asyncio.to_thread(build_tree, tree, shape)
    files, tree_bytes = tree_size(tree)
    binary = locate_rg()
    if binary is None:
        raise SystemExit("rg not found")
    small = bytes(range(256)) * (SMALL // 256)
    times: dict[str, list[float]] = {k: [] for k in ("host_w", "host_r", "daemon_w", "daemon_r")}
    grep_times: dict[str, list[float]] = {"rg": [], "host": [], "daemon": [], "daemon_cores": []}
    counts: dict[str, int] = {}
    async with (
        server("bubblewrap", env={"SANDBOX_FILES": "host"}) as host_srv,
        server(
            "bubblewrap", env={"SANDBOX_FILES": "daemon", "REQUEST_MAX_BYTES": str(1 << 30)}
        ) as daemon_srv,
        server("bubblewrap", env={"SANDBOX_FILES": "daemon", "SANDBOX_CPUS": str(CORES)}) as cores_srv,
        Http(host_srv.port) as host_http,
        Http(daemon_srv.port) as daemon_http,
        Http(cores_srv.port) as cores_http,
    ):
        sides = {"host": host_http, "daemon": daemon_http}
        sids: dict[str, str] = {}
        for side, http in {**sides, "daemon_cores": cores_http}.items():
            session = await create_session(http, task="bench files")
            sids[side] = session["session_id"]
            # A subfolder: copying onto `.` would give the workspace the tree's owner (not the sandbox's).
            if await run_quiet("cp", "-al", str(tree), f"{session['workdir']}/tree") != 0:
                raise RuntimeError("could not link the tree into the workspace")
        workdir = Path((await daemon_http.json("GET", f"/api/sessions/{sids['daemon']}"))[1]["workdir"])
        for attempt in range(runs + 1):  # the first round only warms up
            for side, http in sides.items():
                wrote = await put(http, sids[side], "one.bin", small)
                read = await get(http, sids[side], "one.bin", len(small))
                if attempt:
                    times[f"{side}_w"].append(wrote)
                    times[f"{side}_r"].append(read)
        blob = b"\x5a" * big
        before = peak_rss_mb(daemon_srv.pid)
        ups, downs = [], []
        for _ in range(1 if args.smoke else BIG_ROUNDS):
            ups.append(await put(daemon_http, sids["daemon"], "big.bin", blob))
            downs.append(await get(daemon_http, sids["daemon"], "big.bin", big))
        up, down = statistics.median(ups), statistics.median(downs)
        grown = peak_rss_mb(daemon_srv.pid) - before
        del blob
        await daemon_http.request("DELETE", f"/api/sessions/{sids['daemon']}/files?path=big.bin")
        grep_runs = 3 if args.smoke else 7
        # Fresh connections: the host side's sat idle through the big transfers (keep-alive ended).
        async with (
            Http(host_srv.port) as host_grep,
            Http(daemon_srv.port) as daemon_grep,
            Http(cores_srv.port) as cores_grep,
        ):
            greppers = {"host": host_grep, "daemon": daemon_grep, "daemon_cores": cores_grep}
            for attempt in range(grep_runs + 1):
                for side in ("rg", "host", "daemon", "daemon_cores"):
                    if side == "rg":
                        elapsed, counts[side] = await rg(binary, workdir)
                    else:
                        elapsed, counts[side] = await grep_api(greppers[side], sids[side])
                    if attempt:
                        grep_times[side].append(elapsed)
    level = await files_level(big)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"grep match counts differ: {counts}")
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    gmed = {k: statistics.median(v) * 1000 for k, v in grep_times.items()}
    rows = [
        Row(
            "write 1 MiB (PUT /files/raw), daemon",
            round(med["daemon_w"], 2),
            "ms",
            f"<= {SMALL_RATIO:g}x host",
            med["daemon_w"] <= SMALL_RATIO * med["host_w"],
            baseline=round(med["host_w"], 2),
            baseline_what="host",
        ),
        Row(
            "read 1 MiB (GET /files/raw), daemon",
            round(med["daemon_r"], 2),
            "ms",
            f"<= {SMALL_RATIO:g}x host",
            med["daemon_r"] <= SMALL_RATIO * med["host_r"],
            baseline=round(med["host_r"], 2),
            baseline_what="host",
        ),
        Row(
            f"upload {big / 1e6:.0f} MB, daemon",
            round(big / 1e6 / up, 1),
            "MB/s",
            f">= {BIG_RATE:g} MB/s",
            big / 1e6 / up >= BIG_RATE,
            extra={
                "server_peak_rss_growth_mb": round(grown, 1),
                "each_mb_s": [round(big / 1e6 / t) for t in ups],
            },
        ),
        Row(
            f"download {big / 1e6:.0f} MB, daemon",
            round(big / 1e6 / down, 1),
            "MB/s",
            f">= {BIG_RATE:g} MB/s",
            big / 1e6 / down >= BIG_RATE,
            extra={"each_mb_s": [round(big / 1e6 / t) for t in downs]},
        ),
        Row(
            f"grep {tree_bytes / 1e6:.0f} MB / {files:,} files via the API, daemon, SANDBOX_CPUS={CORES}",
            round(gmed["daemon_cores"], 2),
            "ms",
            f"<= {GREP_RATIO:g}x rg",
            gmed["daemon_cores"] <= GREP_RATIO * gmed["rg"],
            baseline=round(gmed["rg"], 2),
            baseline_what=f"host rg ({CORES} cores)",
        ),
        Row(
            "grep via the API, daemon, SANDBOX_CPUS=1 (the default limit; reference)",
            round(gmed["daemon"], 2),
            "ms",
            "-",
            None,
            baseline=round(gmed["rg"], 2),
            baseline_what=f"host rg ({CORES} cores)",
        ),
        Row(
            "grep via the API, host path (reference)",
            round(gmed["host"], 2),
            "ms",
            "-",
            None,
            baseline=round(gmed["rg"], 2),
            baseline_what="host rg",
        ),
    ]
    rows[4:4] = [
        Row(
            f"upload {big / 1e6:.0f} MB through Files, daemon (no HTTP)",
            round(level["daemon_up"], 1),
            "MB/s",
            f">= {BIG_RATE:g} MB/s",
            level["daemon_up"] >= BIG_RATE,
            baseline=round(level["host_up"], 1),
            baseline_what="HostFiles",
            extra={k: round(v, 1) for k, v in level.items() if k.endswith("rss")},
        ),
        Row(
            f"download {big / 1e6:.0f} MB through Files, daemon (no HTTP)",
            round(level["daemon_down"], 1),
            "MB/s",
            f">= {BIG_RATE:g} MB/s",
            level["daemon_down"] >= BIG_RATE,
            baseline=round(level["host_down"], 1),
            baseline_what="HostFiles",
        ),
    ]
    print(f"Files level: {json.dumps({k: round(v, 1) for k, v in level.items()})}", file=sys.stderr)
    print(f"server peak RSS growth over the 200 MB transfers: {grown:.1f} MB", file=sys.stderr)
    extra: dict[str, Any] = {
        "runs": runs,
        "matches": counts["rg"],
        "server_peak_rss_growth_mb": round(grown, 1),
    }
    report("files", rows, smoke=args.smoke, tree={"files": files, "bytes": tree_bytes}, **extra)
    print(json.dumps({"grep_ms": gmed, "small_ms": med}), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
