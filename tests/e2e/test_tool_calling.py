"""Tool calls and JSON output from the real server on the default model (SmolLM2-135M, which was
not trained for tools): constrained generation makes the calls and the JSON valid anyway."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import jsonschema
import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "unit"],
    },
}
TIME = {
    "name": "get_time",
    "description": "The current time in a timezone",
    "parameters": {
        "type": "object",
        "properties": {"timezone": {"type": "string", "maxLength": 30}},
        "required": ["timezone"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What's the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def assert_valid_call(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def streamed_calls(stream) -> tuple[list[tuple[str, str]], str | None, str]:
    calls: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for fragment in delta.tool_calls or []:
            if fragment.id is not None:
                assert fragment.index not in calls and fragment.type == "function" and fragment.function.name
                calls[fragment.index] = [fragment.function.name, ""]
            calls[fragment.index][1] += fragment.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish, content


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_calls_that_function(client, model_name, stream):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model=model_name, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0.7,
                  seed=1)
    if stream:
        calls, finish, content = streamed_calls(client.chat.completions.create(**kwargs, stream=True))
        assert content == ""
    else:
        response = client.chat.completions.create(**kwargs)
        message, finish = response.choices[0].message, response.choices[0].finish_reason
        assert message.content is None
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls]
        assert all(c.id.startswith("call_") and c.type == "function" for c in message.tool_calls)
    assert finish == "tool_calls"
    assert len(calls) == 1
    assert_valid_call(*calls[0], allowed={"get_weather"})


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_calls_one_of_the_tools(client, model_name, stream):
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    kwargs = dict(model=model_name, messages=messages, tools=TOOLS, tool_choice="required", max_tokens=120,
                  temperature=0)
    if stream:
        calls, finish, _ = streamed_calls(client.chat.completions.create(**kwargs, stream=True))
    else:
        response = client.chat.completions.create(**kwargs)
        calls = [(c.function.name, c.function.arguments) for c in response.choices[0].message.tool_calls]
        finish = response.choices[0].finish_reason
    assert finish == "tool_calls" and calls
    for call in calls:
        assert_valid_call(*call, allowed=set(SCHEMAS))


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "role": {"enum": ["student", "engineer", "artist", "other"]},
    },
    "required": ["name", "age", "city", "languages", "role"],
    "additionalProperties": False,
}
# The bounds make every valid output fit in max_tokens, even at 4 tokens per character.
PEOPLE = [
    "a retired sailor from Lisbon", "a young painter", "an engineer who builds bridges", "a student of Korean",
    "my grandmother", "a chess champion", "a baker in Lyon", "an astronaut", "a shy poet", "a farmer in Kenya",
]


def test_json_schema_response_format_validates_for_ten_prompts(client, model_name):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(person: str) -> str:
        messages = [{"role": "user", "content": f"Describe {person} as JSON."}]
        response = client.chat.completions.create(model=model_name, messages=messages, response_format=response_format,
                                                  max_tokens=400, temperature=0)
        assert response.choices[0].finish_reason == "stop"
        return response.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(PEOPLE)) as pool:  # decoded together in the engine's batches
        outputs = list(pool.map(ask, PEOPLE))
    for output in outputs:
        jsonschema.validate(json.loads(output), PERSON)
    assert len(set(outputs)) > 1  # the prompts matter


def test_an_unsupported_schema_is_a_400(client, model_name):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=ASK, max_tokens=10,
                                       response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert "uniqueItems" in info.value.message


def test_tool_calling_example_round_trip(server):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tool_calling.py"), server.url + "/v1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "Function called: get_weather"
    arguments = json.loads(lines[1].removeprefix("Arguments: "))
    assert lines[1].startswith("Arguments: ") and set(arguments) == {"location", "unit"}
    assert lines[2].startswith("Result: ") and arguments["location"] in lines[2]
    assert lines[3].startswith("Answer: ")
