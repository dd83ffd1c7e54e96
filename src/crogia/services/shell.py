"""One-shot commands in a session's sandbox, with timeouts and output caps bounded by settings."""

from __future__ import annotations

from crogia.config import Settings
from crogia.errors import InvalidInput
from crogia.sandbox.base import WORKDIR, ExecResult, OutputListener
from crogia.services.sessions import LiveSession


def check_command(cmd: str) -> None:
    """InvalidInput for a command no shell can be given: empty, or holding a NUL (argv is C strings)."""
    if not cmd.strip():
        raise InvalidInput("The command is empty.")
    if "\x00" in cmd:
        raise InvalidInput("The command contains a NUL byte.")


class ShellService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def bounds(self, timeout: float | None, max_output: int | None) -> tuple[float, int]:
        """The request's timeout and output cap, defaulted and clamped to the configured maximum."""
        chosen_timeout = self.settings.shell_timeout if timeout is None else timeout
        if chosen_timeout <= 0:
            raise InvalidInput("timeout must be a positive number of seconds.")
        cap = self.settings.shell_max_output if max_output is None else max_output
        if cap <= 0:
            raise InvalidInput("max_output must be a positive number of bytes.")
        return min(chosen_timeout, self.settings.shell_max_timeout), min(cap, self.settings.shell_max_output)

    async def run(
        self,
        live: LiveSession,
        cmd: str,
        *,
        timeout: float | None = None,
        max_output: int | None = None,
        tty: bool = False,
        cwd: str = WORKDIR,
        on_output: OutputListener | None = None,
    ) -> ExecResult:
        check_command(cmd)
        limit, cap = self.bounds(timeout, max_output)
        with live.in_use():
            return await live.sandbox.exec(
                cmd, cwd=cwd, timeout=limit, max_output=cap, tty=tty, on_output=on_output
            )
