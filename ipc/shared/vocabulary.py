"""The exact bytes of every token of a model's vocabulary, read from its artifact.

Grammar masks need to know which bytes each token id stands for, nothing more: no merges, no
pre-tokenizer, no tokenizer object. The engine core reads them here from the same files the
frontend's tokenizer comes from (a GGUF file's `tokenizer.ggml.*` metadata, or a Hugging Face
directory's tokenizer.json), and the frontend spells logprob tokens with the same rules:

- byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen): each character of a token's spelling stands
  for one byte (`BYTE_DECODER`);
- SentencePiece-style (Llama 2, Mistral, TinyLlama, Gemma, Phi-3): `▁` is a space and `<0xNN>`
  is byte NN (Gemma's whitespace pieces, stored as real spaces, are user-defined: their text);
- added and control tokens are their text; control tokens are "special": a grammar's text
  never matches them.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

# llama.cpp's token types (`tokenizer.ggml.token_type`)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_BYTE = 6
SENTENCEPIECE_SPACE = "\u2581"


class VocabularyError(ValueError):
    """The artifact's vocabulary cannot be read; the message names the file."""


@dataclass(frozen=True)
class Vocabulary:
    token_bytes: list[bytes]  # by token id
    special_token_ids: list[int]
    eos_token_id: int | None

    @property
    def size(self) -> int:
        return len(self.token_bytes)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of the 256 bytes, inverted: printable bytes stand for
    themselves, the others for the characters from U+0100 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    decoder = {chr(b): b for b in printable}
    num_shifted = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + num_shifted)] = b
            num_shifted += 1
    return decoder


BYTE_DECODER = _byte_decoder()


def byte_level_bytes(piece: str) -> bytes:
    """A byte-level BPE token's bytes; a spelling outside the byte alphabet is its own text."""
    try:
        return bytes(BYTE_DECODER[c] for c in piece)
    except KeyError:
        return piece.encode()


def sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace(SENTENCEPIECE_SPACE, " ").encode()


def read_vocabulary(path: str) -> Vocabulary:
    """The vocabulary of a GGUF file or of a Hugging Face directory's tokenizer.json."""
    if os.path.isdir(path):
        return _read_tokenizer_json(path)
    return _read_gguf(path)


# ---- GGUF


def _read_gguf(path: str) -> Vocabulary:
    try:
        metadata = read_gguf_metadata(path, _GGUF_KEYS)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise VocabularyError(f"{path}: not a readable GGUF file: {exc}") from exc
    tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise VocabularyError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    types = metadata.get("tokenizer.ggml.token_type") or []
    types = types if len(types) == len(tokens) else [1] * len(tokens)
    model = metadata.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise VocabularyError(f"{path}: tokenizer model {model!r} is not supported (only 'gpt2' and 'llama')")
    normal = byte_level_bytes if model == "gpt2" else sentencepiece_bytes
    token_bytes = [
        piece.encode() if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED) else normal(piece)
        for piece, kind in zip(tokens, types)
    ]
    special = [i for i, kind in enumerate(types) if kind == TOKEN_TYPE_CONTROL]
    return Vocabulary(token_bytes, special, metadata.get("tokenizer.ggml.eos_token_id"))


_GGUF_KEYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id"}

# GGUF value types: fixed-size scalars by their struct format; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str, keys: set[str] | Callable[[str], bool]) -> dict:
    """The values of `keys` (a set, or a predicate on key names) from a GGUF file's key-value
    section (little-endian, version 2+).

    `gguf.GGUFReader` also makes a numpy view of every array element, which takes seconds for
    a 49k-token vocabulary and its merges; walking the section with struct takes milliseconds.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, _, num_kv = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"not a GGUF v2+ file (magic {magic!r}, version {version})")
        reader = _GgufValues(data, 24)
        is_wanted = keys.__contains__ if isinstance(keys, set) else keys
        found = {}
        for _ in range(num_kv):
            key = reader.string()
            (value_type,) = reader.unpack("<I")
            if is_wanted(key):
                found[key] = reader.value(value_type)
            else:
                reader.skip(value_type)
        return found


class _GgufValues:
    def __init__(self, data, offset: int) -> None:
        self.data = data
        self.offset = offset

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        text = bytes(self.data[self.offset : self.offset + length]).decode("utf-8", errors="replace")
        self.offset += length
        return text

    def value(self, value_type: int):
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type == _GGUF_ARRAY:
            element_type, count = self.unpack("<IQ")
            if element_type in _GGUF_SCALARS:
                return list(self.unpack(f"<{count}{_GGUF_SCALARS[element_type]}"))
            return [self.value(element_type) for _ in range(count)]
        return self.unpack("<" + _GGUF_SCALARS[value_type])[0]

    def skip(self, value_type: int) -> None:
        if value_type == _GGUF_STRING:
            (length,) = self.unpack("<Q")
            self.offset += length
        elif value_type == _GGUF_ARRAY:
            element_type, count = self.unpack("<IQ")
            if element_type in _GGUF_SCALARS:
                self.offset += count * struct.calcsize("<" + _GGUF_SCALARS[element_type])
            else:
                for _ in range(count):
                    self.skip(element_type)
        else:
            self.offset += struct.calcsize("<" + _GGUF_SCALARS[value_type])


# ---- Hugging Face tokenizer.json


def _read_tokenizer_json(model_dir: str) -> Vocabulary:
    path = os.path.join(model_dir, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        pieces = _model_pieces(data["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VocabularyError(f"{path}: cannot read the vocabulary: {exc}") from exc
    added = {token["id"]: token for token in data.get("added_tokens") or []}
    size = max([*pieces, *added], default=-1) + 1
    normal = byte_level_bytes if _is_byte_level(data.get("decoder")) else sentencepiece_bytes
    token_bytes = [b""] * size
    for token_id, piece in pieces.items():
        token_bytes[token_id] = normal(piece)
    for token_id, token in added.items():
        token_bytes[token_id] = token["content"].encode()
    special = sorted(i for i, token in added.items() if token.get("special"))
    eos = _eos_id(model_dir, {token["content"]: i for i, token in added.items()})
    return Vocabulary(token_bytes, special, eos)


def _model_pieces(model: dict) -> dict[int, str]:
    vocab = model["vocab"]
    if isinstance(vocab, dict):  # BPE, WordPiece
        return {token_id: piece for piece, token_id in vocab.items()}
    return {token_id: entry[0] for token_id, entry in enumerate(vocab)}  # Unigram: [piece, score]


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(d) for d in decoder.get("decoders") or [])


def _eos_id(model_dir: str, added_ids: dict[str, int]) -> int | None:
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError) as exc:
        raise VocabularyError(f"{path}: cannot read it: {exc}") from exc
    if isinstance(eos, dict):
        eos = eos.get("content")
    return added_ids.get(eos) if isinstance(eos, str) else None
