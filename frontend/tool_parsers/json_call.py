"""One tool call written as a JSON object, read a character at a time.

    {"name": "get_weather", "arguments": {"city": "Paris"}}

The header (the keys before the arguments) is held until it is complete: it must be string
members, one of them "name", then "arguments" or "parameters". That is the call's commit
point: the name is known, and from then on the arguments value is passed through as it
arrives (an object's exact text; a string value is unescaped, for models that write the
arguments as a JSON string). Anything after the value up to the object's closing brace is
dropped. A header that goes wrong fails the call, and the caller releases it as content.
`{"name": "f"}` alone is a call without arguments ("{}").
"""

from __future__ import annotations

import enum
import json

ARGUMENT_KEYS = ("arguments", "parameters")
WHITESPACE = " \t\r\n"


class Event(enum.IntEnum):
    HOLD = 0  # part of the header: undecided
    FAIL = 1  # this character cannot continue a call header
    COMMIT = 2  # the header is complete: `name` is known
    ARGUMENTS = 3  # `text` continues the arguments
    SKIP = 4  # consumed, not part of the arguments
    DONE = 5  # the call's object is closed
    COMMIT_DONE = 6  # a call without arguments, complete at once


class _State(enum.IntEnum):
    KEY = 0
    KEY_STRING = 1
    COLON = 2
    VALUE = 3
    VALUE_STRING = 4
    AFTER_VALUE = 5
    BEFORE_ARGUMENTS = 6
    CONTAINER = 7
    STRING = 8
    SCALAR = 9
    TAIL = 10


class JsonCallScanner:
    """Reads one call object; the caller has seen its `{` and feeds every later character."""

    def __init__(self) -> None:
        self.state = _State.KEY
        self.name: str | None = None
        self.text = ""  # with Event.ARGUMENTS: the characters to append to the arguments
        self._key = ""
        self._raw = ""  # a header string's raw characters, or a pending escape in STRING
        self._high_surrogate = ""  # STRING: a \uD8xx escape waiting for its low half
        self._is_escaped = False
        self._is_in_string = False
        self._depth = 0  # of the arguments value (CONTAINER) or of the whole object (TAIL)

    @property
    def is_committed(self) -> bool:
        return self.state >= _State.BEFORE_ARGUMENTS

    def step(self, char: str) -> Event:
        if self.state < _State.BEFORE_ARGUMENTS:
            return self._header(char)
        return self._arguments(char)

    # ---- the header: `"key": "value",` members up to the arguments key

    def _header(self, char: str) -> Event:
        state = self.state
        if state in (_State.KEY_STRING, _State.VALUE_STRING):
            return self._header_string(char)
        if char in WHITESPACE:
            return Event.HOLD
        if state == _State.KEY and char == '"':
            self.state = _State.KEY_STRING
        elif state == _State.COLON and char == ":":
            if self._key in ARGUMENT_KEYS:
                if not self.name:
                    return Event.FAIL
                self.state = _State.BEFORE_ARGUMENTS
                return Event.COMMIT
            self.state = _State.VALUE
        elif state == _State.VALUE and char == '"':
            self.state = _State.VALUE_STRING
        elif state == _State.AFTER_VALUE and char == ",":
            self.state = _State.KEY
        elif state == _State.AFTER_VALUE and char == "}" and self.name:
            self.state = _State.TAIL
            self.text = "{}"
            return Event.COMMIT_DONE
        else:
            return Event.FAIL
        return Event.HOLD

    def _header_string(self, char: str) -> Event:
        if ord(char) < 0x20:
            return Event.FAIL  # JSON strings hold no raw control characters
        if self._is_escaped or char == "\\":
            self._is_escaped = not self._is_escaped
            self._raw += char
            return Event.HOLD
        if char != '"':
            self._raw += char
            return Event.HOLD
        try:
            value = json.loads(f'"{self._raw}"')
        except ValueError:
            return Event.FAIL
        self._raw = ""
        if self.state == _State.KEY_STRING:
            self._key = value
            self.state = _State.COLON
        else:
            if self._key == "name":
                self.name = _well_formed(value)
            self.state = _State.AFTER_VALUE
        return Event.HOLD

    # ---- the arguments value, then the rest of the object

    def _arguments(self, char: str) -> Event:
        state = self.state
        if state == _State.BEFORE_ARGUMENTS:
            return self._start_value(char)
        if state == _State.CONTAINER:
            return self._container(char)
        if state == _State.STRING:
            return self._string_value(char)
        if state == _State.SCALAR:
            if char in WHITESPACE or char in ",}":
                self.state, self._depth = _State.TAIL, 1
                return self._tail(char)
            return self._emit(char)
        return self._tail(char)

    def _start_value(self, char: str) -> Event:
        if char in WHITESPACE:
            return Event.SKIP
        if char in "{[":
            self.state, self._depth = _State.CONTAINER, 1
            return self._emit(char)
        if char == '"':
            self.state = _State.STRING
            return Event.SKIP
        if char in ",}":  # no value at all
            self.state, self._depth = _State.TAIL, 1
            return self._tail(char)
        self.state = _State.SCALAR
        return self._emit(char)

    def _container(self, char: str) -> Event:
        if self._scan(char):
            self.state, self._depth = _State.TAIL, 1
        return self._emit(char)

    def _scan(self, char: str) -> bool:
        """Track JSON strings and bracket depth; whether char closed the outermost bracket."""
        if self._is_in_string:
            if self._is_escaped:
                self._is_escaped = False
            elif char == "\\":
                self._is_escaped = True
            elif char == '"':
                self._is_in_string = False
        elif char == '"':
            self._is_in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            return self._depth == 0
        return False

    def _string_value(self, char: str) -> Event:
        """Arguments written as a JSON string: pass its decoded characters on."""
        if self._raw:  # inside an escape sequence
            self._raw += char
            if self._raw[1] == "u" and len(self._raw) < 6:
                return Event.SKIP
            return self._escape_done()
        if char == "\\":
            self._raw = char
            return Event.SKIP
        lone = "\ufffd" if self._high_surrogate else ""  # a high half with no low half
        self._high_surrogate = ""
        if char == '"':
            self.state, self._depth = _State.TAIL, 1
            return self._emit(lone) if lone else Event.SKIP
        return self._emit(lone + char)

    def _escape_done(self) -> Event:
        raw, self._raw = self._raw, ""
        if _is_high_surrogate_escape(raw) and not self._high_surrogate:
            self._high_surrogate = raw  # its low half may follow
            return Event.SKIP
        text, self._high_surrogate = self._high_surrogate + raw, ""
        try:
            decoded = json.loads(f'"{text}"')
        except ValueError:
            decoded = text
        return self._emit(_well_formed(decoded))

    def _tail(self, char: str) -> Event:
        return Event.DONE if self._scan(char) else Event.SKIP

    def _emit(self, text: str) -> Event:
        self.text = text
        return Event.ARGUMENTS


def _well_formed(text: str) -> str:
    """`text` with surrogate pairs joined and lone surrogates (from `\\uD83D`-style escapes that
    lack a half) replaced, so that it encodes as UTF-8."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _is_high_surrogate_escape(raw: str) -> bool:
    try:
        return raw[1] == "u" and 0xD800 <= int(raw[2:6], 16) <= 0xDBFF
    except ValueError:
        return False
