"""Our agent loop's overhead per model turn, against the raw openai client in the same run.

Both sides talk to the same scripted OpenAI-compatible server on 127.0.0.1 and receive the
same streamed answers (text in many chunks plus a tool call whose arguments are split):

* agent: `Agent.run` for N turns (stream, emit a TextDelta per piece, assemble tool calls,
  run a no-op tool, save after each step);
* raw:   the openai client sending the very request bodies the agent sent (recorded by the
  server), the same way (`client.post`, chunks as plain dicts), with no loop around it;
* raw_typed_chunks: the same bodies through `chat.completions.create`, which builds a typed
  `ChatCompletionChunk` per chunk (what the loop did before): the difference per chunk is the
  client-side CPU per chunk the loop no longer spends;
* raw_typed: the usual `create(messages=..., tools=...)` call, for reference.

(agent - raw) / N is what the loop adds per turn; the target is <= 3 ms. Without any network
(`_agent_context`), the loop's own CPU per turn continuing a 150k-token history (target
<= 1 ms) and one compaction of that history by shortening old outputs (target <= 20 ms).
Results go to bench/results/agent_turn.json. Usage: `python bench/bench_agent_turn.py [--smoke]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support when run as a script

from bench._agent_context import chunk_decode_us, compaction_ms, long_history, loop_cpu_per_turn
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI

from crogia.agent.host import ProcessView
from crogia.agent.loop import Agent
from crogia.events import Event
from crogia.sandbox.base import ExecResult
from crogia.workspace import Workspace

TARGET_MS = 3.0
TARGET_LONG_MS = 1.0
TARGET_COMPACT_MS = 20.0
RESULTS = Path(__file__).resolve().parent / "results" / "agent_turn.json"
TEXT = "I will look at the processes, then decide what to do next with this project. " * 3


class InstantHost:
    """A ToolHost whose tools return at once, so only the loop's own time is measured."""

    def __init__(self) -> None:
        self.workspace = Workspace(Path("/nonexistent"))

    async def run_shell(self, cmd: str, *, timeout: float | None = None) -> ExecResult:
        return ExecResult(0, "")

    async def start_process(self, cmd: str) -> ProcessView:
        return ProcessView(1, cmd, "running", "/tmp/log")

    async def stop_process(self, pid: int) -> ProcessView:
        return ProcessView(pid, "", "stopped", "/tmp/log")

    async def list_processes(self) -> list[ProcessView]:
        return []

    async def tail_log(self, pid: int, lines: int = 50) -> str:
        return ""


def script(turns: int) -> list[Reply]:
    """turns-1 answers with text and a tool call, then a final text answer."""
    call = Call("run_shell", {"cmd": "pytest -q tests/test_app.py", "timeout": 60}, pieces=6)
    working = Reply(TEXT, chunk_size=6, tool_calls=[call], usage=(1000, 60))
    return [working] * (turns - 1) + [Reply(TEXT, chunk_size=6, usage=(1000, 40))]


async def time_agent(server: ScriptedOpenAI, agent: Agent, turns: int) -> tuple[float, list[dict[str, Any]]]:
    async def emit(event: Event) -> None:
        pass

    async def save(messages: list[dict[str, Any]]) -> None:
        pass

    server.add(*script(turns))
    first = len(server.requests)
    started = time.perf_counter()
    outcome = await agent.run("fix the tests", [], InstantHost(), emit=emit, save=save)
    elapsed = time.perf_counter() - started
    assert outcome.turns == turns, outcome
    return elapsed, server.requests[first:]


async def time_raw(
    server: ScriptedOpenAI, client: openai.AsyncOpenAI, bodies: list[dict[str, Any]], side: str
) -> float:
    """Replay `bodies` with the bare client, the way `side` names (see the module docstring)."""
    server.add(*script(len(bodies)))
    started = time.perf_counter()
    for body in bodies:
        stream: Any
        if side == "raw":
            stream = await client.post(
                "/chat/completions",
                cast_to=object,
                body=body,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
        elif side == "raw_typed":
            stream = await client.chat.completions.create(**body)
        else:
            wire = {"messages": body["messages"], "tools": body["tools"]}
            rest = {k: v for k, v in body.items() if k not in wire}
            stream = await client.chat.completions.create(**(rest | {"messages": [], "extra_body": wire}))
        async for _ in stream:
            pass
    return time.perf_counter() - started


async def measure(turns: int, repeats: int) -> dict[str, Any]:
    async with ScriptedOpenAI() as server:
        agent = Agent(model="bench-model", api_key="bench", base_url=server.base_url, max_turns=turns)
        client = openai.AsyncOpenAI(api_key="bench", base_url=server.base_url, max_retries=0)
        try:
            _, bodies = await time_agent(server, agent, turns)  # warm-up: connections, imports
            await time_raw(server, client, bodies, "raw")
            runs: dict[str, list[float]] = {"agent": [], "raw": [], "raw_typed_chunks": [], "raw_typed": []}
            for n in range(repeats):
                # Rotate which side goes first so drift (load, caches) hits all alike.
                sides = list(runs)[n % 4 :] + list(runs)[: n % 4]
                for side in sides:
                    gc.collect()
                    if side == "agent":
                        elapsed, bodies = await time_agent(server, agent, turns)
                    else:
                        elapsed = await time_raw(server, client, bodies, side)
                    runs[side].append(elapsed / turns * 1000)
        finally:
            await agent.aclose()
            await client.close()
    overheads = [a - r for a, r in zip(runs["agent"], runs["raw"], strict=True)]
    overhead = statistics.median(overheads)
    median = {side: statistics.median(values) for side, values in runs.items()}
    chunks = -(-len(TEXT) // 6) + 6 + 3
    return {
        "turns": turns,
        "repeats": repeats,
        "chunks_per_turn": chunks,
        "client_us_per_chunk_dicts": round(median["raw"] / chunks * 1000, 1),
        "client_us_per_chunk_typed": round(median["raw_typed_chunks"] / chunks * 1000, 1),
        "saved_us_per_chunk": round((median["raw_typed_chunks"] - median["raw"]) / chunks * 1000, 1),
        "agent_ms_per_turn": round(median["agent"], 3),
        "raw_ms_per_turn": round(median["raw"], 3),
        "raw_typed_ms_per_turn": round(median["raw_typed"], 3),
        "raw_typed_chunks_ms_per_turn": round(median["raw_typed_chunks"], 3),
        "overhead_ms_per_turn": round(overhead, 3),
        "overhead_ms_per_turn_max": round(max(overheads), 3),
        "ratio_agent_to_raw": round(median["agent"] / median["raw"], 3),
        "ratio_agent_to_raw_typed": round(median["agent"] / median["raw_typed"], 3),
        "target_ms": TARGET_MS,
        "within_target": overhead <= TARGET_MS,
        "python": platform.python_version(),
        "openai": openai.__version__,
    }


async def measure_long(turns: int, repeats: int) -> dict[str, Any]:
    """The network-free figures: loop CPU per turn with an empty and a 150k-token history, compaction."""
    history = long_history()
    empty = [await loop_cpu_per_turn([], turns, TEXT, InstantHost()) for _ in range(repeats)]
    long = [await loop_cpu_per_turn(history, turns, TEXT, InstantHost()) for _ in range(repeats)]
    compactions = [await compaction_ms(history) for _ in range(repeats)]
    compact = statistics.median(c["compaction_ms"] for c in compactions)
    loop_long = statistics.median(long)
    return chunk_decode_us() | {
        "loop_cpu_ms_per_turn_empty_history": round(statistics.median(empty), 3),
        "loop_cpu_ms_per_turn_150k_history": round(loop_long, 3),
        "loop_target_ms": TARGET_LONG_MS,
        "loop_within_target": loop_long <= TARGET_LONG_MS,
        "compaction": compactions[0] | {"compaction_ms": round(compact, 3)},
        "compaction_target_ms": TARGET_COMPACT_MS,
        "compaction_within_target": compact <= TARGET_COMPACT_MS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a quick run (fewer turns and repeats)")
    args = parser.parse_args()
    turns, repeats = (10, 5) if args.smoke else (30, 15)
    result = asyncio.run(measure(turns, repeats)) | {"smoke": args.smoke}
    result |= asyncio.run(measure_long(turns, repeats))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "OK" if result["within_target"] else "OVER TARGET"
    print(
        f"agent {result['agent_ms_per_turn']:.2f} ms/turn, "
        f"raw client {result['raw_ms_per_turn']:.2f} ms/turn: "
        f"overhead {result['overhead_ms_per_turn']:.2f} ms/turn (target <= {TARGET_MS} ms): {verdict}"
    )
    print(
        f"raw client with typed messages= (the usual create call): "
        f"{result['raw_typed_ms_per_turn']:.2f} ms/turn "
        f"(agent/raw_typed = {result['ratio_agent_to_raw_typed']:.2f})"
    )
    print(
        "time per chunk (wall, scripted server in-process): "
        f"{result['client_us_per_chunk_dicts']:.1f} us as dicts, "
        f"{result['client_us_per_chunk_typed']:.1f} us typed ({result['saved_us_per_chunk']:.1f} us saved)"
    )
    print(
        f"client CPU per chunk, no network: {result['chunk_cpu_us_dicts']:.1f} us as dicts, "
        f"{result['chunk_cpu_us_typed']:.1f} us as typed ChatCompletionChunk"
    )
    print(
        f"loop CPU per turn: {result['loop_cpu_ms_per_turn_empty_history']:.3f} ms (empty history), "
        f"{result['loop_cpu_ms_per_turn_150k_history']:.3f} ms (150k tokens; target <= {TARGET_LONG_MS} ms)"
    )
    compaction = result["compaction"]
    print(
        f"compaction of {compaction['history_chars']:,} chars: {compaction['compaction_ms']:.2f} ms "
        f"({compaction['tokens_before']:,} -> {compaction['tokens_after']:,} tokens; "
        f"target <= {TARGET_COMPACT_MS} ms)"
    )
    print(f"wrote {RESULTS}")
    met = result["within_target"] and result["loop_within_target"] and result["compaction_within_target"]
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
