"""POST /v1/responses on the real server (the default model), with the `openai` client: plain,
with instructions, a forced function tool and its function_call_output round trip, text.format
json_schema, and `responses.stream` against the non-streamed response."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_a_plain_response(client, model_name):
    response = client.responses.create(model=model_name, input="What is the capital of France?",
                                       temperature=0, max_output_tokens=40)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == model_name
    assert response.status in ("completed", "incomplete")
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text.strip() and "Paris" in response.output_text
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 40
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_instructions_are_the_system_message(client, model_name):
    """The same conversation as a chat completion gives the same greedy text."""
    question, instructions = "Name a fruit.", "You answer in one word."
    response = client.responses.create(model=model_name, input=question, instructions=instructions,
                                       temperature=0, max_output_tokens=20)
    chat = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=20,
        messages=[{"role": "system", "content": instructions}, {"role": "user", "content": question}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.instructions == instructions


def test_max_output_tokens_makes_an_incomplete_response(client, model_name):
    response = client.responses.create(model=model_name, input="Tell me a long story about a dragon.",
                                       temperature=0, max_output_tokens=5)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5


def test_a_forced_function_call_and_its_output_round_trip(client, model_name):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(model=model_name, input=ask, tools=[WEATHER], temperature=0,
                                    tool_choice={"type": "function", "name": "get_weather"})
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER["parameters"])
    # The client sends the call back with its result, as the Agents SDK does.
    followup = ask + [call.model_dump(exclude_none=True),
                      {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees."}]
    second = client.responses.create(model=model_name, input=followup, tools=[WEATHER], temperature=0,
                                     max_output_tokens=40)
    assert [item.type for item in second.output] == ["message"] and second.output_text.strip()
    assert second.usage.input_tokens > first.usage.input_tokens


def test_text_format_json_schema_output_validates(client, model_name):
    response = client.responses.create(
        model=model_name, input="Describe Paris as JSON.", temperature=0, max_output_tokens=80,
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), CITY_SCHEMA)
    assert response.text.format.type == "json_schema"


def test_a_stream_joins_to_the_non_streamed_response(client, model_name):
    request = dict(model=model_name, input="Write one sentence about the sea.", temperature=0, max_output_tokens=30)
    with client.responses.stream(**request) as stream:
        events = list(stream)
    # the last event carries the response, "response.completed" or (cut at 30 tokens) "response.incomplete"
    final = events[-1].response
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == f"response.{final.status}"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    plain = client.responses.create(**request)
    assert [(m.type, m.status, m.content[0].text) for m in plain.output] == [
        (m.type, m.status, m.content[0].text) for m in final.output]
    assert plain.status == final.status and plain.incomplete_details == final.incomplete_details
    assert plain.usage.output_tokens == final.usage.output_tokens and plain.usage.input_tokens == final.usage.input_tokens


def test_a_streamed_forced_call_has_argument_deltas(client, model_name):
    with client.responses.stream(model=model_name, input="What is the weather in Rome?", tools=[WEATHER],
                                 temperature=0, tool_choice="required") as stream:
        events = list(stream)
        final = stream.get_final_response()
    [call] = final.output
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_previous_response_id_is_a_400_saying_no_state_is_kept(client, model_name):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=model_name, input="Hi", previous_response_id="resp_123")
    assert info.value.body["param"] == "previous_response_id" and "does not keep" in info.value.body["message"]


def test_raw_stream_framing(server, model_name):
    body = {"model": model_name, "input": "Hi", "max_output_tokens": 3, "stream": True}
    text = httpx.post(server.url + "/v1/responses", json=body, timeout=300).text
    blocks = [b for b in text.split("\n\n") if b and not b.startswith(":")]
    types = []
    for block in blocks:
        event_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}"
        types.append(data["type"])
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.incomplete"
