"""Llama 3.1/3.2's JSON tool calls: `{"name": "...", "parameters": {...}}`.

The model card's format for custom tools: the assistant turn is one JSON object per call
(Llama 3.2 also writes "arguments", and sometimes `"type": "function"` first), several calls
separated by `;`, optionally after a `<|python_tag|>` marker. Here a call may also follow
prose; the `<|python_tag|>` marker is dropped wherever it appears (it is a special token,
gone anyway when special tokens are skipped), and `;` right after a call is a separator.
"""

from __future__ import annotations

import enum

from frontend.tool_parsers.base import ToolCallStream, ToolParser

PYTHON_TAG = "<|python_tag|>"


class _Mode(enum.IntEnum):
    CONTENT = 0
    TAG = 1  # a possible <|python_tag|>
    CALL = 2


class Llama3JsonStream(ToolCallStream):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._mode = _Mode.CONTENT

    def _step(self, char: str) -> str | None:
        if self._mode == _Mode.CALL:
            return self._call_step(char)
        if self._mode == _Mode.TAG:
            self._hold(char)
            if self._pending == PYTHON_TAG:
                self._pending = ""
                self._mode = _Mode.CONTENT
            elif not PYTHON_TAG.startswith(self._pending):
                return self._fail()
            return None
        if char == "{":
            self._hold(char)
            self._start_call()
            self._mode = _Mode.CALL
        elif char == "<":
            self._hold(char)
            self._mode = _Mode.TAG
        elif char == ";" and self._is_after_call:
            pass  # between calls
        else:
            self._content(char)
        return None

    def _call_done(self) -> None:
        self._mode = _Mode.CONTENT

    def _reset(self) -> None:
        self._mode = _Mode.CONTENT

    def _end(self) -> str | None:
        if self._is_in_call:
            return None  # cut short (max_tokens): the call keeps the arguments it has
        return self._end_content()


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def stream(self) -> Llama3JsonStream:
        return Llama3JsonStream(self.make_id)
