"""Workspace.grep against raw ripgrep on a ~200 MB, 20,000-file tree, in the same run.

* rg:   `rg -n --no-require-git PATTERN .` in the tree, stdout read through a pipe (the same
  ignore semantics as ours: .gitignore honoured without a git repository, hidden files skipped);
* ours: `Workspace.grep(PATTERN)` on the same tree, max_results above the match count, with rg
  confined by Landlock (the default where the kernel has it);
* ours_unconfined: the same without Landlock (results re-checked through the safe walk instead),
  what kernels without Landlock get;
* grep: `grep -rn PATTERN .`, for reference.

Each is run once to warm the page cache, then N times interleaved; medians are compared.
Target: ours <= 1.2x rg. The tree is generated once (deterministic) under /tmp and reused;
`--clean` removes it. `--smoke` uses a tiny tree and few runs. Results are printed as a
markdown table and written to bench/results/grep.json.
Usage: `python bench/bench_grep.py [--smoke] [--runs N] [--clean]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from crogia.workspace import Ripgrep, Workspace
from crogia.workspace.ripgrep import locate_rg

TARGET_RATIO = 1.2
CACHE = Path("/tmp/crogia-bench-grep")
RESULTS = Path(__file__).resolve().parent / "results" / "grep.json"
PATTERN = r"process_[a-z]+_event\("
FULL = {"dirs": 200, "files_per_dir": 100, "file_bytes": 10_000}  # 20,000 files, ~200 MB
SMOKE = {"dirs": 10, "files_per_dir": 20, "file_bytes": 4_000}
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "value",
    "result",
    "config",
    "handler",
    "request",
    "buffer",
    "index",
    "token",
]


def _line_pool(rng: random.Random) -> list[str]:
    """Code-like lines; about 1 in 4,000 calls a `process_*_event(` function (the matches)."""
    pool = []
    for i in range(8_000):
        words = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
        pool.append(f"    {words} = compute_{i % 97}({rng.randint(0, 10**6)})  # {words}\n")
    for name in ("start", "stop", "retry"):
        pool[rng.randrange(len(pool))] = f"    process_{name}_event(queue, item)\n"
    return pool


def build_tree(folder: Path, shape: dict[str, int]) -> None:
    """Write the deterministic tree (idempotent: a marker records completion)."""
    marker = folder.with_suffix(".complete")
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(20_000)
    pool = _line_pool(rng)
    per_file = max(1, shape["file_bytes"] * len(pool) // sum(map(len, pool)))
    for d in range(shape["dirs"]):
        sub = folder / f"pkg{d // 20:02}" / f"mod{d:03}"
        sub.mkdir(parents=True)
        for f in range(shape["files_per_dir"]):
            (sub / f"file{f:03}.py").write_text("".join(rng.choices(pool, k=per_file)))
    marker.write_text("ok\n")


def tree_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run_command(argv: list[str], cwd: Path) -> tuple[float, int]:
    """Wall time of a command whose stdout is read through a pipe; returns (seconds, lines)."""
    started = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, check=False).stdout
    return time.perf_counter() - started, out.count(b"\n")


async def run_workspace(ws: Workspace) -> tuple[float, int]:
    started = time.perf_counter()
    result = await ws.grep(PATTERN, max_results=10_000_000)
    elapsed = time.perf_counter() - started
    assert not result.truncated
    return elapsed, len(result.matches)


async def measure(folder: Path, runs: int) -> dict[str, Any]:
    rg = locate_rg()
    if rg is None:
        raise SystemExit("rg not found")
    spaces = {
        "ours": Workspace(folder, ripgrep=Ripgrep(confine=True)),
        "ours_unconfined": Workspace(folder, ripgrep=Ripgrep(confine=False)),
    }
    commands = {
        "rg": [rg, "-n", "--no-require-git", PATTERN, "."],
        "grep": ["grep", "-rnE", PATTERN.replace("\\(", "[(]"), "."],
    }
    times: dict[str, list[float]] = {"rg": [], "ours": [], "ours_unconfined": [], "grep": []}
    # Interleaved rounds, so load from elsewhere on the machine hits every command alike.
    counts: dict[str, int] = {}
    for attempt in range(runs + 1):  # the first round only warms caches
        for name in times:
            if name in spaces:
                elapsed, count = await run_workspace(spaces[name])
            else:
                elapsed, count = run_command(commands[name], folder)
            counts[name] = count
            if attempt:
                times[name].append(elapsed)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"match counts differ: {counts}")
    return {
        "median_ms": {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()},
        "min_ms": {name: round(min(t) * 1000, 2) for name, t in times.items()},
        "matches": counts["rg"],
        "landlock": spaces["ours"].ripgrep.confined,
        "rg": rg,
    }


def report(measured: dict[str, Any], files: int, size: int, runs: int, smoke: bool) -> dict[str, Any]:
    medians = measured["median_ms"]
    ratio = medians["ours"] / medians["rg"]
    met = ratio <= TARGET_RATIO
    print(f"\ngrep benchmark: {files} files, {size / 1e6:.0f} MB, pattern {PATTERN!r}, "
          f"{measured['matches']} matches, median of {runs} runs\n")  # fmt: skip
    print("| command | median ms | vs rg | min ms |\n| --- | ---: | ---: | ---: |")
    labels = {
        "rg": "rg -n (raw)",
        "ours": "Workspace.grep (Landlock)",
        "ours_unconfined": "Workspace.grep (no Landlock, re-checked)",
        "grep": "grep -rn",
    }
    for name, label in labels.items():
        ratio_text = f"{medians[name] / medians['rg']:.2f}x"
        print(f"| {label} | {medians[name]:.1f} | {ratio_text} | {measured['min_ms'][name]:.1f} |")
    print(f"\ntarget ours <= {TARGET_RATIO}x rg: {'met' if met else 'NOT met'} ({ratio:.2f}x on medians)")
    return {
        "benchmark": "grep",
        "smoke": smoke,
        "tree": {"files": files, "bytes": size},
        "pattern": PATTERN,
        "runs": runs,
        **measured,
        "ratio_ours_vs_rg": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny tree, few runs")
    parser.add_argument("--runs", type=int, default=None, help="measured runs per command")
    parser.add_argument("--clean", action="store_true", help="remove the cached trees and exit")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(CACHE, ignore_errors=True)
        print(f"removed {CACHE}")
        return
    shape, name = (SMOKE, "smoke") if args.smoke else (FULL, "full")
    runs = args.runs or (3 if args.smoke else 15)
    folder = CACHE / name
    started = time.perf_counter()
    build_tree(folder, shape)
    print(f"tree ready in {time.perf_counter() - started:.1f}s: {folder}", file=sys.stderr)
    files, size = tree_size(folder)
    result = report(asyncio.run(measure(folder, runs)), files, size, runs, args.smoke)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
