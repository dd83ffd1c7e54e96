"""Run every benchmark, then write bench/results/RESULTS.md (one table) and results.png (a plot).

Each script runs as its own process (`--smoke` is passed through) and writes its JSON; this script
only gathers them. The exit code says whether the scripts ran, never whether targets were met: it
is non-zero only when a script crashed (wrote no fresh results). Usage: `python bench/run_all.py
[--smoke] [--only NAME ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# (script, results file): the order of the table.
SCRIPTS = [
    ("bench_shell.py", "shell.json"),
    ("bench_throughput.py", "throughput.json"),
    ("bench_create.py", "create.json"),
    ("bench_grep.py", "grep.json"),
    ("bench_grep_api.py", "grep_api.json"),
    ("bench_files.py", "files.json"),
    ("bench_ws.py", "ws.json"),
    ("bench_terminal.py", "terminal.json"),
    ("bench_preview.py", "preview.json"),
    ("bench_agent_turn.py", "agent_turn.json"),
    ("bench_memory.py", "memory.json"),
]
TIMEOUT = {False: 1800, True: 600}


def run(script: str, smoke: bool) -> tuple[float, int]:
    argv = [sys.executable, str(HERE / script), *(["--smoke"] if smoke else [])]
    print(f"\n=== {script}{' --smoke' if smoke else ''}", flush=True)
    started = time.monotonic()
    try:
        code = subprocess.run(argv, cwd=HERE.parent, timeout=TIMEOUT[smoke], check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"{script}: timed out after {TIMEOUT[smoke]} s", flush=True)
        code = -1
    return time.monotonic() - started, code


def rows_of(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in the common shape; the two older scripts write their own JSON shapes."""
    if "rows" in data:
        return list(data["rows"])
    if name == "grep.json":
        medians = data["median_ms"]
        ours = medians.get("ours", medians.get("workspace"))
        tree = f"{data['tree']['bytes'] / 1e6:.0f} MB / {data['tree']['files']:,} files"
        return [
            {
                "what": f"grep {tree} (Workspace.grep)",
                "ours": ours,
                "unit": "ms",
                "baseline": medians["rg"],
                "baseline_what": "rg",
                "ratio": data.get("ratio_ours_vs_rg", round(ours / medians["rg"], 3)),
                "target": f"<= {data.get('target_ratio', 1.2):g}x rg",
                "met": data.get("target_met"),
            }
        ]
    if name == "agent_turn.json":
        return [
            {
                "what": "our overhead per model turn",
                "ours": data["overhead_ms_per_turn"],
                "unit": "ms",
                "baseline": data["raw_ms_per_turn"],
                "baseline_what": "raw openai client, per turn",
                "ratio": data.get("ratio_agent_to_raw"),
                "target": f"<= {data['target_ms']:g} ms",
                "met": data["within_target"],
            },
            *_agent_context_rows(data),
        ]
    return []


def _agent_context_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    if "loop_cpu_ms_per_turn_150k_history" not in data:
        return []
    compaction = data["compaction"]
    return [
        {
            "what": "loop CPU per turn, 150k-token history",
            "ours": data["loop_cpu_ms_per_turn_150k_history"],
            "unit": "ms",
            "baseline": data["loop_cpu_ms_per_turn_empty_history"],
            "baseline_what": "the same with an empty history",
            "ratio": None,
            "target": f"<= {data['loop_target_ms']:g} ms",
            "met": data["loop_within_target"],
        },
        {
            "what": f"compaction of {compaction['history_estimated_tokens']:,} tokens (no summary call)",
            "ours": compaction["compaction_ms"],
            "unit": "ms",
            "baseline": None,
            "baseline_what": "",
            "ratio": None,
            "target": f"<= {data['compaction_target_ms']:g} ms",
            "met": data["compaction_within_target"],
        },
        {
            "what": "client CPU per streamed chunk (plain dicts)",
            "ours": data["chunk_cpu_us_dicts"],
            "unit": "us",
            "baseline": data["chunk_cpu_us_typed"],
            "baseline_what": "typed ChatCompletionChunk per chunk",
            "ratio": round(data["chunk_cpu_us_dicts"] / data["chunk_cpu_us_typed"], 3),
            "target": "< baseline",
            "met": data["chunk_cpu_us_dicts"] < data["chunk_cpu_us_typed"],
        },
    ]


def cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def markdown(rows: list[dict[str, Any]], smoke: bool, failed: list[str]) -> str:
    lines = [
        "# Benchmark results" + (" (smoke run: tiny sizes, numbers mean nothing)" if smoke else ""),
        "",
        f"Written by `bench/run_all.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs. Every baseline was measured in the same run; ratio = ours / baseline.",
        "",
        "| what | ours | baseline | ratio | target | met |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        base = row.get("baseline")
        baseline = f"{cell(base, row['unit'])} ({row.get('baseline_what', '')})" if base is not None else "-"
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[row.get("met")]
        ours = cell(row["ours"], row["unit"])
        lines.append(f"| {row['what']} | {ours} | {baseline} | {ratio} | {row['target']} | {met} |")
    if failed:
        lines += ["", "Did not run to the end: " + ", ".join(failed)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One bar per row: ours relative to the baseline (log scale); green where the target is met."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.get("ratio")]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(shown) + 1.5))
    colors = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    labels = [row["what"] for row in shown]
    ax.barh(labels, [row["ratio"] for row in shown], color=[colors[row.get("met")] for row in shown])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ours / raw baseline (log scale; for rates, higher is better; for times, lower)")
    ax.set_title("Crogia against raw baselines (green: target met, red: not met, gray: reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: proves each script runs")
    parser.add_argument("--only", nargs="*", help="script names to run (default: all)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    durations: dict[str, float] = {}
    for script, result in SCRIPTS:
        if args.only and script not in args.only and script.removesuffix(".py") not in args.only:
            continue
        started = time.time()
        durations[script], code = run(script, args.smoke)
        path = RESULTS / result
        fresh = path.exists() and path.stat().st_mtime >= started
        if not fresh:
            print(f"{script}: exited with {code} and wrote no results", flush=True)
            failed.append(script)
            continue
        rows += rows_of(result, json.loads(path.read_text()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "RESULTS.md").write_text(markdown(rows, args.smoke, failed))
    plot(rows, RESULTS / "results.png")
    print("\n" + (RESULTS / "RESULTS.md").read_text())
    print("durations: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in durations.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
