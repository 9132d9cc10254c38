"""Token strings for logprobs: the exact bytes of a token, and a printable spelling; vLLM's
`prompt_logprobs` built from the engine's entries."""

from __future__ import annotations

from tokenizers import decoders
from transformers import PreTrainedTokenizerFast

from frontend.protocol import PromptLogprob, PromptLogprobs
from ipc.messages import TokenLogprobs
from ipc.shared.vocabulary import byte_level_bytes, sentencepiece_bytes

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same value


class TokenStrings:
    """The exact bytes of each token, and a printable string for it (cached per token id).

    A byte-level BPE token may hold part of a UTF-8 character; its `bytes` are still exact.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._is_byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}

    def bytes_of(self, token_id: int) -> bytes:
        data = self._cache.get(token_id)
        if data is None:
            data = self._cache[token_id] = self._compute_bytes(token_id)
        return data

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def _compute_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        return byte_level_bytes(piece) if self._is_byte_level else sentencepiece_bytes(piece)


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def prompt_logprobs(
    token_strings: TokenStrings, token_ids: list[int], entries: list[TokenLogprobs | None] | None, num_top: int
) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: per prompt token, its own logprob and its position's top
    `num_top` alternatives, keyed by token id (null for the first token, which nothing predicts)."""
    if entries is None:
        return None
    result: PromptLogprobs = []
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            result.append(None)
            continue
        ranked = {token_id: (entry.logprob, entry.rank)}
        for rank, (top_id, top_logprob) in enumerate(zip(entry.top_token_ids[:num_top], entry.top_logprobs), 1):
            ranked.setdefault(top_id, (top_logprob, rank))
        result.append({
            str(top_id): PromptLogprob(clamp_logprob(logprob), rank, token_strings.text_of(top_id))
            for top_id, (logprob, rank) in ranked.items()
        })
    return result
