"""OpenAI's Embeddings API (`POST /v1/embeddings`) as msgspec Structs, with vLLM's extensions
(`truncate_prompt_tokens`, `add_special_tokens`). Value ranges are checked in
`serving_embeddings`, which knows the model's limits."""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from frontend.protocol import RequestStruct


class EmbeddingRequest(RequestStruct, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists. msgspec
    # allows one array type per union, so the element shapes are checked in `serving_embeddings`.
    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None  # the first N components, renormalized (Matryoshka)
    user: str | None = None
    # vLLM's: keep the last N tokens of an input that is longer (-1: the model's context)
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = True  # vLLM's: the tokenizer's BOS/EOS around a text input


class EmbeddingData(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "list"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


_TOP_LEVEL_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def ignored_embedding_fields(body: bytes, request: EmbeddingRequest) -> list[str]:
    """The fields of `body` this server does not know (msgspec skips them), to be logged."""
    return [name for name in _TOP_LEVEL_FIELDS.decode(body) if name not in EmbeddingRequest.__struct_fields__]
