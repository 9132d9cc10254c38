"""What both reasoning parsers share: one character-level machine over `<think>` ... `</think>`.

A reasoning model writes its thinking between `<think>` and `</think>`, then its answer. The
parser splits the output text into reasoning (without the tags) and content. Like the tool-call
parsers it is one state machine per output: streaming feeds it text deltas, `extract` feeds the
whole text at once, and every decision depends only on the characters seen so far, never on
where a delta ends. It only ever holds text back (a partial tag), never takes it back, so the
deltas of any chunking concatenate to what `extract` returns.

The states:

    undecided  -- leading whitespace, then "<think>" --> reasoning
        |------ anything else ---------------------> content (for good: tags there are text)
    reasoning  -- "</think>" ----------------------> content
               (a "<think>" inside is dropped; no "</think>" before the end: all of it is reasoning)
    content    everything passes through

Where the output starts (`is_open`): inside the think block when the chat template already
opened it in the prompt, or, for DeepSeek-R1, also when the prompt does not show it (its
template opens it, and R1 starts writing its thinking without the tag), unless a grammar
constrains the output: then it is what the grammar makes it from its first token.

The tags are read from text. If a tokenizer makes them special tokens, they appear in the
text only with `skip_special_tokens: false`; Qwen3 and DeepSeek-R1 add them as tokens that are
not special, which decoding keeps.
"""

from __future__ import annotations

from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"
_WHITESPACE = " \t\r\n"

_UNDECIDED, _REASONING, _CONTENT = "undecided", "reasoning", "content"


class ReasoningParser:
    """One output's reasoning/content split: `feed` and `finish` return what was decided since,
    as `(reasoning_delta, content_delta)`; `extract` splits a complete text (a fresh machine
    with the same settings, so it is the fold of `feed`)."""

    name: str = ""

    def __init__(self, *, is_open: bool = False, is_enabled: bool = True) -> None:
        self._options = {"is_open": is_open, "is_enabled": is_enabled}
        self._state = (_REASONING if is_open else _UNDECIDED) if is_enabled else _CONTENT
        self._held = ""  # text not yet decided: leading whitespace or a partial tag
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self.has_reasoning = False  # the output opened a think block (or started in one)

    @classmethod
    def for_request(cls, *, prompt_text: str, chat_template_kwargs: dict[str, Any] | None,
                    is_constrained: bool) -> "ReasoningParser":
        """The parser for one chat output. `is_constrained`: a grammar decides the output from its
        first token, so it starts inside a think block only if the prompt left one open (it may
        still write one)."""
        raise NotImplementedError

    @property
    def is_in_reasoning(self) -> bool:
        """Inside the think block now (for counting reasoning tokens)."""
        return self._state == _REASONING

    def feed(self, text: str) -> tuple[str, str]:
        for char in text:
            self._step(char)
        return self._take()

    def finish(self) -> tuple[str, str]:
        """The output ended: a partial tag is text of the state it was read in."""
        held, self._held = self._held, ""
        if self._state == _REASONING:
            self._reasoning.append(held)
        else:
            self._content.append(held)
        return self._take()

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """The reasoning (None when the output has no think block) and the content (None when
        empty) of a complete output."""
        parser = type(self)(**self._options)
        first, last = parser.feed(text), parser.finish()
        reasoning, content = first[0] + last[0], first[1] + last[1]
        return (reasoning if parser.has_reasoning else None), (content or None)

    # ---- the machine

    def _step(self, char: str) -> None:
        if self._state == _CONTENT:
            self._content.append(char)
        elif self._state == _UNDECIDED:
            self._step_undecided(char)
        else:
            self._step_reasoning(char)

    def _step_undecided(self, char: str) -> None:
        held = self._held + char
        tag = held.lstrip(_WHITESPACE)
        if tag == THINK_START:
            self._held = ""
            self._state = _REASONING
            self.has_reasoning = True
        elif THINK_START.startswith(tag):
            self._held = held
        else:
            self._held = ""
            self._state = _CONTENT
            self._content.append(held)

    def _step_reasoning(self, char: str) -> None:
        self.has_reasoning = True
        held = self._held + char
        if held == THINK_END:
            self._held = ""
            self._state = _CONTENT
        elif held == THINK_START:
            self._held = ""  # a repeated opening tag says nothing
        elif THINK_END.startswith(held) or THINK_START.startswith(held):
            self._held = held
        else:
            # not a tag: its first character is reasoning; the rest may still start one
            self._held = ""
            self._reasoning.append(held[0])
            for again in held[1:]:
                self._step_reasoning(again)

    def _take(self) -> tuple[str, str]:
        reasoning, content = "".join(self._reasoning), "".join(self._content)
        self._reasoning.clear()
        self._content.clear()
        return reasoning, content


def prompt_opens_think_block(prompt_text: str) -> bool:
    """The rendered prompt ends inside a think block (its template wrote `<think>` last)."""
    start = prompt_text.rfind(THINK_START)
    return start >= 0 and prompt_text.rfind(THINK_END) < start
