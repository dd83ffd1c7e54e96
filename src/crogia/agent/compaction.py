"""Keeping what the model is sent inside its window: token estimates and compaction steps.

The full conversation is never changed; the loop sends a *view* of it, `head + full[covers:]`,
where `head` stands for the first `covers` messages. Compaction only rewrites the view,
cheapest step first: (a) old tool outputs cut to head + tail with a note, the last turns kept
whole; (b) the older part summarised by one model call. What keeps this from looping (as
summarising condensers are known to): each step must leave the view well under the threshold,
a summary is only made when something new came after the last one, and a task gets a capped
number of compactions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUMMARY_PREFIX = "[Context compaction: a summary of the earlier conversation]\n"
CUT_NOTE = "\n[... {cut} characters of this output were cut by context compaction ...]\n"
_CHARS_PER_TOKEN = 3
"""Code and logs run 3-4 characters a token; erring high compacts a little early, never late."""
_MESSAGE_OVERHEAD = 4


@dataclass(slots=True)
class ContextView:
    """What stands for the start of the full conversation: `head` replaces `full[:covers]`."""

    head: list[dict[str, Any]] = field(default_factory=list)
    covers: int = 0

    def apply(self, full: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages the model is sent for `full`."""
        if not self.covers and not self.head:
            return list(full)
        return [*self.head, *full[self.covers :]]


def estimate(message: dict[str, Any]) -> int:
    """Tokens one message costs, from its length: no tokenizer (nothing to download)."""
    chars = len(message.get("content") or "")
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        chars += len(function.get("name") or "") + len(function.get("arguments") or "") + 16
    return chars // _CHARS_PER_TOKEN + _MESSAGE_OVERHEAD


def estimate_all(messages: list[dict[str, Any]]) -> int:
    return sum(map(estimate, messages))


def recent_start(messages: list[dict[str, Any]], keep_turns: int) -> int:
    """Index of the assistant message that opens the last `keep_turns` turns (0: keep all)."""
    seen = 0
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            seen += 1
            if seen == keep_turns:
                return index
    return 0


def shorten_tool_outputs(
    messages: list[dict[str, Any]], *, before: int, keep_chars: int
) -> tuple[list[dict[str, Any]], int]:
    """Tool outputs before index `before` cut to `keep_chars` (head + tail); (new list, tokens saved)."""
    result = list(messages)
    saved = 0
    for index in range(before):
        message = result[index]
        content = message.get("content")
        if message.get("role") != "tool" or not isinstance(content, str) or len(content) <= keep_chars:
            continue
        half = keep_chars // 2
        cut = len(content) - 2 * half
        short = content[:half] + CUT_NOTE.format(cut=cut) + content[-half:]
        saved += (len(content) - len(short)) // _CHARS_PER_TOKEN
        result[index] = {**message, "content": short}
    return result, saved


def is_summary(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return message.get("role") == "user" and isinstance(content, str) and content.startswith(SUMMARY_PREFIX)


def summarisable(old: list[dict[str, Any]]) -> bool:
    """Something besides earlier summaries and user messages: a summary would add nothing new."""
    return any(not is_summary(m) and m.get("role") != "user" for m in old)


def summary_message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": SUMMARY_PREFIX + text.strip()}


SUMMARY_INSTRUCTIONS = """\
You compress the history of a coding agent's work so it can go on without the full transcript. \
Write a summary the agent will read in place of that history. Keep, under these headings: \
TASK (the user's requests, verbatim where short), DONE (decisions made and why, what was \
verified), FILES (every file created, changed or read that matters, with what changed), \
STATE (servers or processes started, commands that work), OPEN (problems not yet solved, next \
steps). Be specific: paths, names, error messages. No preamble."""


def transcript(messages: list[dict[str, Any]], *, max_chars: int, per_message: int = 2000) -> str:
    """The messages as plain text for the summariser, each capped, the whole capped mid-way."""
    lines: list[str] = []
    for message in messages:
        role = message.get("role")
        content = str(message.get("content") or "")
        if len(content) > per_message:
            content = content[: per_message // 2] + " [...] " + content[-per_message // 2 :]
        if content:
            lines.append(f"{role}: {content}")
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            arguments = str(function.get("arguments") or "")[:per_message]
            lines.append(f"assistant called {function.get('name')}({arguments})")
    text = "\n\n".join(lines)
    if len(text) > max_chars:
        half = max_chars // 2
        text = (
            text[:half] + "\n\n[... the middle of the history was too long to include ...]\n\n" + text[-half:]
        )
    return text
