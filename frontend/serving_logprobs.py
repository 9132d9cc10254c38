"""Token strings for logprobs: the exact bytes of a token, and a printable spelling."""

from __future__ import annotations

from tokenizers import decoders
from transformers import PreTrainedTokenizerFast

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
        if self._is_byte_level:
            try:
                return bytes(_BYTE_DECODER[c] for c in piece)
            except KeyError:
                return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of the 256 bytes, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)
