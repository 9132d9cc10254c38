"""Tool calling and response_format through the app, with the fake engine playing model outputs."""

from __future__ import annotations

import json

import pytest
from fake_model import parse_sse

from ipc.messages import StructuredOutputKind

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
HERMES_OUTPUT = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def chat(client, **body) -> dict:
    body.setdefault("messages", USER)
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def streamed_message(client, **body) -> tuple[dict, list[dict]]:
    """The message a client assembles from the stream, and the stream's choice deltas."""
    body.setdefault("messages", USER)
    response = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    choices = [event["choices"][0] for event in parse_sse(response.text) if event["choices"]]
    content = "".join(c["delta"].get("content") or "" for c in choices)
    calls: dict[int, dict] = {}
    for c in choices:
        for fragment in c["delta"].get("tool_calls") or []:
            call = calls.setdefault(fragment["index"], {"function": {"arguments": ""}})
            for key in ("id", "type"):
                if key in fragment:
                    assert key not in call, "only the first fragment names the call"
                    call[key] = fragment[key]
            function = fragment.get("function") or {}
            if "name" in function:
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
    message = {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)] or None}
    return message, choices


def assert_400(response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


# ---- auto: the server's parser reads the model's own calls


def test_auto_parses_calls_and_streams_the_same_message(make_client):
    client, engine = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    choice = chat(client, tools=[WEATHER_TOOL, TIME_TOOL])["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] == "Let me look."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] \
        == [("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {})]
    assert engine.requests[-1].sampling_params.structured_output is None  # auto is not constrained

    streamed, choices = streamed_message(client, tools=[WEATHER_TOOL, TIME_TOOL])
    assert choices[-1]["finish_reason"] == "tool_calls"
    assert streamed["content"] == message["content"]
    for got, want in zip(streamed["tool_calls"], message["tool_calls"], strict=True):
        assert got["type"] == "function" and got["id"].startswith("call_")
        assert got["function"] == want["function"]


def test_a_call_cut_by_a_stop_string_is_content_that_ends_with_stop(make_client):
    """A stop string inside a call's arguments leaves invalid JSON: not a call, but the text."""
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    cut = HERMES_OUTPUT[: HERMES_OUTPUT.index("city")]
    assert cut.endswith('"arguments": {"')
    choice = chat(client, tools=[WEATHER_TOOL], stop=["city"])["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "city")
    assert choice["message"]["content"] == cut and not choice["message"].get("tool_calls")
    streamed, choices = streamed_message(client, tools=[WEATHER_TOOL], stop=["city"])
    assert (choices[-1]["finish_reason"], choices[-1]["stop_reason"]) == ("stop", "city")
    assert streamed == {"content": cut, "tool_calls": None}


def test_with_stop_strings_whole_calls_still_stream_and_end_with_tool_calls(make_client):
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    body = {"tools": [WEATHER_TOOL, TIME_TOOL], "stop": ["never said"]}
    choice = chat(client, **body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 2
    streamed, choices = streamed_message(client, **body)
    assert choices[-1]["finish_reason"] == "tool_calls"
    assert streamed["content"] == choice["message"]["content"] == "Let me look."
    assert [c["function"] for c in streamed["tool_calls"]] == [c["function"] for c in choice["message"]["tool_calls"]]


def test_auto_without_calls_is_plain_content(make_client):
    client, _ = make_client("It is sunny {usually} <b>today</b>.", enable_auto_tool_choice=True,
                            tool_call_parser="llama3_json")
    choice = chat(client, tools=[WEATHER_TOOL])["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny {usually} <b>today</b>."}
    assert choice["finish_reason"] == "stop"
    streamed, _ = streamed_message(client, tools=[WEATHER_TOOL])
    assert streamed == {"content": "It is sunny {usually} <b>today</b>.", "tool_calls": None}


def test_tools_default_to_auto_when_enabled_and_to_none_otherwise(make_client):
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert chat(client, tools=[WEATHER_TOOL])["choices"][0]["message"]["tool_calls"]
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=False, tool_call_parser=None)
    assert chat(client, tools=[WEATHER_TOOL])["choices"][0]["message"] == {"role": "assistant", "content": HERMES_OUTPUT}


def test_tool_choice_none_is_not_parsed(make_client):
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    choice = chat(client, tools=[WEATHER_TOOL], tool_choice="none")["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": HERMES_OUTPUT}
    assert choice["finish_reason"] == "stop"


# ---- required and named: constrained to the tools' schemas, read as llama3_json


def test_named_tool_choice_constrains_to_that_function(make_client):
    output = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
    client, engine = make_client(output)
    body = {"tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = chat(client, **body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}

    spec = engine.requests[-1].sampling_params.structured_output
    assert spec.kind == StructuredOutputKind.JSON_SCHEMA
    schema = json.loads(spec.spec)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["parameters"] == WEATHER_TOOL["function"]["parameters"]

    streamed, _ = streamed_message(client, **body)
    assert streamed["tool_calls"][0]["function"] == call["function"] and streamed["content"] is None


def test_required_allows_any_tool_and_several_calls(make_client):
    output = '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    client, engine = make_client(output)
    message = chat(client, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time", "get_weather"]
    spec = engine.requests[-1].sampling_params.structured_output
    assert spec.kind == StructuredOutputKind.GRAMMAR and '"; "' in spec.spec
    assert '{"const": "get_time"}' in spec.spec and '"additionalProperties": false' in spec.spec

    chat(client, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False)
    single = engine.requests[-1].sampling_params.structured_output
    assert single.kind == StructuredOutputKind.JSON_SCHEMA
    assert [s["properties"]["name"]["const"] for s in json.loads(single.spec)["anyOf"]] == ["get_weather", "get_time"]


# ---- response_format


def test_response_format_json_schema_and_json_object(make_client):
    client, engine = make_client('{"answer": 4}')
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "math", "schema": schema}}}
    assert chat(client, **body)["choices"][0]["message"]["content"] == '{"answer": 4}'
    spec = engine.requests[-1].sampling_params.structured_output
    assert spec.kind == StructuredOutputKind.JSON_SCHEMA and json.loads(spec.spec) == schema
    chat(client, response_format={"type": "json_object"})
    assert engine.requests[-1].sampling_params.structured_output.kind == StructuredOutputKind.JSON_OBJECT
    chat(client, response_format={"type": "text"})
    assert engine.requests[-1].sampling_params.structured_output is None


# ---- errors, all before generation


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"tools": [WEATHER_TOOL], "tool_choice": "auto"}, "tool_choice", "--enable-auto-tool-choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "'nope'"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "needs tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "array", "uniqueItems": True}}}}, "response_format", "uniqueItems"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "response_format", "schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
          "tool_choice": "required"}, "tools", "not"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format", "cannot be combined"),
        ({"response_format": {"type": "json_object"}, "use_beam_search": True, "n": 2}, "use_beam_search", "Beam"),
        ({"tools": [WEATHER_TOOL, {"type": "function", "function": {"name": ""}}], "tool_choice": "required"},
         "tools", "needs a name"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools", "needs a name"),
    ],
)
def test_impossible_requests_are_400_before_generation(make_client, body, param, words):
    client, engine = make_client("unused")
    message = assert_400(client.post("/v1/chat/completions", json={"messages": USER, **body}), param)
    assert words in message
    assert engine.requests == []


# ---- the chat template sees tools, calls and results

TOOL_TEMPLATE = (
    "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "call {{ c.function.name }} city={{ c.function.arguments.city }}{% endfor %}"
    "{% elif m.role == 'tool' %}result for {{ m.tool_call_id }}: {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_calls_and_results_reach_the_chat_template(make_client, tmp_path, tokenizer):
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    client, engine = make_client("It is 21 degrees.", chat_template=str(template))
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    assert chat(client, messages=messages, tools=[WEATHER_TOOL])["choices"][0]["message"]["content"] == "It is 21 degrees."
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert prompt.startswith("[tool get_weather]<|im_start|>user\nWeather in Paris?")
    assert "call get_weather city=Paris" in prompt and "result for call_1: 21 C" in prompt


def test_a_tool_round_trip_renders_with_a_template_that_knows_no_tools(make_client, tokenizer):
    """ChatML joins strings: the call message (content null, as clients send it back) renders
    as an empty assistant turn, and the result as a "tool" turn."""
    client, engine = make_client("It is 21 degrees.")
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    chat(client, messages=messages, tools=[WEATHER_TOOL])
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert "<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n21 C<|im_end|>\n<|im_start|>assistant\n" in prompt


def test_each_choice_has_its_own_parser(make_client):
    client, _ = make_client(HERMES_OUTPUT, enable_auto_tool_choice=True, tool_call_parser="hermes")
    choices = chat(client, tools=[WEATHER_TOOL, TIME_TOOL], n=2)["choices"]
    ids = [call["id"] for c in choices for call in c["message"]["tool_calls"]]
    assert len(ids) == 4 == len(set(ids))
    response = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL], "n": 2, "stream": True})
    names: dict[int, list[str]] = {0: [], 1: []}
    for event in parse_sse(response.text):
        for choice in event["choices"]:
            for fragment in choice["delta"].get("tool_calls") or []:
                if "function" in fragment and "name" in fragment["function"]:
                    names[choice["index"]].append(fragment["function"]["name"])
    assert names == {0: ["get_weather", "get_time"], 1: ["get_weather", "get_time"]}
