"""Several tool calls in one turn: read-only ones run together, the rest in order, results in order."""

from __future__ import annotations

import asyncio

from crogia.agent.conversation import CANCELLED
from crogia.agent.guards import batches
from crogia.agent.host import ProcessView
from crogia.agent.stream import ToolCallRequest
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI


class GatedHost(LocalToolHost):
    """`list_processes` returns only once `width` calls are inside it at the same time."""

    width = 3
    hold = False
    """Never return (for cancel tests)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inside = 0
        self.all_in = asyncio.Event()
        self.order: list[str] = []

    async def list_processes(self) -> list[ProcessView]:
        self.inside += 1
        if self.inside == self.width:
            self.all_in.set()
        # Run one after the other, the first call would wait here for the others forever.
        await asyncio.wait_for(self.all_in.wait(), 10)
        if self.hold:
            await asyncio.Event().wait()
        return []


def test_batches_group_consecutive_read_only_calls() -> None:
    names = ["read_file", "grep", "run_shell", "list_directory", "tail_log", "write_file", "read_file"]
    calls = [ToolCallRequest(str(n), name, "{}") for n, name in enumerate(names)]
    assert [[c.name for c in b] for b in batches(calls)] == [
        ["read_file", "grep"],
        ["run_shell"],
        ["list_directory", "tail_log"],
        ["write_file"],
        ["read_file"],
    ]


async def test_read_only_calls_run_together_and_report_in_call_order(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    gated = GatedHost(host.workspace, host.log_dir)
    (host.workspace.root / "a.txt").write_text("A\n")
    calls = [Call("list_processes", {}, id=f"p{n}") for n in range(3)]
    scripted.add(
        Reply(
            tool_calls=[
                *calls,
                Call("run_shell", {"cmd": "echo shell"}, id="s"),
                Call("read_file", {"path": "a.txt"}, id="r"),
            ]
        ),
        Reply("done"),
    )
    outcome = await run_task(make_agent(), "go", gated, recorder)

    assert outcome.final_text == "done" and outcome.tool_calls == 5
    completes = recorder.of_type("tool_complete")
    assert [c.call_id for c in completes] == ["p0", "p1", "p2", "s", "r"]
    assert not any(c.is_error for c in completes)
    kinds = [(e.type, e.call_id) for e in recorder.events if e.type in ("tool_call", "tool_complete")]
    ids = ["p0", "p1", "p2"]
    assert kinds[:6] == [*(("tool_call", i) for i in ids), *(("tool_complete", i) for i in ids)]
    tool_ids = [m["tool_call_id"] for m in scripted.messages(1) if m["role"] == "tool"]
    assert tool_ids == ["p0", "p1", "p2", "s", "r"]
    assert_valid_conversation(recorder.conversation)


async def test_a_cancel_stops_every_call_of_the_batch(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    gated = GatedHost(host.workspace, host.log_dir)
    gated.width, gated.hold = 2, True
    scripted.add(Reply(tool_calls=[Call("list_processes", {}, id="a"), Call("list_processes", {}, id="b")]))
    run = asyncio.create_task(run_task(make_agent(), "go", gated, recorder))
    await asyncio.wait_for(gated.all_in.wait(), 10)
    run.cancel()
    try:
        await run
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the run was not cancelled")

    completes = recorder.of_type("tool_complete")
    assert [(c.call_id, c.output, c.is_error) for c in completes] == [
        ("a", CANCELLED, True),
        ("b", CANCELLED, True),
    ]
    assert_valid_conversation(recorder.conversation)
    assert [m["content"] for m in recorder.conversation if m["role"] == "tool"] == [CANCELLED, CANCELLED]
