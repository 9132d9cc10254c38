"""The Responses API's request, response and stream-event schemas as msgspec Structs.

Requests follow `protocol`'s rules (unknown fields accepted and named in one warning, a null
means the default). Input items and tools are flat Structs rather than tagged unions, so that an
item or tool this server does not support gets a 400 from `serving_responses` naming it, not a
schema error. Output items and stream events are tagged by their `type`, as OpenAI spells them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from frontend.protocol import RequestStruct

# ---------------------------------------------------------------------------------------
# Request


class ResponsesContentPart(RequestStruct):
    type: str  # input_text, output_text (an assistant turn sent back); others are refused
    text: str | None = None


class ResponsesInputItem(RequestStruct, kw_only=True):
    """A message (`role` and `content`), a `function_call` or a `function_call_output`."""

    type: str | None = None  # a message may leave it out
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[ResponsesContentPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ResponsesContentPart] | None = None


class ResponsesTool(RequestStruct, kw_only=True):
    """A function tool in the Responses shape: flat, no nested `function` object."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoice(RequestStruct, kw_only=True):
    type: str  # "function" (a named one); other kinds are refused
    name: str | None = None


class ResponsesTextFormat(RequestStruct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesTextConfig(RequestStruct, kw_only=True):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None  # accepted and ignored


class ResponsesRequest(RequestStruct, kw_only=True):
    input: str | list[ResponsesInputItem]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = True
    text: ResponsesTextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    stream: bool | None = False
    store: bool | None = False  # this server keeps no responses (see `serving_responses`)
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    reasoning: dict[str, Any] | None = None
    # vLLM's extensions, as on chat
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


_TOP_LEVEL_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def ignored_response_fields(body: bytes, request: ResponsesRequest) -> list[str]:
    """Fields of `body` this server does not use, for the one warning a request gets: unknown
    ones, and known ones that change nothing here (`store` true: nothing is kept)."""
    known = ResponsesRequest.__struct_fields__
    ignored = [name for name in _TOP_LEVEL_FIELDS.decode(body) if name not in known]
    if request.store:
        ignored.append("store")
    if request.include:
        ignored.append("include")
    if request.reasoning:
        ignored.append("reasoning")
    if request.truncation not in (None, "disabled"):
        ignored.append("truncation")
    if request.text is not None and request.text.verbosity is not None:
        ignored.append("text.verbosity")
    return ignored


# ---------------------------------------------------------------------------------------
# Response


class ResponseOutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []


class ResponseOutputMessage(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: str = "assistant"
    content: list[ResponseOutputText] = []


class ResponseFunctionCall(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text"):
    text: str


class ResponseReasoningItem(msgspec.Struct, tag_field="type", tag="reasoning", kw_only=True):
    """The think block, with --reasoning-parser."""

    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[Any] = []
    content: list[ResponseReasoningText] = []


ResponseOutputItem = ResponseOutputMessage | ResponseFunctionCall | ResponseReasoningItem


class ResponseFunctionTool(msgspec.Struct, tag_field="type", tag="function", kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseNamedToolChoice(msgspec.Struct, tag_field="type", tag="function"):
    name: str


class ResponseTextFormatEcho(msgspec.Struct, omit_defaults=True):
    type: str  # always sent
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseTextEcho(msgspec.Struct):
    format: ResponseTextFormatEcho = msgspec.field(default_factory=lambda: ResponseTextFormatEcho("text"))


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0  # with --reasoning-parser


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: str


class ResponseError(msgspec.Struct):
    code: str
    message: str


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    created_at: int
    model: str
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    output: list[ResponseOutputItem] = []
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    metadata: dict[str, str] = {}
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | ResponseNamedToolChoice = "auto"
    tools: list[ResponseFunctionTool] = []
    text: ResponseTextEcho = msgspec.field(default_factory=ResponseTextEcho)
    truncation: str = "disabled"
    store: bool = False
    background: bool = False
    user: str | None = None
    usage: ResponseUsage | None = None


# ---------------------------------------------------------------------------------------
# Stream events: each carries `sequence_number`, counting from 0 in its stream.


class _Event(msgspec.Struct, kw_only=True, tag_field="type"):
    sequence_number: int = 0


class ResponseCreatedEvent(_Event, tag="response.created"):
    response: ResponseObject


class ResponseInProgressEvent(_Event, tag="response.in_progress"):
    response: ResponseObject


class ResponseCompletedEvent(_Event, tag="response.completed"):
    response: ResponseObject


class ResponseIncompleteEvent(_Event, tag="response.incomplete"):
    response: ResponseObject


class ResponseFailedEvent(_Event, tag="response.failed"):
    response: ResponseObject


class OutputItemAddedEvent(_Event, tag="response.output_item.added"):
    output_index: int
    item: ResponseOutputItem


class OutputItemDoneEvent(_Event, tag="response.output_item.done"):
    output_index: int
    item: ResponseOutputItem


class ContentPartAddedEvent(_Event, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: ResponseOutputText


class ContentPartDoneEvent(_Event, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: ResponseOutputText


class OutputTextDeltaEvent(_Event, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class OutputTextDoneEvent(_Event, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class FunctionCallArgumentsDeltaEvent(_Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(_Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ReasoningTextDeltaEvent(_Event, tag="response.reasoning_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDoneEvent(_Event, tag="response.reasoning_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str


ResponseStreamEvent = (
    ResponseCreatedEvent | ResponseInProgressEvent | ResponseCompletedEvent | ResponseIncompleteEvent
    | ResponseFailedEvent | OutputItemAddedEvent | OutputItemDoneEvent | ContentPartAddedEvent
    | ContentPartDoneEvent | OutputTextDeltaEvent | OutputTextDoneEvent | FunctionCallArgumentsDeltaEvent
    | FunctionCallArgumentsDoneEvent | ReasoningTextDeltaEvent | ReasoningTextDoneEvent
)
