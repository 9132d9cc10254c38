"""The OpenAI schemas: what decodes, what is ignored, and how responses encode."""

from __future__ import annotations

import msgspec
import msgspec.inspect as mi
import pytest

from frontend.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionRequest,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    ErrorInfo,
    ErrorResponse,
    NamedToolChoice,
    RequestStruct,
    TokenizeRequest,
    UsageInfo,
)


def decode(body: dict, type):
    return msgspec.json.decode(msgspec.json.encode(body), type=type)


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_shapes_decode(prompt):
    assert decode({"prompt": prompt}, CompletionRequest).prompt == prompt


def test_unknown_fields_are_ignored():
    request = decode({"prompt": "x", "service_tier": "auto", "frobnicate": True}, CompletionRequest)
    assert request.prompt == "x"


def test_defaults_follow_openai_and_vllm():
    request = decode({"prompt": "x"}, CompletionRequest)
    assert (request.n, request.max_tokens, request.stream, request.echo, request.logprobs) == (1, None, False, False, None)
    assert (request.skip_special_tokens, request.include_stop_str_in_output, request.early_stopping) == (True, False, False)
    chat = decode({"messages": []}, ChatCompletionRequest)
    assert (chat.add_generation_prompt, chat.continue_final_message, chat.logprobs) == (True, False, False)


# ---- null means the default -------------------------------------------------------------

# The bodies, and every object nested in them, with only their required fields.
MINIMAL = {
    CompletionRequest: {"prompt": "x"},
    ChatCompletionRequest: {"messages": []},
    TokenizeRequest: {},
    DetokenizeRequest: {"tokens": []},
}
NESTED_MINIMAL = {
    "StreamOptions": {},
    "ChatMessage": {"role": "user"},
    "ContentPart": {"type": "text"},
    "ToolCall": {"id": "c", "function": {"name": "f", "arguments": "{}"}},
    "FunctionCall": {"name": "f", "arguments": "{}"},
    "Tool": {"function": {"name": "f"}},
    "FunctionDefinition": {"name": "f"},
    "NamedToolChoice": {"function": {"name": "f"}},
    "NamedFunction": {"name": "f"},
    "ResponseFormat": {"type": "text"},
    "JsonSchemaFormat": {},
    "StructuredOutputsParams": {},
}


def _request_structs() -> set[type]:
    """Every Struct a request body can contain, found from the bodies' own types."""
    found: set[type] = set()

    def walk(node) -> None:
        if isinstance(node, mi.StructType):
            if node.cls in found:
                return
            found.add(node.cls)
        if isinstance(node, (list, tuple)):
            for item in node:
                walk(item)
        elif isinstance(node, (mi.Type, mi.Field)):
            for name in node.__struct_fields__:
                walk(getattr(node, name))

    walk(mi.multi_type_info(list(MINIMAL)))
    return found


def _optional_fields() -> list[tuple[type, str]]:
    return [
        (cls, f.name)
        for cls in sorted(_request_structs(), key=lambda c: c.__name__)
        for f in msgspec.structs.fields(cls)
        if not f.required
    ]


def test_every_request_struct_treats_null_as_its_default():
    structs = _request_structs()
    assert {c.__name__ for c in structs} == {c.__name__ for c in MINIMAL} | set(NESTED_MINIMAL)
    assert all(issubclass(cls, RequestStruct) for cls in structs), "a nested request object is a plain Struct"


@pytest.mark.parametrize("cls, name", _optional_fields(), ids=lambda x: getattr(x, "__name__", x))
def test_an_optional_field_sent_as_null_is_as_if_absent(cls, name):
    minimal = MINIMAL.get(cls, NESTED_MINIMAL.get(cls.__name__))
    assert decode({**minimal, name: None}, cls) == decode(minimal, cls)


def test_null_nested_fields_take_their_defaults():
    request = decode({"messages": [], "stream_options": {"include_usage": None, "continuous_usage_stats": None},
                      "tools": [{"type": None, "function": {"name": "f"}}]}, ChatCompletionRequest)
    assert request.stream_options == msgspec.convert({}, type(request.stream_options))
    assert request.stream_options.include_usage is False and request.tools[0].type == "function"


@pytest.mark.parametrize("name, value", [("n", "two"), ("stream", "yes"), ("echo", 1), ("min_tokens", 1.5),
                                         ("logit_bias", {"1": "x"}), ("logit_bias", [1])])
def test_wrong_types_are_still_rejected(name, value):
    with pytest.raises(msgspec.ValidationError, match=name):
        decode({"prompt": "x", name: value}, CompletionRequest)


@pytest.mark.parametrize("stop", ["END", ["a", "b"], None])
def test_stop_is_a_string_or_a_list(stop):
    assert decode({"prompt": "x", "stop": stop}, CompletionRequest).stop == stop


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("never", True), ("sometimes", False)])
def test_early_stopping_values(value, ok):
    body = {"prompt": "x", "early_stopping": value}
    if ok:
        assert decode(body, CompletionRequest).early_stopping == value
    else:
        with pytest.raises(msgspec.ValidationError, match="early_stopping"):
            decode(body, CompletionRequest)


def test_chat_messages_of_every_role_decode():
    request = decode(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "1", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "stream_options": {"include_usage": True},
        },
        ChatCompletionRequest,
    )
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[1].content[0].text == "hi"
    assert request.messages[2].tool_calls[0].function.name == "f"
    assert isinstance(request.tool_choice, NamedToolChoice)
    assert request.stream_options.include_usage


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
def test_tool_choice_strings(choice):
    assert decode({"messages": [], "tool_choice": choice}, ChatCompletionRequest).tool_choice == choice


def test_delta_omits_absent_fields():
    chunk = ChatCompletionStreamResponse(
        id="c", object="chat.completion.chunk", created=1, model="m",
        choices=[ChatCompletionStreamChoice(0, DeltaMessage(content="x"))],
    )
    encoded = msgspec.json.decode(msgspec.json.encode(chunk))
    assert encoded["choices"][0]["delta"] == {"content": "x"}
    assert encoded["choices"][0]["finish_reason"] is None and encoded["choices"][0]["logprobs"] is None
    assert "usage" not in encoded
    assert msgspec.json.decode(msgspec.json.encode(DeltaMessage())) == {}


def test_stream_chunk_keeps_object_and_usage_when_set():
    chunk = CompletionStreamResponse(
        id="c", object="text_completion", created=1, model="m", choices=[CompletionStreamChoice(0, "")], usage=UsageInfo(1, 2, 3)
    )
    encoded = msgspec.json.decode(msgspec.json.encode(chunk))
    assert encoded["object"] == "text_completion"
    assert encoded["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_response_message_content_is_always_present():
    assert msgspec.json.decode(msgspec.json.encode(ChatResponseMessage("assistant", None))) == {
        "role": "assistant",
        "content": None,
    }


def test_error_envelope_shape():
    body = msgspec.json.decode(msgspec.json.encode(ErrorResponse(ErrorInfo("bad", "invalid_request_error", "n"))))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
