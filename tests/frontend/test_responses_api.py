"""POST /v1/responses through the app, with the fake engine playing model outputs, read with the
`openai` client (through the test transport) and as raw HTTP."""

from __future__ import annotations

import json
import logging

import openai
import pytest
from fake_model import MODEL_NAME
from litestar.testing import TestClient

from frontend.app import create_app
from ipc.messages import StructuredOutputKind

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
TIME_TOOL = {"type": "function", "name": "get_time"}
HERMES_OUTPUT = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
FORCED_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def api_for(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key="unused", http_client=client, max_retries=0)


def prompt_text(engine, tokenizer, k: int = -1) -> str:
    return tokenizer.decode(engine.requests[k].prompt_token_ids)


def sse_events(body: str) -> list[dict]:
    """A Responses stream's events; asserts OpenAI's framing (`event:` matching the data's type,
    LF line ends, no [DONE])."""
    assert "\r" not in body and "[DONE]" not in body
    events = []
    for block in body.split("\n\n")[:-1]:
        if block.startswith(":"):
            continue  # keep-alive comment
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: "), block
        event = json.loads(data_line[len("data: "):])
        assert event["type"] == event_line[len("event: "):]
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def without_ids(response: dict) -> dict:
    """A response with the fields that differ between two runs of the same request blanked."""
    response = json.loads(json.dumps(response))
    response["id"] = response["created_at"] = None
    for item in response["output"]:
        item["id"] = None
        if "call_id" in item:
            item["call_id"] = None
    return response


def assert_400(response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


# ---- plain text


def test_a_string_input_with_instructions_is_a_system_and_a_user_message(make_client, tokenizer):
    client, engine = make_client("Hello world!")
    response = api_for(client).responses.create(model=MODEL_NAME, input="Say hi.", instructions="Be brief.",
                                                metadata={"k": "v"}, temperature=0.5, top_p=0.9)
    assert prompt_text(engine, tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL_NAME
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == "Hello world!"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert message.content[0].annotations == []
    assert response.instructions == "Be brief." and response.metadata == {"k": "v"}
    assert response.temperature == 0.5 and response.top_p == 0.9
    params = engine.requests[0].sampling_params
    assert params.temperature == 0.5 and params.top_p == 0.9
    usage = response.usage
    assert usage.input_tokens == len(engine.requests[0].prompt_token_ids)
    assert usage.output_tokens == len(tokenizer.encode("Hello world!")) + 1  # and the EOS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_cached_tokens_are_reported(make_client):
    client, engine = make_client("Hello world!")
    engine.num_cached_tokens = 16
    response = api_for(client).responses.create(model=MODEL_NAME, input="Say hi.")
    assert response.usage.input_tokens_details.cached_tokens == 16


def test_max_output_tokens_cuts_the_response_as_incomplete(make_client, tokenizer):
    client, engine = make_client("Hello world! The quick brown fox jumps over the lazy dog.")
    response = api_for(client).responses.create(model=MODEL_NAME, input="Go on.", max_output_tokens=3)
    assert engine.requests[0].sampling_params.max_tokens == 3
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 3
    assert response.max_output_tokens == 3


def test_input_items_become_the_conversation(make_client, tokenizer):
    client, engine = make_client("Sunny.")
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather"},
                                                          {"type": "input_text", "text": "in Paris?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "21 degrees"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
    ]
    response = api_for(client).responses.create(model=MODEL_NAME, input=items)
    assert response.output_text == "Sunny."
    assert prompt_text(engine, tokenizer) == (
        "<|im_start|>developer\nUse tools.<|im_end|>\n<|im_start|>user\nWeather\nin Paris?<|im_end|>\n"
        "<|im_start|>assistant\nLet me look.<|im_end|>\n<|im_start|>tool\n21 degrees<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_function_calls_reach_the_chat_template_as_assistant_tool_calls(make_client, tokenizer, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<{{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}>{% endfor %}"
        "{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}]{% endfor %}")
    client, engine = make_client("Done.", chat_template=str(template))
    items = [{"role": "user", "content": "Weather?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "21"}]},
             {"type": "function_call_output", "call_id": "call_2", "output": "25"}]
    api_for(client).responses.create(model=MODEL_NAME, input=items)
    assert prompt_text(engine, tokenizer) == (
        "[user:Weather?][assistant:<call_1 get_weather Paris><call_2 get_weather Rome>][tool:21#call_1][tool:25#call_2]")


# ---- tools


def test_a_named_tool_choice_forces_one_call(make_client):
    client, engine = make_client(FORCED_CALL)
    response = api_for(client).responses.create(
        model=MODEL_NAME, input="Weather in Paris?", tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "name": "get_weather"})
    spec = engine.requests[0].sampling_params.structured_output
    assert spec.kind == StructuredOutputKind.JSON_SCHEMA
    assert json.loads(spec.spec)["properties"]["name"] == {"const": "get_weather"}
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert response.tool_choice.type == "function" and response.tool_choice.name == "get_weather"
    assert [t.name for t in response.tools] == ["get_weather", "get_time"]
    assert response.tools[0].parameters == WEATHER_TOOL["parameters"] and response.tools[0].strict is True


def test_required_with_parallel_calls_off_is_one_call_of_any_tool(make_client):
    client, engine = make_client(FORCED_CALL)
    response = api_for(client).responses.create(model=MODEL_NAME, input="Weather?", tools=[WEATHER_TOOL, TIME_TOOL],
                                                tool_choice="required", parallel_tool_calls=False)
    assert engine.requests[0].sampling_params.structured_output.kind == StructuredOutputKind.JSON_SCHEMA
    assert [item.type for item in response.output] == ["function_call"]
    assert response.parallel_tool_calls is False


def test_auto_tool_calls_are_parsed_into_a_message_and_function_call_items(make_client):
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    response = api_for(client).responses.create(model=MODEL_NAME, input="Weather?", tools=[WEATHER_TOOL, TIME_TOOL])
    assert [item.type for item in response.output] == ["message", "function_call", "function_call"]
    assert response.output[0].content[0].text == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in response.output[1:]] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.call_id for c in response.output[1:]}) == 2
    assert response.tool_choice == "auto"


def test_tool_choice_none_leaves_the_text_alone(make_client):
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    response = api_for(client).responses.create(model=MODEL_NAME, input="Weather?", tools=[WEATHER_TOOL],
                                                tool_choice="none")
    assert response.output_text == HERMES_OUTPUT and len(response.output) == 1


# ---- text.format


def test_text_format_json_schema_constrains_the_output(make_client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client, engine = make_client('{"a": 1}')
    response = api_for(client).responses.create(
        model=MODEL_NAME, input="JSON please",
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    spec = engine.requests[0].sampling_params.structured_output
    assert spec.kind == StructuredOutputKind.JSON_SCHEMA and json.loads(spec.spec) == schema
    assert json.loads(response.output_text) == {"a": 1}
    assert response.text.format.type == "json_schema" and response.text.format.name == "thing"
    assert response.text.format.schema_ == schema


def test_text_format_json_object_and_text(make_client):
    client, engine = make_client('{"a": 1}')
    api = api_for(client)
    api.responses.create(model=MODEL_NAME, input="JSON", text={"format": {"type": "json_object"}})
    assert engine.requests[0].sampling_params.structured_output.kind == StructuredOutputKind.JSON_OBJECT
    response = api.responses.create(model=MODEL_NAME, input="JSON", text={"format": {"type": "text"}})
    assert engine.requests[1].sampling_params.structured_output is None
    assert response.text.format.type == "text"


# ---- streaming


def test_a_stream_has_the_typed_events_in_order_and_ends_with_the_response(make_client):
    client, _ = make_client("Hello world!")
    body = {"model": MODEL_NAME, "input": "Say hi.", "temperature": 0}
    events = sse_events(client.post("/v1/responses", json={**body, "stream": True}).text)
    types = [e["type"] for e in events]
    num_deltas = types.count("response.output_text.delta")
    assert num_deltas > 1
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * num_deltas
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello world!" == events[-4]["text"]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text
    assert events[-2]["item"] == final["output"][0]
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1
    plain = client.post("/v1/responses", json=body).json()
    assert without_ids(plain) == without_ids(final)


def test_the_openai_stream_helper_assembles_the_final_response(make_client):
    client, _ = make_client("Hello world!")
    with api_for(client).responses.stream(model=MODEL_NAME, input="Say hi.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello world!"


def test_streamed_tool_calls_are_function_call_items_with_argument_deltas(make_client):
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    body = {"model": MODEL_NAME, "input": "Weather?", "tools": [WEATHER_TOOL, TIME_TOOL]}
    events = sse_events(client.post("/v1/responses", json={**body, "stream": True}).text)
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [item["type"] for item in added] == ["message", "function_call", "function_call"]
    assert [item["name"] for item in added[1:]] == ["get_weather", "get_time"]
    final = events[-1]["response"]
    for index, call in enumerate(final["output"][1:], start=1):
        deltas = [e["delta"] for e in events
                  if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == index]
        [done] = [e for e in events if e["type"] == "response.function_call_arguments.done" and e["output_index"] == index]
        assert "".join(deltas) == done["arguments"] == call["arguments"] and done["item_id"] == call["id"]
    # each item is closed before the next opens
    item_events = [(e["type"].rsplit(".", 1)[1], e["output_index"]) for e in events if ".output_item." in e["type"]]
    assert item_events == [("added", 0), ("done", 0), ("added", 1), ("done", 1), ("added", 2), ("done", 2)]
    plain = client.post("/v1/responses", json=body).json()
    assert without_ids(plain) == without_ids(final)


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(make_client):
    client, _ = make_client("Hello world! The quick brown fox jumps over the lazy dog.")
    events = sse_events(client.post("/v1/responses", json={"input": "Go", "max_output_tokens": 2, "stream": True}).text)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_an_engine_failure_mid_stream_is_a_failed_event_that_ends_the_stream(make_client):
    client, engine = make_client("Hello world! The quick brown fox jumps over the lazy dog.")
    engine.die_after_steps = 2
    events = sse_events(client.post("/v1/responses", json={"input": "Go", "stream": True}).text)
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "engine" in failed["error"]["message"]
    assert failed["error"]["code"] == "engine_dead"
    assert client.post("/v1/responses", json={"input": "Go"}).status_code == 503


def test_an_engine_failure_is_an_openai_error_for_the_stream_helper(make_client):
    client, engine = make_client("Hello world! The quick brown fox jumps over the lazy dog.")
    engine.die_after_steps = 2
    with api_for(client).responses.stream(model=MODEL_NAME, input="Go") as stream:
        types = [event.type for event in stream]
    assert types[-1] == "response.failed"


# ---- errors and the rest of the request


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({}, "input"),
    ({"input": 3}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": 5}, "temperature"),
    ({"input": "x", "model": "other"}, "model"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "tools": [WEATHER_TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    ({"input": "x", "tools": [WEATHER_TOOL], "tool_choice": "auto"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "json_object"}}, "tools": [WEATHER_TOOL], "tool_choice": "required"},
     "text.format"),
])
def test_bad_input_is_a_400_naming_the_field(make_client, body, param):
    client, engine = make_client("Hello")
    response = client.post("/v1/responses", json=body)
    if param == "model":
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    else:
        assert_400(response, param)
    assert engine.requests == []


def test_previous_response_id_says_no_state_is_kept(make_client):
    client, _ = make_client("Hello")
    message = assert_400(client.post("/v1/responses", json={"input": "x", "previous_response_id": "resp_1"}),
                         "previous_response_id")
    assert "does not keep responses" in message and "stateless" in message


def test_an_error_in_chat_terms_is_spelled_in_responses_terms(make_client):
    client, _ = make_client("Hello")
    message = assert_400(client.post("/v1/responses", json={"input": "x", "max_output_tokens": -1}),
                         "max_output_tokens")
    assert "max_completion_tokens" not in message


def test_ignored_fields_are_named_in_one_warning(make_client, caplog):
    client, _ = make_client("Hello")
    with caplog.at_level(logging.WARNING, logger="frontend.app"):
        response = client.post("/v1/responses", json={"input": "x", "store": True, "service_tier": "auto",
                                                      "include": [], "user": "u"})
    assert response.status_code == 200 and response.json()["store"] is False and response.json()["user"] == "u"
    [record] = [r for r in caplog.records if "/v1/responses" in r.getMessage()]
    assert "'service_tier'" in record.getMessage() and "'store'" in record.getMessage()
    assert "'include'" not in record.getMessage() and "'user'" not in record.getMessage()


def test_the_route_needs_the_api_key_and_is_in_the_openapi_document(config, engine, tokenizer):
    config.api_key = "secret"
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        denied = client.post("/v1/responses", json={"input": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        allowed = client.post("/v1/responses", json={"input": "x", "max_output_tokens": 4},
                              headers={"Authorization": "Bearer secret"})
        assert allowed.status_code == 200 and allowed.json()["object"] == "response"
        document = client.get("/schema/openapi.json", headers={"Authorization": "Bearer secret"}).json()
    schema = document["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert "input" in document["components"]["schemas"]["ResponsesRequest"]["required"]


def test_responses_are_counted_in_the_metrics(make_client):
    client, _ = make_client("Hello")
    client.post("/v1/responses", json={"input": "x"})
    metrics = client.get("/metrics").text
    assert any(line.startswith("furiosa_llm:request_success_total{") and 'finished_reason="stop"' in line
               and line.endswith(" 1.0") for line in metrics.splitlines()), metrics


# ---- a client that goes away


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_gone_aborts_the_request(config, engine, tokenizer, stream):
    from test_streaming import post_then_disconnect, running  # the ASGI drivers of the chat tests

    engine.hang_after_steps = 2
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    async with running(app):
        sent = await post_then_disconnect(app, "/v1/responses", {"input": "x", "stream": stream},
                                          lambda: engine.wait_for("hanging"))
    if stream:
        assert sent[0]["status"] == 200
        assert b"".join(m.get("body", b"") for m in sent[1:]).startswith(b"event: response.created\n")
    assert engine.closed_unfinished == [engine.requests[0].request_id]
    assert engine.client_gone_ids == [engine.requests[0].request_id]


# ---- --reasoning-parser


def test_the_think_block_is_a_reasoning_item_streamed_and_not(make_client):
    client, _ = make_client("<think>Paris, probably.</think>Hello world!", reasoning_parser="deepseek_r1")
    body = {"input": "Say hi.", "temperature": 0}
    plain = client.post("/v1/responses", json=body).json()
    assert [item["type"] for item in plain["output"]] == ["reasoning", "message"]
    assert plain["output"][0]["content"] == [{"type": "reasoning_text", "text": "Paris, probably."}]
    assert plain["output"][0]["id"].startswith("rs_") and plain["output"][0]["summary"] == []
    assert plain["output"][1]["content"][0]["text"] == "Hello world!"
    assert 0 < plain["usage"]["output_tokens_details"]["reasoning_tokens"] < plain["usage"]["output_tokens"]
    events = sse_events(client.post("/v1/responses", json={**body, "stream": True}).text)
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    [done] = [e for e in events if e["type"] == "response.reasoning_text.done"]
    assert reasoning == done["text"] == "Paris, probably."
    assert without_ids(events[-1]["response"]) == without_ids(plain)
    with api_for(client).responses.stream(model=MODEL_NAME, input="Say hi.") as stream:
        final = stream.get_final_response()
    assert final.output[0].type == "reasoning" and final.output[0].content[0].text == "Paris, probably."
    assert final.output_text == "Hello world!"


def test_reasoning_then_a_tool_call(make_client):
    client, _ = make_client("<think>Need the weather.</think>" + HERMES_OUTPUT.split("\n", 1)[1],
                            reasoning_parser="deepseek_r1", enable_auto_tool_choice=True, tool_call_parser="hermes")
    response = api_for(client).responses.create(model=MODEL_NAME, input="Weather?", tools=[WEATHER_TOOL, TIME_TOOL])
    assert [item.type for item in response.output] == ["reasoning", "function_call", "function_call"]
    assert response.output[0].content[0].text == "Need the weather."
