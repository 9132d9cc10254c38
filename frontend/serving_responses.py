"""POST /v1/responses: a Responses request run as the chat completion it amounts to.

A request becomes a `ChatCompletionRequest` (`instructions` the system message, input items
the conversation, `function_call` / `function_call_output` items an assistant's tool calls and
the tool messages, flat function tools the chat `tools`, `text.format` the `response_format`),
so the chat endpoint's preparation applies as it is: the chat template, sampling defaults and
validation, `serving_tools`' plan for tool_choice and `serving_structured_outputs`. The chat
job's deltas, read through its reasoning parser (a `reasoning` item, with --reasoning-parser) and
its tool-call parser, become output items (`ResponseOutputBuilder`).

A response and a stream are built by the same loop (`ResponseRun.events`): a non-streamed
request runs it and keeps the final response, so the two never disagree. The server is
stateless: `store` keeps nothing, and `previous_response_id` or `conversation` is a 400.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator

import msgspec

from frontend.errors import OpenAIError, bad_request, internal_error
from frontend.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)
from frontend.protocol_responses import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    IncompleteDetails,
    InputTokensDetails,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    OutputTokensDetails,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseError,
    ResponseFailedEvent,
    ResponseFunctionCall,
    ResponseFunctionTool,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseNamedToolChoice,
    ResponseObject,
    ResponseOutputItem,
    ResponseOutputMessage,
    ResponseOutputText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    ResponseReasoningItem,
    ResponseReasoningText,
    ResponsesContentPart,
    ResponsesInputItem,
    ResponsesRequest,
    ResponseTextEcho,
    ResponseTextFormatEcho,
    ResponseUsage,
)
from frontend.serving_chat import ChatJob, OpenAIServingChat
from frontend.sse import sse_stream
from frontend.tool_parsers import ParsedDelta, ToolCallDelta

logger = logging.getLogger(__name__)

# The chat request's field names in errors, as the Responses request spells them.
_PARAM_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class OpenAIServingResponses:
    """The Responses API over the chat endpoint's serving (its template, limits and admission)."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create_response(self, request: ResponsesRequest) -> ResponseObject | AsyncIterator[bytes]:
        chat_request = chat_request_from(request)
        try:
            job = await self.chat.prepare(chat_request)
        except OpenAIError as exc:
            raise _in_responses_terms(exc) from None
        run = ResponseRun(job, request, model=self.chat.model_name)
        if request.stream:
            return sse_stream(run.events(), frame=sse_typed_event, done=None)
        return await run.collect()


def sse_typed_event(event: msgspec.Struct) -> bytes:
    """A Responses stream event as OpenAI frames it: `event: <type>` then `data: <json>`."""
    kind = type(event).__struct_config__.tag
    return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


def _in_responses_terms(exc: OpenAIError) -> OpenAIError:
    param = exc.param
    if param is not None:
        head, dot, rest = param.partition(".")
        head = head.split("[", 1)[0]
        if head in _PARAM_NAMES:
            param = _PARAM_NAMES[head] if head == "messages" else _PARAM_NAMES[head] + dot + rest
    message = exc.message
    for chat_name, name in _PARAM_NAMES.items():
        if chat_name != "messages":
            message = message.replace(chat_name, name)
    renamed = OpenAIError(exc.status, message, type=exc.type, param=param, code=exc.code, headers=exc.headers)
    return renamed


# ---------------------------------------------------------------------------------------
# Request -> chat request


def chat_request_from(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion a Responses request amounts to, or a 400 naming what cannot be."""
    if request.previous_response_id is not None:
        raise bad_request(
            "previous_response_id is not supported: this server does not keep responses (it is "
            "stateless, as with store=false). Send the whole conversation in `input`.",
            param="previous_response_id",
        )
    if request.conversation is not None:
        raise bad_request(
            "conversation is not supported: this server does not keep conversations. Send the whole "
            "conversation in `input`.",
            param="conversation",
        )
    return ChatCompletionRequest(
        messages=_messages(request),
        model=request.model,
        max_completion_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        seed=request.seed,
        repetition_penalty=request.repetition_penalty,
        user=request.user,
        tools=_tools(request),
        tool_choice=_tool_choice(request),
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=_response_format(request),
    )


def _messages(request: ResponsesRequest) -> list[ChatMessage]:
    messages = []
    if request.instructions is not None:
        messages.append(ChatMessage(role="system", content=request.instructions))
    if isinstance(request.input, str):
        messages.append(ChatMessage(role="user", content=request.input))
        return messages
    for i, item in enumerate(request.input):
        kind = item.type or ("message" if item.role is not None else None)
        if kind == "message":
            messages.append(_message(item, f"input[{i}]"))
        elif kind == "function_call":
            _add_call(messages, item, f"input[{i}]")
        elif kind == "function_call_output":
            messages.append(_tool_output(item, f"input[{i}]"))
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: templates render none
        elif kind == "item_reference":
            raise bad_request("item_reference input items need stored items; this server keeps none.",
                              param=f"input[{i}]")
        else:
            raise bad_request(
                f"Unsupported input item type {kind!r}: this server takes messages, function_call and "
                "function_call_output items.",
                param=f"input[{i}].type",
            )
    return messages


def _message(item: ResponsesInputItem, param: str) -> ChatMessage:
    if item.role is None:
        raise bad_request("A message input item needs its role.", param=f"{param}.role")
    content = item.content
    if isinstance(content, list):
        content = [ContentPart(type="text", text=_part_text(part, f"{param}.content[{k}]"))
                   for k, part in enumerate(content)]
    elif content is None:
        raise bad_request("A message input item needs its content.", param=f"{param}.content")
    return ChatMessage(role=item.role, content=content)


def _part_text(part: ResponsesContentPart, param: str) -> str:
    if part.type not in _TEXT_PARTS:
        raise bad_request(f"Only text content parts are supported (input_text, output_text), got a {part.type!r} part.",
                          param=param)
    if part.text is None:
        raise bad_request(f"A {part.type!r} content part needs its `text`.", param=f"{param}.text")
    return part.text


def _add_call(messages: list[ChatMessage], item: ResponsesInputItem, param: str) -> None:
    """A function_call item is a tool call of the assistant turn it follows (consecutive calls
    are one turn with several calls), or a turn of its own."""
    for field in ("call_id", "name", "arguments"):
        if getattr(item, field) is None:
            raise bad_request(f"A function_call input item needs its {field}.", param=f"{param}.{field}")
    call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        last.tool_calls = [*(last.tool_calls or []), call]
    else:
        messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


def _tool_output(item: ResponsesInputItem, param: str) -> ChatMessage:
    if item.call_id is None:
        raise bad_request("A function_call_output input item needs its call_id.", param=f"{param}.call_id")
    output = item.output
    if output is None:
        raise bad_request("A function_call_output input item needs its output.", param=f"{param}.output")
    if isinstance(output, list):
        output = "".join(_part_text(part, f"{param}.output[{k}]") for k, part in enumerate(output))
    return ChatMessage(role="tool", content=output, tool_call_id=item.call_id)


def _tools(request: ResponsesRequest) -> list[Tool] | None:
    if not request.tools:
        return None
    tools = []
    for i, tool in enumerate(request.tools):
        if tool.type != "function":
            raise bad_request(f"Only function tools are supported, got a {tool.type!r} tool.", param=f"tools[{i}].type")
        if not tool.name:
            raise bad_request("A function tool needs its name.", param=f"tools[{i}].name")
        tools.append(Tool(function=FunctionDefinition(name=tool.name, description=tool.description,
                                                      parameters=tool.parameters, strict=tool.strict)))
    return tools


def _tool_choice(request: ResponsesRequest) -> str | NamedToolChoice | None:
    choice = request.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function":
        raise bad_request(f"tool_choice of type {choice.type!r} is not supported; name a function tool.",
                          param="tool_choice.type")
    if not choice.name:
        raise bad_request("A function tool_choice needs the function's name.", param="tool_choice.name")
    return NamedToolChoice(function=NamedFunction(name=choice.name))


def _response_format(request: ResponsesRequest) -> ResponseFormat | None:
    text_format = request.text.format if request.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return ResponseFormat(type="json_object")
    if text_format.schema is None:
        raise bad_request("A json_schema text format needs its schema.", param="text.format.schema")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
        name=text_format.name, description=text_format.description, schema=text_format.schema,
        strict=text_format.strict))


# ---------------------------------------------------------------------------------------
# Chat deltas -> output items and stream events


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseOutputBuilder:
    """Parsed deltas (reasoning, content and tool-call fragments) -> output items, and the stream
    events that open, fill and close them. At most one item is open; a new kind of output closes
    the item before it (a call closes the message before it, text after a call opens a new
    message)."""

    def __init__(self) -> None:
        self.items: list[ResponseOutputItem] = []
        self._text: list[str] = []  # the open message's or reasoning item's text

    def feed_reasoning(self, text: str) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = []
        if not isinstance(self._open, ResponseReasoningItem):
            events += self._close("completed")
            item = ResponseReasoningItem(id=_new_id("rs"), status="in_progress")
            self.items.append(item)
            self._text = []
            events.append(OutputItemAddedEvent(output_index=len(self.items) - 1, item=_copy(item)))
        self._text.append(text)
        events.append(ReasoningTextDeltaEvent(item_id=self._open.id, output_index=len(self.items) - 1,
                                              content_index=0, delta=text))
        return events

    @property
    def _open(self) -> ResponseOutputItem | None:
        item = self.items[-1] if self.items else None
        return item if item is not None and item.status == "in_progress" else None

    def feed(self, parsed: ParsedDelta) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = []
        if parsed.content:
            if not isinstance(self._open, ResponseOutputMessage):
                events += self._close("completed")
                events += self._open_message()
            self._text.append(parsed.content)
            item = self._open
            events.append(OutputTextDeltaEvent(item_id=item.id, output_index=len(self.items) - 1, content_index=0,
                                               delta=parsed.content))
        for call in parsed.tool_calls:
            events += self._call_delta(call)
        return events

    def finish(self, status: str) -> list[msgspec.Struct]:
        """Closes the open item with `status`; an output with no item at all gets an empty message."""
        events = [] if self.items else self._open_message()
        return events + self._close(status)

    def _open_message(self) -> list[msgspec.Struct]:
        item = ResponseOutputMessage(id=_new_id("msg"), status="in_progress")
        self.items.append(item)
        self._text = []
        index = len(self.items) - 1
        return [OutputItemAddedEvent(output_index=index, item=_copy(item)),
                ContentPartAddedEvent(item_id=item.id, output_index=index, content_index=0,
                                      part=ResponseOutputText(""))]

    def _call_delta(self, call: ToolCallDelta) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = []
        if call.id is not None:  # a new call
            events += self._close("completed")
            item = ResponseFunctionCall(id=_new_id("fc"), call_id=call.id, name=call.name or "", arguments="",
                                        status="in_progress")
            self.items.append(item)
            events.append(OutputItemAddedEvent(output_index=len(self.items) - 1, item=_copy(item)))
        item = self._open
        if call.arguments and isinstance(item, ResponseFunctionCall):
            item.arguments += call.arguments
            events.append(FunctionCallArgumentsDeltaEvent(item_id=item.id, output_index=len(self.items) - 1,
                                                          delta=call.arguments))
        return events

    def _close(self, status: str) -> list[msgspec.Struct]:
        item = self._open
        if item is None:
            return []
        index = len(self.items) - 1
        events: list[msgspec.Struct] = []
        if isinstance(item, ResponseOutputMessage):
            text = "".join(self._text)
            part = ResponseOutputText(text)
            item.content = [part]
            events += [OutputTextDoneEvent(item_id=item.id, output_index=index, content_index=0, text=text),
                       ContentPartDoneEvent(item_id=item.id, output_index=index, content_index=0, part=part)]
        elif isinstance(item, ResponseReasoningItem):
            text = "".join(self._text)
            item.content = [ResponseReasoningText(text)]
            events.append(ReasoningTextDoneEvent(item_id=item.id, output_index=index, content_index=0, text=text))
        else:
            events.append(FunctionCallArgumentsDoneEvent(item_id=item.id, output_index=index, name=item.name,
                                                         arguments=item.arguments))
        item.status = status
        events.append(OutputItemDoneEvent(output_index=index, item=_copy(item)))
        return events


def _copy(item: ResponseOutputItem) -> ResponseOutputItem:
    """A snapshot for an event: the builder keeps changing its items."""
    if isinstance(item, ResponseFunctionCall):
        return msgspec.structs.replace(item)
    return msgspec.structs.replace(item, content=list(item.content))


class ResponseRun:
    """One Responses request over its prepared chat job: the events, and the response they end with."""

    def __init__(self, job: ChatJob, request: ResponsesRequest, *, model: str) -> None:
        self.job = job  # its deltas, usage and tool parser
        self.request = request
        self.model = model
        self.response_id = _new_id("resp")
        self.params = job.prompts[0].request.sampling_params

    async def collect(self) -> ResponseObject:
        """The final response: the stream's last event, with no stream."""
        last = None
        async with contextlib.aclosing(self.events()) as events:
            async for last in events:
                pass
        if isinstance(last, ResponseFailedEvent):
            raise self._failure  # as an HTTP error: nothing was sent yet
        return last.response

    async def events(self) -> AsyncIterator[msgspec.Struct]:
        counter = itertools.count()

        def numbered(event):
            event.sequence_number = next(counter)
            return event

        builder = ResponseOutputBuilder()
        yield numbered(ResponseCreatedEvent(response=self.response("in_progress", [])))
        yield numbered(ResponseInProgressEvent(response=self.response("in_progress", [])))
        parser = self.job.tool_parser.stream() if self.job.tool_parser is not None else None
        reasoner = self.job.new_reasoning_parser()  # None without --reasoning-parser
        finish_reason = None
        try:
            async with contextlib.aclosing(self.job.deltas()) as deltas:
                async for delta in deltas:
                    # as on chat: the think block first, then tool calls are read from the content
                    reasoning, content = self.job.split_reasoning(delta, reasoner)
                    if reasoning:
                        for event in builder.feed_reasoning(reasoning):
                            yield numbered(event)
                    parsed = ParsedDelta(content) if parser is None else parser.feed(content)
                    if delta.finish_reason is not None:
                        finish_reason = delta.finish_reason
                        if parser is not None:
                            tail = parser.finish()
                            parsed = ParsedDelta(parsed.content + tail.content, parsed.tool_calls + tail.tool_calls)
                    for event in builder.feed(parsed):
                        yield numbered(event)
        except Exception as exc:
            if not isinstance(exc, OpenAIError):
                logger.exception("a response failed")
                exc = internal_error()
            self._failure = exc
            code = exc.code or ("server_error" if exc.status >= 500 else "invalid_prompt")
            yield numbered(ResponseFailedEvent(response=self.response(
                "failed", builder.items, error=ResponseError(code=code, message=exc.message))))
            return
        is_cut = finish_reason == "length"
        for event in builder.finish("incomplete" if is_cut else "completed"):
            yield numbered(event)
        if is_cut:
            response = self.response("incomplete", builder.items, incomplete=IncompleteDetails("max_output_tokens"))
            yield numbered(ResponseIncompleteEvent(response=response))
        else:
            yield numbered(ResponseCompletedEvent(response=self.response("completed", builder.items)))

    def response(self, status: str, output: list[ResponseOutputItem], *, error: ResponseError | None = None,
                 incomplete: IncompleteDetails | None = None) -> ResponseObject:
        request = self.request
        is_done = status != "in_progress"
        return ResponseObject(
            id=self.response_id,
            created_at=self.job.created,
            model=self.model,
            status=status,
            output=[_copy(item) for item in output],
            error=error,
            incomplete_details=incomplete,
            instructions=request.instructions,
            metadata=request.metadata or {},
            max_output_tokens=request.max_output_tokens,
            parallel_tool_calls=request.parallel_tool_calls,
            temperature=self.params.temperature,
            top_p=self.params.top_p,
            tool_choice=_echo_tool_choice(request),
            tools=[ResponseFunctionTool(name=t.name, description=t.description, parameters=t.parameters,
                                        strict=t.strict) for t in request.tools or []],
            text=_echo_text(request),
            user=request.user,
            usage=self._usage() if is_done else None,
        )

    def _usage(self) -> ResponseUsage:
        usage = self.job.usage_info()  # with reasoning tokens, under --reasoning-parser
        details = usage.prompt_tokens_details
        reasoning = usage.completion_tokens_details
        return ResponseUsage(
            input_tokens=usage.prompt_tokens,
            input_tokens_details=InputTokensDetails(details.cached_tokens if details is not None else 0),
            output_tokens=usage.completion_tokens,
            output_tokens_details=OutputTokensDetails(reasoning.reasoning_tokens if reasoning is not None else 0),
            total_tokens=usage.total_tokens,
        )


def _echo_tool_choice(request: ResponsesRequest) -> str | ResponseNamedToolChoice:
    choice = request.tool_choice
    if choice is None:
        return "auto" if request.tools else "none"
    return choice if isinstance(choice, str) else ResponseNamedToolChoice(choice.name)


def _echo_text(request: ResponsesRequest) -> ResponseTextEcho:
    text_format = request.text.format if request.text is not None else None
    if text_format is None:
        return ResponseTextEcho()
    return ResponseTextEcho(ResponseTextFormatEcho(type=text_format.type, name=text_format.name,
                                                   description=text_format.description, schema=text_format.schema,
                                                   strict=text_format.strict))
