"""The system prompt: one versioned file, everything the model needs, within a token budget."""

from __future__ import annotations

from crogia.agent.prompt import PROMPT_FILE, system_prompt
from crogia.agent.tools import default_toolbox

BUDGET_TOKENS = 900
"""It goes with every request: a few hundred tokens, not thousands."""


def test_the_prompt_stays_under_its_token_budget() -> None:
    prompt = system_prompt()
    # 3.5 characters a token is generous for English prose with code names (cl100k/o200k: ~4).
    assert len(prompt) / 3.5 < BUDGET_TOKENS, f"{len(prompt)} characters"
    assert "{" not in prompt  # every placeholder was filled


def test_the_prompt_says_what_the_model_needs() -> None:
    prompt = system_prompt(workdir="/workspace", max_output=16384)
    for needed in ("/workspace", "sudo", "start_process", "tail_log", "edit_file", "16,384", "done"):
        assert needed in prompt, needed
    mentioned = [tool for tool in default_toolbox().tools if tool in prompt]
    assert len(mentioned) == len(default_toolbox().tools)  # every tool is introduced


def test_the_prompt_is_read_from_its_file_and_takes_house_rules() -> None:
    assert PROMPT_FILE.name == "system_prompt.md" and PROMPT_FILE.is_file()
    assert system_prompt(extra="Always write tests.").endswith("\n\nAlways write tests.")
