"""Turning generated token ids into text as they arrive, and cutting that text at stop strings.

Two small state machines, one of each per sequence, fed by the frontend's output loop:

    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(["\\n\\n"], include_stop_str_in_output=False)
    text, stop = matcher.feed(detokenizer.push(new_token_ids))   # every engine step
    text = matcher.feed(detokenizer.flush())[0] + matcher.flush()  # when the engine finishes it

Both only ever hold text back, never take it back: what they return is final, so it can be
streamed at once, and the concatenation of all returns is the whole output.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes one sequence's token ids incrementally, never splitting a character.

    A byte-level token may hold part of a UTF-8 character (an emoji is often 2-4 tokens), and
    decoding such a prefix gives U+FFFD. We decode a sliding window of recent tokens and return
    what is new since the last call, holding back the trailing U+FFFDs until the character
    completes. A window (rather than each token alone) keeps the decoder's context rules right:
    a SentencePiece decoder drops the space of the first token only, and a window decodes the
    same text as the whole sequence does from its second token on.

    If the text still ends in U+FFFD after `max_held_pushes` pushes, the model produced bytes
    that are not UTF-8 and never will be; they are then released as U+FFFD. For valid text, the
    concatenation of `push` (and `flush`) returns equals
    `tokenizer.decode(all_ids, skip_special_tokens=skip_special_tokens)`.
    """

    max_held_pushes = 8  # a valid partial character spans at most 3 tokens; this is far past it
    max_window_tokens = 16  # decode cost per step stays small however long the sequence is
    num_context_tokens = 4  # tokens kept before new ones when the window slides

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        # The `tokenizers` backend: transformers' decode() is this plus Python overhead.
        self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self._window_ids: list[int] = []  # recent ids: context, then ids not yet fully released
        self._num_held_pushes = 0  # pushes since the text began to end in U+FFFD
        self._num_emitted_chars = 0  # characters of the window's text already returned

    def push(self, token_ids: list[int]) -> str:
        """The text that `token_ids` (appended to the sequence) newly decide; may be ""."""
        if not token_ids:
            return ""
        self._window_ids.extend(token_ids)
        text = self._decode(self._window_ids)
        if not text.endswith(REPLACEMENT_CHAR):
            delta = self._release(text)
            self._settle(text)
            return delta
        # A character may still be completing: count the pushes spent waiting for it (a push
        # is one engine step; counting its tokens would give up early on a batch of ids).
        ready = text.rstrip(REPLACEMENT_CHAR)
        self._num_held_pushes = 1 if len(ready) > self._num_emitted_chars else self._num_held_pushes + 1
        if self._num_held_pushes < self.max_held_pushes:
            return self._release(ready)
        delta = self._release(text)  # gave up waiting: release it, restart without context
        self._reset()
        return delta

    def flush(self) -> str:
        """Whatever is still held (a character that never completed, as U+FFFD) at the end."""
        delta = self._release(self._decode(self._window_ids)) if self._window_ids else ""
        self._reset()
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self, text: str) -> str:
        delta = text[self._num_emitted_chars :]
        self._num_emitted_chars = max(self._num_emitted_chars, len(text))
        return delta

    def _settle(self, text: str) -> None:
        """All of the window's `text` is out; slide the window if it has grown long.

        The tokens kept as context must decode to the end of `text` on their own: not starting
        inside a character (byte fallback would turn the whole byte run into U+FFFDs) and not
        only skipped special tokens (the next token would lose its leading space)."""
        self._num_held_pushes = 0
        ids = self._window_ids
        if len(ids) <= self.max_window_tokens:
            return
        for start in range(len(ids) - self.num_context_tokens, 0, -1):
            context_text = self._decode(ids[start:])
            if context_text and text.endswith(context_text):
                del ids[:start]
                self._num_emitted_chars = len(context_text)
                return
        if len(ids) > 4 * self.max_window_tokens:  # nothing decodes cleanly: drop the context
            self._reset()

    def _reset(self) -> None:
        self._window_ids = []
        self._num_held_pushes = 0
        self._num_emitted_chars = 0


class StopStringMatcher:
    """Finds stop strings in streamed text and says how much of the text is safe to emit.

    Text that could be the start of a stop string (a suffix of what was fed that is a prefix of
    some stop string, so at most `max(len(s)) - 1` characters) is held back until the next
    `feed` decides it. The stop that ends first in the text wins (on a tie, the one that starts
    first), as if the text had been checked one character at a time, so the result does not
    depend on how the text was cut into pieces. After a stop is found the matcher is done:
    later feeds return nothing.

    Text fed with `can_stop=False` (a sequence still short of its `min_tokens`) never ends a
    stop string there, as in vLLM; a stop string that begins in it and ends in text fed later
    still counts.
    """

    def __init__(self, stop: list[str], *, include_stop_str_in_output: bool) -> None:
        self.stop = [s for s in stop if s]  # an empty stop string would match everywhere
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_held_chars = max((len(s) for s in self.stop), default=1) - 1
        self.stop_str: str | None = None  # the stop string found, once found
        self._held = ""
        self._num_held_unstoppable = 0  # leading chars of `_held` in which no stop may end

    @property
    def is_stopped(self) -> bool:
        return self.stop_str is not None

    def feed(self, text: str, *, can_stop: bool = True) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string if this text completed one)."""
        if self.is_stopped:
            return "", None
        buffer = self._held + text
        found = self._first_stop(buffer, min_end=self._num_held_unstoppable + 1) if can_stop else None
        if found is not None:
            start, stop_str = found
            self.stop_str = stop_str
            self._held = ""
            end = start + len(stop_str) if self.include_stop_str_in_output else start
            return buffer[:end], stop_str
        num_held = self._num_chars_to_hold(buffer)
        self._held = buffer[len(buffer) - num_held :]
        self._num_held_unstoppable = 0 if can_stop else num_held
        return buffer[: len(buffer) - num_held], None

    def flush(self) -> str:
        """The held-back text, when generation ended without reaching a stop string."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str, *, min_end: int) -> tuple[int, str] | None:
        """The first stop string in `text` that ends at or after character `min_end`."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop_str in self.stop:
            start = text.find(stop_str, max(0, min_end - len(stop_str)))
            if start >= 0 and (best is None or (start + len(stop_str), start) < best[:2]):
                best = (start + len(stop_str), start, stop_str)
        return None if best is None else (best[1], best[2])

    def _num_chars_to_hold(self, text: str) -> int:
        """The length of the longest suffix of `text` that begins (and is shorter than) some stop
        string."""
        for length in range(min(len(text), self.max_held_chars), 0, -1):
            suffix = text[-length:]
            if any(len(stop_str) > length and stop_str.startswith(suffix) for stop_str in self.stop):
                return length
        return 0
