"""What every tool-call parser shares: its results, and the incremental machine behind both modes.

A parser is one character-level state machine per output. Streaming feeds it text deltas as
they arrive; non-streaming feeds the whole text at once. Every decision depends only on the
characters seen so far (never on where a delta ends), and the machine only holds text back,
never takes it back: so the deltas of any chunking concatenate to the non-streamed result.

Text that may still become part of a tool call (a partial start marker, a call's header before
its name is known, whitespace next to it) is held; when it turns out not to be one, the first
held character is released as content and the rest is read again.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from frontend.tool_parsers.json_call import WHITESPACE, Event, JsonCallScanner


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments' JSON text, exactly as the model wrote it


@dataclass
class ToolCallDelta:
    """A fragment of call `index`: the first carries its id and name, later ones arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.content and not self.tool_calls


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One output's incremental parser; `feed` and `finish` return what was decided since.

    Subclasses implement `_step` (one character) and `_end` (the output is complete), using
    the helpers here for the parts every format shares: whitespace next to a call belongs to
    neither the content nor the call, and a candidate that fails is released and read again.
    Both return the text to read again, if any.
    """

    def __init__(self, make_id: Callable[[], str] = new_tool_call_id) -> None:
        self._make_id = make_id
        self._decided = ParsedDelta()
        self.num_calls = 0
        self._held_whitespace = ""  # after content: dropped if a call follows
        self._pending = ""  # a candidate call's text, held until it is decided
        self._scanner: JsonCallScanner | None = None
        self._is_after_call = False  # whitespace is dropped until the next content

    def feed(self, text: str) -> ParsedDelta:
        self._read(text)
        return self._take()

    def finish(self) -> ParsedDelta:
        while again := self._end():
            self._read(again)
        return self._take()

    def _read(self, text: str) -> None:
        queue = deque(text)
        while queue:
            again = self._step(queue.popleft())
            if again:
                queue.extendleft(reversed(again))

    def _step(self, char: str) -> str | None:
        raise NotImplementedError

    def _end(self) -> str | None:
        raise NotImplementedError

    def _call_done(self) -> None:
        """The call's object closed: what the format expects after it."""
        raise NotImplementedError

    # ---- shared steps

    def _content(self, char: str) -> None:
        if char in WHITESPACE:
            if not self._is_after_call:
                self._held_whitespace += char
            return
        self._emit_content(self._held_whitespace + char)
        self._held_whitespace = ""
        self._is_after_call = False

    def _hold(self, char: str) -> None:
        self._pending += char

    def _start_call(self) -> None:
        self._scanner = JsonCallScanner()

    def _call_step(self, char: str) -> str | None:
        scanner = self._scanner
        event = scanner.step(char)
        if event == Event.HOLD:
            self._pending += char
        elif event == Event.FAIL:
            self._pending += char
            return self._fail()
        elif event in (Event.COMMIT, Event.COMMIT_DONE):
            self._held_whitespace = self._pending = ""
            self._open_call(scanner.name)
            if event == Event.COMMIT_DONE:
                self._emit_arguments(scanner.text)
                self._close_call()
        elif event == Event.ARGUMENTS:
            self._emit_arguments(scanner.text)
        elif event == Event.DONE:
            self._close_call()
        return None

    def _close_call(self) -> None:
        self._scanner = None
        self._is_after_call = True
        self._call_done()

    @property
    def _is_in_call(self) -> bool:
        return self._scanner is not None and self._scanner.is_committed

    @property
    def has_unfinished_call(self) -> bool:
        """After `finish`: the output ended inside a call's arguments."""
        return self._is_in_call

    def _fail(self) -> str:
        """The candidate is not a call: its first character is content; the rest is read again."""
        pending, self._pending, self._scanner = self._pending, "", None
        self._reset()
        self._content(pending[0])
        return pending[1:]

    def _reset(self) -> None:
        """Back to reading content (after a failed candidate)."""
        raise NotImplementedError

    def _end_content(self) -> str | None:
        """At the end: fail an undecided candidate, else release held whitespace."""
        if self._pending:
            return self._fail()
        if not self._is_after_call:
            self._emit_content(self._held_whitespace)
        self._held_whitespace = ""
        return None

    # ---- what was decided since the last `_take`, merged into as few fragments as possible

    def _take(self) -> ParsedDelta:
        decided, self._decided = self._decided, ParsedDelta()
        return decided

    def _emit_content(self, text: str) -> None:
        self._decided.content += text

    def _open_call(self, name: str) -> None:
        self._decided.tool_calls.append(ToolCallDelta(self.num_calls, self._make_id(), name))
        self.num_calls += 1

    def _emit_arguments(self, text: str) -> None:
        calls = self._decided.tool_calls
        index = self.num_calls - 1
        if calls and calls[-1].index == index:
            calls[-1].arguments += text
        else:
            calls.append(ToolCallDelta(index, arguments=text))


class ToolParser:
    """A tool-call format: `stream()` makes a fresh incremental parser for one output."""

    name: str = ""

    def __init__(self, make_id: Callable[[], str] = new_tool_call_id) -> None:
        self.make_id = make_id

    def stream(self) -> ToolCallStream:
        raise NotImplementedError

    def extract(self, text: str, *, is_cut_by_stop: bool = False) -> tuple[str | None, list[ToolCall]]:
        """The content (None when there is none) and the tool calls of a complete output;
        `is_cut_by_stop`: a stop string ended it (see `StopCutToolCallStream`)."""
        stream = StopCutToolCallStream(self.stream())
        return fold_deltas([stream.feed(text), stream.finish(is_cut_by_stop=is_cut_by_stop)])


class StopCutToolCallStream:
    """A parser for an output that a stop string may end. A call cut short by a stop string is
    not a call (its arguments are not JSON) but the text it was, and the choice ends with
    "stop"; so once a call begins, its deltas and everything after are held until the output
    ends. They are then released as they are, or, if a stop string cut a call, the text not yet
    sent as content is sent instead. Without stop strings in the request nothing can cut a call
    this way, and the serving code uses the plain stream (calls stream as they are written).
    """

    def __init__(self, stream: ToolCallStream) -> None:
        self._stream = stream
        self._text = ""  # every character fed
        self._sent_content = ""  # content released before the first call
        self._held: list[ParsedDelta] = []
        self.num_calls = 0  # calls released

    def feed(self, text: str) -> ParsedDelta:
        self._text += text
        delta = self._stream.feed(text)
        if self._held or delta.tool_calls:
            self._held.append(delta)
            return ParsedDelta()
        self._sent_content += delta.content
        return delta

    def finish(self, *, is_cut_by_stop: bool) -> ParsedDelta:
        held, self._held = [*self._held, self._stream.finish()], []
        if is_cut_by_stop and self._stream.has_unfinished_call:
            # the content sent is where the text starts (less any marker the parser drops, such
            # as a visible <|python_tag|>, which this leaves one marker's length off)
            return ParsedDelta(self._text[len(self._sent_content) :])
        self.num_calls = self._stream.num_calls
        calls: list[ToolCallDelta] = []
        for call in (c for d in held for c in d.tool_calls):
            if calls and calls[-1].index == call.index:
                calls[-1].arguments += call.arguments
            else:
                calls.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))
        return ParsedDelta("".join(d.content for d in held), calls)


def fold_deltas(deltas: list[ParsedDelta]) -> tuple[str | None, list[ToolCall]]:
    """What a client that concatenates streamed deltas ends up with."""
    content = "".join(d.content for d in deltas)
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        for call in delta.tool_calls:
            if call.id is not None:
                ids[call.index] = call.id
            if call.name is not None:
                names[call.index] = call.name
            arguments.setdefault(call.index, []).append(call.arguments)
    calls = [ToolCall(ids[i], names[i], "".join(arguments[i])) for i in sorted(arguments)]
    return content or None, calls
