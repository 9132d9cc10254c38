"""Reasoning parsers: a reasoning model's output text -> reasoning (its `<think>` block) and
content, whole or streamed.

    parser = ReasoningParserRegistry.get("deepseek_r1").for_request(
        prompt_text=prompt, chat_template_kwargs=None, is_constrained=False)
    reasoning, content = parser.extract(text)               # a complete output
    reasoning_delta, content_delta = parser.feed(text_delta)  # or, as text arrives;
    reasoning_delta, content_delta = parser.finish()           # then once at the end

One parser per output. The streamed deltas of any chunking concatenate to what `extract`
returns. Tool calls are parsed from the content part only.
"""

from frontend.reasoning_parsers.base import THINK_END, THINK_START, ReasoningParser, prompt_opens_think_block
from frontend.reasoning_parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from frontend.reasoning_parsers.qwen3 import Qwen3ReasoningParser
from frontend.reasoning_parsers.registry import ReasoningParserRegistry, UnknownReasoningParserError

__all__ = [
    "THINK_END",
    "THINK_START",
    "DeepSeekR1ReasoningParser",
    "Qwen3ReasoningParser",
    "ReasoningParser",
    "ReasoningParserRegistry",
    "UnknownReasoningParserError",
    "prompt_opens_think_block",
]
