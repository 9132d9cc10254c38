"""Hermes-style tool calls: `<tool_call>{"name": "...", "arguments": {...}}</tool_call>`.

Used by Hermes, Qwen 2/2.5/3 and SmolLM3-style templates: each call is a JSON object between
the two tags (usually on lines of its own), with prose before, between or after calls. A tag
whose JSON header does not parse is content, tags included; a call whose closing tag never
comes (the output was cut, or the model went on) keeps what it has.
"""

from __future__ import annotations

import enum

from frontend.tool_parsers.base import ToolCallStream, ToolParser
from frontend.tool_parsers.json_call import WHITESPACE

START_TAG = "<tool_call>"
END_TAG = "</tool_call>"


class _Mode(enum.IntEnum):
    CONTENT = 0
    START_TAG = 1  # a possible <tool_call>
    BLOCK_START = 2  # whitespace between <tool_call> and the object
    CALL = 3
    END_TAG = 4  # whitespace and </tool_call> after the object


class HermesStream(ToolCallStream):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._mode = _Mode.CONTENT
        self._end_tag = ""  # the closing tag so far

    def _step(self, char: str) -> str | None:
        mode = self._mode
        if mode == _Mode.CALL:
            return self._call_step(char)
        if mode == _Mode.END_TAG:
            return self._end_tag_step(char)
        if mode == _Mode.START_TAG:
            self._hold(char)
            if self._pending == START_TAG:
                self._mode = _Mode.BLOCK_START
            elif not START_TAG.startswith(self._pending):
                return self._fail()
        elif mode == _Mode.BLOCK_START:
            self._hold(char)
            if char == "{":
                self._start_call()
                self._mode = _Mode.CALL
            elif char not in WHITESPACE:
                return self._fail()
        elif char == "<":
            self._hold(char)
            self._mode = _Mode.START_TAG
        else:
            self._content(char)
        return None

    def _end_tag_step(self, char: str) -> str | None:
        if not self._end_tag and char in WHITESPACE:
            return None
        self._end_tag += char
        if self._end_tag == END_TAG:
            self._end_tag = ""
            self._mode = _Mode.CONTENT
        elif not END_TAG.startswith(self._end_tag):
            # No closing tag: the call stands, and this is what follows it.
            again, self._end_tag = self._end_tag, ""
            self._mode = _Mode.CONTENT
            return again
        return None

    def _call_done(self) -> None:
        self._mode = _Mode.END_TAG

    def _reset(self) -> None:
        self._mode = _Mode.CONTENT

    def _end(self) -> str | None:
        if self._is_in_call:
            return None  # cut short: the call keeps the arguments it has
        if self._mode == _Mode.END_TAG:
            self._end_tag = ""  # a closing tag cut short belongs to the call
            self._mode = _Mode.CONTENT
            return None
        return self._end_content()


class HermesToolParser(ToolParser):
    name = "hermes"

    def stream(self) -> HermesStream:
        return HermesStream(self.make_id)
