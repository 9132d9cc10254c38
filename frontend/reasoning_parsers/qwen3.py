"""Qwen3: the model writes `<think>` itself, so there is reasoning only when the output starts
with a think block, or when the template opened one at the end of the prompt (Qwen3's
thinking-only releases do). `chat_template_kwargs: {"enable_thinking": false}` makes the
template close an empty think block in the prompt, and then nothing is read as reasoning.

vLLM's `qwen3` parser reads an output without `</think>` as all content when not streaming but
as reasoning when streaming; here a think block that never closes is reasoning either way, so
the stream and the whole response agree."""

from __future__ import annotations

from typing import Any

from frontend.reasoning_parsers.base import ReasoningParser, prompt_opens_think_block


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    @classmethod
    def for_request(cls, *, prompt_text: str, chat_template_kwargs: dict[str, Any] | None,
                    is_constrained: bool) -> ReasoningParser:
        if (chat_template_kwargs or {}).get("enable_thinking") is False:
            return cls(is_enabled=False)
        return cls(is_open=prompt_opens_think_block(prompt_text))
