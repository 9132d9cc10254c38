"""Every message that crosses the frontend <-> engine-core socket.

One tagged union per direction, msgpack-encoded, decoded by one typed decoder each.
Array-like Structs are positional on the wire: append fields, never reorder them.
"""

from __future__ import annotations

import enum
from typing import Literal, Union

import msgspec


class FinishReason(enum.IntEnum):
    """Why a sequence ended. The frontend maps these to OpenAI's strings."""

    STOP = 0  # EOS, a stop token id or a completed grammar (a stop string never comes here: the
    # frontend finds it, ends the choice itself and aborts the sequence, which then gets ABORT)
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # aborted by the frontend (client gone, stop string found)
    ERROR = 3  # the request can never be served (e.g. it does not fit the KV cache)


class FinishCause(enum.IntEnum):
    """Which condition ended a sequence: finer than FinishReason, so the frontend need not
    decide it again (e.g. whether the last token is the EOS or stop token that adds no text)."""

    EOS = 0  # one of the request's EOS ids (never with ignore_eos)
    STOP_TOKEN = 1  # one of stop_token_ids; stop_reason says which
    GRAMMAR_END = 2  # the structured output's grammar could go no further
    LENGTH = 3  # max_tokens or max_model_len reached
    ABORT = 4  # aborted by the frontend
    ERROR = 5  # the request can never be served; error says why
    POOLED = 6  # a pooling request's prompt is computed; its vector is the output's `pooled`

    @property
    def finish_reason(self) -> FinishReason:
        return _FINISH_REASONS[self]


_FINISH_REASONS = {
    FinishCause.EOS: FinishReason.STOP,
    FinishCause.STOP_TOKEN: FinishReason.STOP,
    FinishCause.GRAMMAR_END: FinishReason.STOP,
    FinishCause.LENGTH: FinishReason.LENGTH,
    FinishCause.ABORT: FinishReason.ABORT,
    FinishCause.ERROR: FinishReason.ERROR,
    FinishCause.POOLED: FinishReason.STOP,
}


class StructuredOutputKind(enum.IntEnum):
    JSON_SCHEMA = 0  # spec: a JSON Schema document
    JSON_OBJECT = 1  # any JSON object; spec unused
    REGEX = 2  # spec: a regular expression the whole output matches
    GRAMMAR = 3  # spec: a Lark grammar (llguidance's dialect, which may embed %json schemas)


class StructuredOutputSpec(msgspec.Struct, array_like=True, frozen=True):
    """What the output must be. The frontend has checked that it compiles (see
    `ipc.shared.structured_output`); the engine compiles it against the vocabulary."""

    kind: StructuredOutputKind
    spec: str = ""


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Validated by the frontend; the engine trusts these values."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per sampled token; None: no logprobs
    prompt_logprobs: int | None = None  # top alternatives per prompt token; None: none
    n: int = 1
    best_of: int | None = None  # candidates to generate; the n best are returned
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    structured_output: StructuredOutputSpec | None = None  # constrains generation; None: free
    cache_salt: str | None = None  # only requests with the same salt share prefix-cache blocks
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_candidates(self) -> int:
        return max(self.n, self.best_of or 0)


class PoolingParams(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Marks a pooling request (`--runner pooling`): its prompt is computed (prefill only, no
    token is sampled) and its final-normed hidden states are pooled the way the engine's
    `pooler_type` says, into one vector."""

    normalize: bool = True  # L2-normalize the pooled vector


class EngineCoreRequest(msgspec.Struct, tag="request", array_like=True):
    """One prompt of an API request, validated by the frontend, which answers a bad field with a
    400 naming it. The engine checks again, on purpose, what would corrupt its state: a request
    id in use, an empty prompt, a prompt that fills the context or the KV cache (only the engine
    knows the latter), token ids outside the vocabulary, structured output with beam search. A
    failed check is one `FinishReason.ERROR` output (a 400), never an exception, so no caller
    (the frontend, an in-process test or the Python API) can crash the engine with a request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    pooling: PoolingParams | None = None  # set: a pooling request (sampling_params unused but max_tokens 0)


class EngineCoreAbort(msgspec.Struct, tag="abort", array_like=True):
    """Idempotent: unknown or finished requests and sequences are ignored.

    Without `indices` every sequence of each request is aborted. With `indices` (parallel to
    `request_ids`) only sequence `indices[k]` of `request_ids[k]` is, e.g. one of n choices that
    hit a stop string. Each sequence that was still live gets a final output with ABORT.
    """

    request_ids: list[str]
    indices: list[int] | None = None


class TokenLogprobs(msgspec.Struct, array_like=True):
    """The logprob of one chosen token and the top alternatives at its position."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of token_id in the distribution
    top_token_ids: list[int]
    top_logprobs: list[float]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What is new for one sequence of one request since the previous step."""

    request_id: str
    index: int  # which of the request's n sequences
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended the sequence
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first entry is None
    error: str | None = None  # set with FinishReason.ERROR
    cumulative_logprob: float | None = None
    num_generated_tokens: int | None = None  # all candidates' tokens, on the final output
    # on a request's first output: seconds from its arrival in the engine to its first step
    queue_time_s: float | None = None
    # on each choice's first and final outputs, with prefix caching on: prompt tokens the request
    # found in the cache
    num_cached_tokens: int | None = None
    finish_cause: FinishCause | None = None  # with finish_reason, from the engine: which condition
    # a pooling request's vector (FinishCause.POOLED): float32 little-endian, hidden_size of them
    pooled: bytes | None = None


class SchedulerStats(msgspec.Struct, array_like=True):
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    num_preemptions: int  # since start
    num_prompt_tokens_computed: int  # since start
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hit_tokens: int = 0  # of those, found there (not computed)
    num_prompt_tokens: int = 0  # since start: whole prompts of requests whose prefill finished (vLLM's count)


class EngineReady(msgspec.Struct, tag="ready", array_like=True):
    model_name: str
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    hidden_size: int = 0  # the length of a pooled vector


class EngineCoreOutputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    timestamp: float


class EngineDead(msgspec.Struct, tag="dead", array_like=True):
    reason: str


FrontendToEngine = Union[EngineCoreRequest, EngineCoreAbort]
EngineToFrontend = Union[EngineReady, EngineCoreOutputs, EngineDead]

_encoder = msgspec.msgpack.Encoder()
_to_engine_decoder = msgspec.msgpack.Decoder(FrontendToEngine)
_to_frontend_decoder = msgspec.msgpack.Decoder(EngineToFrontend)


def encode(message: FrontendToEngine | EngineToFrontend) -> bytes:
    return _encoder.encode(message)


def decode_to_engine(data: bytes) -> FrontendToEngine:
    return _to_engine_decoder.decode(data)


def decode_to_frontend(data: bytes) -> EngineToFrontend:
    return _to_frontend_decoder.decode(data)
