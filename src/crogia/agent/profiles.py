"""What a model accepts, looked up from its name, with settings overriding each fact.

Reasoning models (the o-series, the gpt-5 family) reject `temperature`/`top_p` and want
`max_completion_tokens` instead of `max_tokens`; their windows and output budgets differ from
gpt-4.x's. A name we do not recognise is "some OpenAI-compatible server": it gets only what
every such server accepts, and conservative sizes that `MODEL_CONTEXT_TOKENS` can correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

ModelApi = Literal["chat", "responses"]
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Facts about one model that shape its requests and the context budget."""

    family: str
    """`o-series`, `gpt-5`, `gpt-4` or `compatible`."""
    reasoning: bool
    context_tokens: int
    """The window: prompt and answer together."""
    output_tokens: int
    """Reserved for the answer (reasoning included); sent as the output limit when `send_output`."""
    send_output: bool = True
    reasoning_effort: str | None = None
    """None: the server's default."""
    temperature: float | None = None
    """Only ever sent to models that accept it."""

    @property
    def input_budget(self) -> int:
        """Tokens the prompt may use and still leave the answer its room."""
        return max(1024, self.context_tokens - self.output_tokens)

    def chat_options(self) -> dict[str, Any]:
        """Sampling and limit parameters for a Chat Completions request."""
        options: dict[str, Any] = {}
        if self.send_output:
            options["max_completion_tokens" if self.reasoning else "max_tokens"] = self.output_tokens
        if self.reasoning and self.reasoning_effort:
            options["reasoning_effort"] = self.reasoning_effort
        if not self.reasoning and self.temperature is not None:
            options["temperature"] = self.temperature
        return options

    def responses_options(self) -> dict[str, Any]:
        """The same for a Responses request (`store=false`: reasoning comes back encrypted)."""
        options: dict[str, Any] = {"store": False}
        if self.send_output:
            options["max_output_tokens"] = self.output_tokens
        if self.reasoning:
            options["include"] = ["reasoning.encrypted_content"]
            if self.reasoning_effort:
                options["reasoning"] = {"effort": self.reasoning_effort}
        elif self.temperature is not None:
            options["temperature"] = self.temperature
        return options


_FAMILIES: tuple[tuple[re.Pattern[str], ModelProfile], ...] = (
    (re.compile(r"^o\d"), ModelProfile("o-series", True, 200_000, 32_768)),
    (re.compile(r"^gpt-5"), ModelProfile("gpt-5", True, 400_000, 32_768)),
    (re.compile(r"^gpt-4\.1"), ModelProfile("gpt-4", False, 1_047_576, 32_768)),
    (re.compile(r"^gpt-4"), ModelProfile("gpt-4", False, 128_000, 16_384)),
)
_COMPATIBLE = ModelProfile("compatible", False, 128_000, 4096, send_output=False)


def profile_for(
    name: str,
    *,
    reasoning: bool | None = None,
    context_tokens: int = 0,
    output_tokens: int = 0,
    reasoning_effort: str | None = None,
    temperature: float | None = None,
) -> ModelProfile:
    """The profile of model `name` (provider prefixes like `openai/` ignored); set values win."""
    base = name.rsplit("/", 1)[-1].lower()
    profile = next((p for pattern, p in _FAMILIES if pattern.match(base)), _COMPATIBLE)
    changes: dict[str, Any] = {"reasoning_effort": reasoning_effort or None, "temperature": temperature}
    if reasoning is not None:
        changes["reasoning"] = reasoning
    if context_tokens:
        changes["context_tokens"] = context_tokens
    if output_tokens:
        changes.update(output_tokens=output_tokens, send_output=True)
    return replace(profile, **changes)
