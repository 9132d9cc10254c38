"""DeepSeek-R1: its chat template opens the think block in the prompt, and the model starts
writing its thinking without a `<think>` of its own (later R1 releases write one; it is dropped).
So everything up to `</think>` is reasoning, and an output with no `</think>` is all reasoning,
as vLLM's `deepseek_r1` parser reads it."""

from __future__ import annotations

from typing import Any

from frontend.reasoning_parsers.base import ReasoningParser, prompt_opens_think_block


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"

    @classmethod
    def for_request(cls, *, prompt_text: str, chat_template_kwargs: dict[str, Any] | None,
                    is_constrained: bool) -> ReasoningParser:
        # a grammar writes the output from its first token, so the block is open only if the
        # prompt really left it open
        return cls(is_open=not is_constrained or prompt_opens_think_block(prompt_text))
