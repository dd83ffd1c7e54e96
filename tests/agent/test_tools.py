"""The tools one by one: what the model gets back for good and bad calls."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from crogia.agent.tools import Toolbox, default_toolbox
from crogia.sandbox.base import ExecResult
from tests.agent.local_host import LocalToolHost


async def call(host: Any, name: str, box: Toolbox | None = None, **args: Any) -> tuple[str, bool]:
    result = await (box or default_toolbox()).call(host, name, json.dumps(args))
    return result.output, result.is_error


def test_schemas_declare_the_api_parameters() -> None:
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in default_toolbox().schemas}
    assert schemas["read_file"]["required"] == ["path"]
    assert set(schemas["read_file"]["properties"]) == {"path", "start_line", "end_line"}
    assert schemas["edit_file"]["required"] == ["path", "old_text", "new_text"]
    assert set(schemas["grep"]["properties"]) == {"pattern", "path", "file_types"}
    assert schemas["run_shell"]["properties"]["timeout"]["type"] == "number"
    assert schemas["tail_log"]["required"] == ["pid"]
    assert schemas["list_processes"] == {
        "type": "object",
        "properties": {},
        "required": [],
        "additionalProperties": False,
    }


async def test_read_file_whole_and_ranges(host: LocalToolHost) -> None:
    (host.root / "f.txt").write_text("".join(f"line {n}\n" for n in range(1, 11)))
    whole, _ = await call(host, "read_file", path="f.txt")
    assert whole.startswith("line 1\nline 2\n")
    ranged, _ = await call(host, "read_file", path="f.txt", start_line=3, end_line=4)
    assert ranged == "     3\tline 3\n     4\tline 4"
    tail, _ = await call(host, "read_file", path="f.txt", start_line=9.0)  # integral floats are fine
    assert tail == "     9\tline 9\n    10\tline 10"
    past, is_error = await call(host, "read_file", path="f.txt", start_line=11)
    assert is_error
    assert "has 10 lines" in past
    backwards, is_error = await call(host, "read_file", path="f.txt", start_line=5, end_line=2)
    assert is_error
    assert "end_line >= start_line" in backwards


async def test_a_big_file_is_cut_at_a_line_with_a_way_to_read_on(host: LocalToolHost) -> None:
    (host.root / "big.txt").write_text("".join(f"row {n:04}\n" for n in range(1000)))
    box = Toolbox(default_toolbox().tools.values(), max_output=1024)
    output, is_error = await call(host, "read_file", box, path="big.txt")
    assert not is_error
    assert len(output.encode()) <= 1024
    shown = output.count("row ")
    assert f"showing lines 1-{shown} of 1000" in output
    assert f"start_line={shown + 1}" in output


async def test_listing_and_searching(host: LocalToolHost) -> None:
    (host.root / "src").mkdir()
    (host.root / "src/app.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    (host.root / "README.md").write_text("A Flask app\n")
    listing, _ = await call(host, "list_directory")
    assert listing == "src/\tdirectory\nREADME.md\tfile\t12 bytes"
    found, _ = await call(host, "search_files", pattern="*.py")
    assert found == "src/app.py"
    lines, _ = await call(host, "grep", pattern="Flask\\(", file_types="*.py")
    assert lines == "src/app.py:2: app = Flask(__name__)"
    nothing, is_error = await call(host, "grep", pattern="Django")
    assert (nothing, is_error) == ("No lines match 'Django'.", False)


async def test_argument_checks(host: LocalToolHost) -> None:
    box = default_toolbox()
    empty = await box.call(host, "list_processes", "")  # "" means no arguments
    assert not empty.is_error
    not_object = await box.call(host, "list_processes", "[1]")
    assert "must be a JSON object" in not_object.output
    for value in ["7", True, 7.5]:
        output, is_error = await call(host, "tail_log", pid=value)
        assert is_error
        assert "'pid' must be an integer" in output
    output, is_error = await call(host, "tail_log", pid=424242)
    assert is_error
    assert "no process with pid 424242" in output


async def test_workspace_errors_reach_the_model(host: LocalToolHost) -> None:
    output, is_error = await call(host, "write_file", path="../escape.txt", content="x")
    assert is_error
    assert output.startswith("Error: ")
    assert "../escape.txt" in output  # the workspace's own words, naming the path
    assert not (host.root.parent / "escape.txt").exists()


async def test_run_shell_reports_timeouts(host: LocalToolHost) -> None:
    output, is_error = await call(host, "run_shell", cmd="sleep 5", timeout=0.2)
    assert not is_error
    assert "[exit code: 124]" in output
    assert "timed out" in output
    assert "start_process" in output
    bad, is_error = await call(host, "run_shell", cmd="true", timeout=0)
    assert is_error
    assert "positive" in bad


class BrokenHost(LocalToolHost):
    async def run_shell(self, cmd: str, *, timeout: float | None = None) -> ExecResult:
        raise OSError("/srv/crogia/secret/path exploded")


async def test_an_unexpected_failure_becomes_a_tool_error(
    host: LocalToolHost, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BrokenHost(host.workspace, host.log_dir)
    with caplog.at_level(logging.ERROR, logger="crogia.agent.tools.registry"):
        output, is_error = await call(broken, "run_shell", cmd="ls")
    assert is_error
    assert output == "Error: run_shell failed unexpectedly (OSError); try another way."
    assert "/srv/crogia" not in output  # host details stay in the log
    assert "exploded" in caplog.text
