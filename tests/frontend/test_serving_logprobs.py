"""Token bytes and strings for logprobs, for byte-level and SentencePiece vocabularies."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from frontend.serving_logprobs import TokenStrings, clamp_logprob


def test_byte_level_tokens_give_exact_bytes_even_for_part_of_a_character(tokenizer):
    strings = TokenStrings(tokenizer)
    ids = tokenizer.encode("日本 🙂", add_special_tokens=False)
    assert b"".join(strings.bytes_of(i) for i in ids) == "日本 🙂".encode()
    assert strings.bytes_of(2) == b"<|im_end|>" and strings.text_of(2) == "<|im_end|>"


def sentencepiece_like() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "\u2581hello": 1, "world": 2, "<0xE2>": 3, "<0x82>": 4, "<0xAC>": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_sentencepiece_pieces_map_spaces_and_byte_tokens():
    strings = TokenStrings(sentencepiece_like())
    assert strings.bytes_of(1) == b" hello"
    assert strings.bytes_of(2) == b"world"
    assert b"".join(strings.bytes_of(i) for i in (3, 4, 5)) == "€".encode()
    assert strings.text_of(3) == "\ufffd"  # a lone lead byte has no printable spelling


def test_minus_infinity_is_clamped_for_json():
    assert clamp_logprob(float("-inf")) == -9999.0
    assert clamp_logprob(-1.5) == -1.5
