"""grep over ~200 MB / 20,000 files through the API, against raw ripgrep on the same tree, same run.

* rg: `rg -n --no-require-git PATTERN .` in the session's workspace, stdout read through a pipe;
* ours: `POST /api/sessions/{id}/search/grep {"pattern": PATTERN}` to a `crogia serve` process:
  ripgrep under confinement, parsing, the JSON response and its transfer.

The tree is bench_grep.py's (built once under /tmp and reused) hard-linked into the workspace. One
warm-up round, then interleaved rounds; medians are compared. Target: ours <= 1.2x rg.
Writes bench/results/grep_api.json. Usage: `python bench/bench_grep_api.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import Http, Row, create_session, parse_args, report, run_quiet, server
from bench_grep import CACHE, FULL, PATTERN, SMOKE, build_tree, tree_size
from crogia.workspace.ripgrep import locate_rg

TARGET_RATIO = 1.2


async def rg(binary: str, folder: Path) -> tuple[float, int]:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        binary, "-n", "--no-require-git", PATTERN, ".", cwd=folder, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return time.perf_counter() - started, out.count(b"\n")


async def ours(http: Http, sid: str) -> tuple[float, int]:
    body = json.dumps({"pattern": PATTERN, "max_results": 100_000}).encode()
    started = time.perf_counter()
    status, data = await http.request("POST", f"/api/sessions/{sid}/search/grep", body)
    elapsed = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"grep failed: {status} {data[:300]!r}")
    result = json.loads(data)
    if result.get("truncated"):
        raise RuntimeError("grep result truncated")
    return elapsed, len(result["matches"])


async def measure(tree: Path, runs: int) -> dict[str, Any]:
    binary = locate_rg()
    if binary is None:
        raise SystemExit("rg not found")
    times: dict[str, list[float]] = {"rg": [], "ours": []}
    counts: dict[str, int] = {}
    async with server("bubblewrap") as srv, Http(srv.port) as http:
        session = await create_session(http, task="bench grep")
        workspace = Path(session["workdir"])
        if await run_quiet("cp", "-al", f"{tree}/.", str(workspace)) != 0:  # hard links: instant
            raise RuntimeError("could not link the tree into the workspace")
        for attempt in range(runs + 1):  # the first round only warms caches
            for side in ("rg", "ours"):
                elapsed, counts[side] = await (
                    rg(binary, workspace) if side == "rg" else ours(http, session["session_id"])
                )
                if attempt:
                    times[side].append(elapsed)
    if counts["rg"] != counts["ours"]:
        raise SystemExit(f"match counts differ: {counts}")
    return {
        "median_ms": {side: round(statistics.median(t) * 1000, 2) for side, t in times.items()},
        "min_ms": {side: round(min(t) * 1000, 2) for side, t in times.items()},
        "matches": counts["rg"],
    }


async def main() -> None:
    args = parse_args(__doc__)
    shape, name = (SMOKE, "smoke") if args.smoke else (FULL, "full")
    runs = 3 if args.smoke else 15
    tree = CACHE / name
    started = time.perf_counter()
    await asyncio.to_thread(build_tree, tree, shape)
    print(f"tree ready in {time.perf_counter() - started:.1f}s: {tree}", file=sys.stderr)
    files, size = tree_size(tree)
    measured = await measure(tree, runs)
    medians = measured["median_ms"]
    ratio = medians["ours"] / medians["rg"]
    row = Row(
        f"grep {size / 1e6:.0f} MB / {files:,} files via the API",
        medians["ours"],
        "ms",
        f"<= {TARGET_RATIO:g}x rg",
        ratio <= TARGET_RATIO,
        baseline=medians["rg"],
        baseline_what="rg",
        extra={"matches": measured["matches"], "min_ms": measured["min_ms"]},
    )
    report("grep_api", [row], smoke=args.smoke, tree={"files": files, "bytes": size}, runs=runs, **measured)


if __name__ == "__main__":
    asyncio.run(main())
