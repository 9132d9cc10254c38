"""The reasoning parsers by name, as `--reasoning-parser NAME` selects them."""

from __future__ import annotations

from frontend.reasoning_parsers.base import ReasoningParser
from frontend.reasoning_parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from frontend.reasoning_parsers.qwen3 import Qwen3ReasoningParser


class UnknownReasoningParserError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


class ReasoningParserRegistry:
    _parsers: dict[str, type[ReasoningParser]] = {
        parser.name: parser for parser in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
    }

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._parsers)

    @classmethod
    def get(cls, name: str) -> type[ReasoningParser]:
        parser = cls._parsers.get(name)
        if parser is None:
            raise UnknownReasoningParserError(
                f"unknown reasoning parser {name!r}; known: {', '.join(cls.names())}"
            )
        return parser
