"""Constrained generation: a grammar matcher per constrained sequence, a token mask per step.

A request with `structured_output` gets an llguidance matcher, compiled from the spec against
the model's vocabulary (read from the artifact on first use, see `ipc.shared.vocabulary`). Each step,
`apply_grammar_masks` sets the logits of the tokens the grammar does not allow next to -inf,
for the constrained rows only; the engine then feeds the sampled token back (`accept`). The
request's EOS ids are allowed exactly when the grammar accepts what was generated, and when the
grammar can go no further the sequence is finished. Rows without a grammar cost one attribute
check per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ipc.messages import StructuredOutputSpec
from ipc.shared.structured_output import StructuredOutputError, grammar_for
from ipc.shared.vocabulary import Vocabulary

if TYPE_CHECKING:
    from engine_core.request import Sequence


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, eos_token_id: int) -> None:
        self._matcher = matcher  # llguidance.LLMatcher
        self.eos_token_id = eos_token_id  # the tokenizer EOS the matcher allows when accepting

    def fork(self) -> "GrammarMatcher":
        return GrammarMatcher(self._matcher.deep_copy(), self.eos_token_id)

    def fill_mask(self, pointer: int, num_bytes: int) -> None:
        """Writes the allowed-token bitmask (bit i of 32-bit word i // 32) at `pointer`."""
        self._matcher.unsafe_compute_mask_ptr(pointer, num_bytes)

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False if the grammar does not allow it."""
        return self._matcher.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """Nothing but EOS can follow: the output is complete."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class StructuredOutputManager:
    """Compiles specs against the vocabulary, which is read once, when first needed."""

    def __init__(self, load_vocabulary: Callable[[], Vocabulary], vocab_size: int) -> None:
        self._load_vocabulary = load_vocabulary
        self.vocab_size = vocab_size  # the model's logits width
        self._tokenizer = None  # llguidance.LLTokenizer
        self._eos_token_id = 0

    def matcher_for(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        """A fresh matcher; raises StructuredOutputError if the spec does not compile."""
        import llguidance

        tokenizer = self._llg_tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, grammar_for(spec), log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(matcher.get_error())
        return GrammarMatcher(matcher, self._eos_token_id)

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer(self._load_vocabulary())
        return self._tokenizer

    def _build_tokenizer(self, vocabulary: Vocabulary):
        import llguidance

        # The mask must cover every logit: ids the tokenizer lacks (a padded embedding) are
        # empty tokens, which no grammar allows; ids beyond the logits are never sampled.
        token_bytes = (vocabulary.token_bytes + [b""] * self.vocab_size)[: self.vocab_size]
        special = [i for i in vocabulary.special_token_ids if i < self.vocab_size]
        eos = vocabulary.eos_token_id
        if eos is None or eos >= self.vocab_size:
            eos = special[0] if special else 0
        self._eos_token_id = eos
        source = _VocabularyTokenizer(token_bytes, special, eos)
        source.llg_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(source))
        return source.llg_tokenizer


class _VocabularyTokenizer:
    """What llguidance's TokenizerWrapper reads. Masks never tokenize text; should llguidance
    ask, its own greedy tokenization over these tokens is good enough."""

    bos_token_id = None

    def __init__(self, token_bytes: list[bytes], special_token_ids: list[int], eos_token_id: int) -> None:
        self.tokens = token_bytes
        self.special_token_ids = special_token_ids
        self.eos_token_id = eos_token_id
        self.llg_tokenizer = None

    def __call__(self, text: bytes) -> list[int]:
        if self.llg_tokenizer is None:
            return []
        return self.llg_tokenizer.greedy_tokenize(text.decode("utf-8", errors="replace"))


def apply_grammar_masks(logits: np.ndarray, seqs: list[Sequence]) -> None:
    """Sets to -inf, in place, the logits of the tokens each constrained row's grammar does not
    allow next (`logits[i]` belongs to `seqs[i]`); EOS follows the grammar's acceptance."""
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if not rows:
        return
    vocab_size = logits.shape[1]
    num_words = (vocab_size + 31) // 32
    bitmask = np.zeros((len(rows), num_words), dtype=np.int32)
    row_bytes = num_words * 4
    for k, i in enumerate(rows):
        seqs[i].grammar.fill_mask(bitmask.ctypes.data + k * row_bytes, row_bytes)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    for k, i in enumerate(rows):
        eos_ids = list(seqs[i].request.eos_token_ids)  # all in the vocabulary (see Request)
        if eos_ids:
            allowed[k, eos_ids] = allowed[k, seqs[i].grammar.eos_token_id]
        logits[i] += _MASK_BIAS[allowed[k]]  # in place on the row; cheaper than a masked store


_MASK_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # by allowed bit
