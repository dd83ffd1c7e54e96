"""The system prompt: where the model is and how to use its tools.

The text lives in `system_prompt.md` beside this module, versioned with the code and read
once at start-up. It is not stored in the conversation; the loop sends it with every call,
so it can change (new tools, new rules) without rewriting saved histories.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from crogia.agent.tools.output import DEFAULT_MAX_OUTPUT
from crogia.sandbox.base import WORKDIR

PROMPT_FILE = Path(__file__).with_name("system_prompt.md")


@cache
def _template() -> str:
    return PROMPT_FILE.read_text(encoding="utf-8").strip()


def system_prompt(*, workdir: str = WORKDIR, extra: str = "", max_output: int = DEFAULT_MAX_OUTPUT) -> str:
    """The system prompt for an agent working in `workdir`; `extra` is appended (house rules)."""
    prompt = _template().format(workdir=workdir, max_output=f"{max_output:,}")
    return f"{prompt}\n\n{extra.strip()}" if extra.strip() else prompt
