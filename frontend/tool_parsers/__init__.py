"""Tool-call parsers: model output text -> content and OpenAI tool calls, whole or streamed.

    parser = ToolParserRegistry.get("hermes")()
    content, calls = parser.extract(text)          # a complete output
    stream = parser.stream()                        # or, as text arrives:
    delta = stream.feed(text_delta); ...; last = stream.finish()

The streamed deltas of any chunking concatenate to exactly what `extract` returns.
"""

from frontend.tool_parsers.base import (
    ParsedDelta,
    StopCutToolCallStream,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    fold_deltas,
    new_tool_call_id,
)
from frontend.tool_parsers.registry import ToolParserRegistry, UnknownToolParserError

__all__ = [
    "ParsedDelta",
    "StopCutToolCallStream",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolParser",
    "ToolParserRegistry",
    "UnknownToolParserError",
    "fold_deltas",
    "new_tool_call_id",
]
