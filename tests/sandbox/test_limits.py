"""Limits every backend enforces: a sized /tmp, pids, and nothing outliving its command."""

from __future__ import annotations

import time

from crogia.sandbox.base import Limits, Sandbox
from tests.sandbox.conftest import MakeSandbox

PS = "ps -eo pid=,pgid=,stat=,args= | grep -v -e ' ps ' -e 'grep' -e /opt/crogia -e tini -e bwrap"


async def leftovers(sandbox: Sandbox) -> list[str]:
    """Processes in the sandbox other than its init, the daemon and the probe itself."""
    result = await sandbox.exec(PS, timeout=10, max_output=65536)
    return [line for line in result.output.splitlines() if line.strip() and "bash -c" not in line]


async def test_tmp_is_a_sized_tmpfs_that_fills_up(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(Limits(memory_mb=512, tmp_mb=32))
    size = await sandbox.exec("df -m --output=size /tmp | tail -1", timeout=10, max_output=1024)
    fill = await sandbox.exec("dd if=/dev/zero of=/tmp/fill bs=1M count=100", timeout=30, max_output=4096)
    after = await sandbox.exec("rm /tmp/fill && echo ok", timeout=10, max_output=1024)
    assert int(size.output.strip()) == 32
    assert fill.exit_code != 0 and "No space left on device" in fill.output
    assert after.output.strip() == "ok"


async def test_background_jobs_end_with_their_command(sandbox: Sandbox) -> None:
    result = await sandbox.exec(
        "sleep 300 & (sleep 0.05; echo late) & echo started", timeout=10, max_output=1024
    )
    assert result.exit_code == 0
    assert result.output.split() == ["started", "late"]  # what they wrote before being killed is kept
    assert await leftovers(sandbox) == []


async def test_timed_out_command_takes_its_strays_along(sandbox: Sandbox) -> None:
    # `setsid -f` would leave the session too; a new group in the same session does not escape.
    cmd = "set -m; sleep 301 & sleep 302 & wait"
    result = await sandbox.exec(cmd, timeout=1, max_output=1024)
    assert result.timed_out and result.exit_code == 124
    assert await leftovers(sandbox) == []


async def test_fork_bomb_is_capped_and_cleaned_up(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(Limits(memory_mb=512, pids=128))
    # The literal bomb's shell returns at once, leaving the bomb to its group: it goes too. (Unless
    # the bomb filled the pids limit between its two forks: bash then retries its own until the timeout.)
    quick = await sandbox.exec(":(){ :|:& };:", timeout=5, max_output=65536)
    assert quick.exit_code == 0 or quick.timed_out
    assert await leftovers(sandbox) == []
    blocking = await sandbox.exec(":(){ :|:& };:; sleep 30", timeout=3, max_output=65536)
    assert blocking.timed_out
    assert "Resource temporarily unavailable" in blocking.output  # the pids limit held it
    assert await leftovers(sandbox) == []
    after = await sandbox.exec("echo alive", timeout=10, max_output=1024)
    assert after.output.strip() == "alive"


async def test_streamed_output_is_rate_limited_after_its_first_burst(sandbox: Sandbox) -> None:
    streamed: list[str] = []
    started = time.monotonic()
    result = await sandbox.exec(
        "yes | head -c 50000000; echo; echo the end",
        timeout=60,
        max_output=65536,
        on_output=streamed.append,
    )
    took = time.monotonic() - started
    text = "".join(streamed)
    assert result.exit_code == 0 and result.truncated and result.output.endswith("the end\n")
    # The first 64 KiB at once, then about 1 MiB/s: never the 50 MB.
    assert len(text) < 65536 + (took + 1) * 1024 * 1024 + 4096
    assert "bytes of output not streamed" in text and text.endswith("the end\n")
