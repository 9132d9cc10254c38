"""The tool-call parsers by name, as `--tool-call-parser NAME` selects them."""

from __future__ import annotations

from frontend.tool_parsers.base import ToolParser
from frontend.tool_parsers.hermes import HermesToolParser
from frontend.tool_parsers.llama3_json import Llama3JsonToolParser


class UnknownToolParserError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


class ToolParserRegistry:
    _parsers: dict[str, type[ToolParser]] = {
        parser.name: parser for parser in (Llama3JsonToolParser, HermesToolParser)
    }

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._parsers)

    @classmethod
    def get(cls, name: str) -> type[ToolParser]:
        parser = cls._parsers.get(name)
        if parser is None:
            raise UnknownToolParserError(
                f"unknown tool call parser {name!r}; known: {', '.join(cls.names())}"
            )
        return parser
