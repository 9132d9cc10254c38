"""OpenAI's request and response schemas as msgspec Structs, with OpenAI's own names.

Requests accept unknown fields (clients send fields we do not implement, as vLLM accepts them);
`ignored_fields` names them so that the app logs them. Types are checked
by msgspec when a body is decoded; value ranges are checked in `serving`, which knows the
model's limits. Parameters beyond OpenAI's (`top_k`, `min_tokens`, `use_beam_search`, ...)
follow vLLM's OpenAI server.

An optional request field sent as `null` means its default, as in OpenAI's API: every
request field with a default is typed `T | None`, and `RequestStruct` replaces a null by the
field's declared default once the object is built.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Literal

import msgspec

# ---------------------------------------------------------------------------------------
# Shared request pieces


class RequestStruct(msgspec.Struct):
    """A request object: a null in a field whose default is not None becomes that default."""

    def __post_init__(self) -> None:
        for name, default in _null_means_default(type(self)):
            if getattr(self, name) is None:
                setattr(self, name, default)


@functools.cache
def _null_means_default(cls: type[msgspec.Struct]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (f.name, f.default)
        for f in msgspec.structs.fields(cls)
        if f.default is not None and f.default is not msgspec.NODEFAULT
    )


class StreamOptions(RequestStruct):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class FunctionDefinition(RequestStruct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestStruct):
    function: FunctionDefinition
    type: Literal["function"] | None = "function"


class NamedFunction(RequestStruct):
    name: str


class NamedToolChoice(RequestStruct):
    function: NamedFunction
    type: Literal["function"] | None = "function"


class JsonSchemaFormat(RequestStruct):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(RequestStruct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(RequestStruct):
    """vLLM's `structured_outputs`: one constraint (see `serving_structured_outputs`)."""

    json: str | dict[str, Any] | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF/EBNF
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    whitespace_pattern: str | None = None  # JSON whitespace instead of the fixed layout


class SamplingRequestFields(RequestStruct, kw_only=True):
    """The sampling parameters shared by both generation endpoints."""

    model: str | None = None
    n: int | None = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    max_tokens: int | None = None
    min_tokens: int | None = 0
    ignore_eos: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    skip_special_tokens: bool | None = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    use_beam_search: bool | None = False
    length_penalty: float | None = 1.0
    early_stopping: bool | Literal["never"] | None = False
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks are shared only under the same salt
    # Structured outputs: at most one constraint (see `serving_structured_outputs`).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored (logged): llguidance decides
    prompt_logprobs: int | None = None  # vLLM's: top alternatives per prompt token
    return_token_ids: bool | None = False  # vLLM's: prompt and completion token ids in the response


_TOP_LEVEL_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
# Decoded but changing nothing: vLLM's choice of grammar backend (llguidance is the only one here).
_ACCEPTED_AND_IGNORED = {"guided_decoding_backend"}


def ignored_fields(body: bytes, request: SamplingRequestFields) -> list[str]:
    """The fields of `body` (already decoded as `request`) that this server ignores, to be logged:
    those its schema does not know (msgspec skips them, as vLLM accepts them) and those it accepts
    only for compatibility. A field inside `structured_outputs` is named with a dot."""
    fields = _TOP_LEVEL_FIELDS.decode(body)
    known = type(request).__struct_fields__
    ignored = [name for name in fields if name not in known
               or (name in _ACCEPTED_AND_IGNORED and getattr(request, name) is not None)]
    if request.structured_outputs is not None:
        nested = _TOP_LEVEL_FIELDS.decode(fields["structured_outputs"])
        ignored += [f"structured_outputs.{name}" for name in nested if name not in StructuredOutputsParams.__struct_fields__]
    return ignored


# ---------------------------------------------------------------------------------------
# Completions


class CompletionRequest(SamplingRequestFields, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists. msgspec
    # allows one array type per union, so the element shapes are checked in `serving`.
    prompt: str | list[str | int | list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None


class CompletionLogProbs(msgspec.Struct):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class PromptLogprob(msgspec.Struct):
    """vLLM's `Logprob`: one token's entry in `prompt_logprobs`, keyed by its id."""

    logprob: float
    rank: int | None = None  # 1-based, in the model's distribution at that position
    decoded_token: str | None = None


# One entry per prompt token (the first is null: nothing predicts it): token id -> its logprob,
# the prompt's own token and the top alternatives.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionResponseChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked
    prompt_token_ids: list[int] | None = None  # with return_token_ids
    token_ids: list[int] | None = None  # with return_token_ids


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class CompletionTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0  # tokens of the think block, with --reasoning-parser


class UsageInfo(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # when the engine caches prefixes
    completion_tokens_details: CompletionTokensDetails | None = None  # with --reasoning-parser


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids, on a choice's first chunk
    token_ids: list[int] | None = None  # with return_token_ids: this chunk's


class CompletionStreamResponse(msgspec.Struct, omit_defaults=True):
    # Only `usage` has a default, so it is the only field ever omitted.
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------------------
# Chat completions


class ContentPart(RequestStruct):
    # Not a tagged union: an unsupported part (an image) gets a clear 400 from `serving`
    # rather than a schema error.
    type: str
    text: str | None = None


class FunctionCall(RequestStruct):
    name: str
    arguments: str


class ToolCall(RequestStruct):
    id: str
    function: FunctionCall
    type: Literal["function"] | None = "function"


class ChatMessage(RequestStruct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingRequestFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None


class ChatCompletionTopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProb(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatCompletionTopLogprob] = []


class ChatCompletionLogProbs(msgspec.Struct):
    content: list[ChatCompletionLogProb] | None = None


class ChatResponseMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None  # no default: always present, null when empty
    tool_calls: list[ToolCall] | None = None
    # with --reasoning-parser, the think block: vLLM's older and newer names for the same text
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatCompletionResponseChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class DeltaFunctionCall(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, omit_defaults=True):
    """A fragment of a streamed tool call: the first names it, later ones add arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning_content: str | None = None  # with --reasoning-parser; `reasoning` is the same text
    reasoning: str | None = None


class ChatCompletionStreamChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids: this chunk's


class ChatCompletionStreamResponse(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids, on the first chunk


# ---------------------------------------------------------------------------------------
# Models, tokenizer utilities, errors


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    owned_by: str = "furiosa-llm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeRequest(RequestStruct, kw_only=True):
    """vLLM's /tokenize: exactly one of `prompt` and `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeRequest(RequestStruct, kw_only=True):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class VersionResponse(msgspec.Struct):
    version: str


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo
