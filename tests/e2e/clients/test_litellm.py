"""LiteLLM against the real server on the default model, through both of the prefixes that
route to an OpenAI-compatible server: `openai/` and `hosted_vllm/`; sync and async, streamed
and not."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import litellm
import pytest

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
PREFIXES = ["openai", "hosted_vllm"]
# LiteLLM's own types, built on first use, warn about ReadOnly TypedDict items under pydantic
pytestmark = pytest.mark.filterwarnings(r"ignore:Items? .+ on TypedDict class:UserWarning")


@pytest.fixture(scope="module")
def route(server, model_name):
    """The arguments that send a LiteLLM call to the server, for a model prefix."""
    def arguments(prefix: str) -> dict:
        return dict(model=f"{prefix}/{model_name}", api_base=server.url + "/v1", api_key="unused", timeout=300,
                    max_retries=0)
    return arguments


def streamed(chunks) -> tuple[list[str], str | None]:
    deltas, finish = [], None
    for chunk in chunks:
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return deltas, finish


@pytest.mark.parametrize("prefix", PREFIXES)
def test_completion_answers(route, model_name, prefix):
    response = litellm.completion(**route(prefix), messages=CAPITAL, temperature=0, max_tokens=30)
    choice = response.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert response.model == model_name and response.id.startswith("chatcmpl-")
    usage = response.usage
    assert usage.prompt_tokens > 10 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("prefix", PREFIXES)
def test_stream_concatenates_to_the_completion(route, prefix):
    kwargs = dict(**route(prefix), messages=CAPITAL, temperature=0, max_tokens=30)
    deltas, finish = streamed(litellm.completion(**kwargs, stream=True))
    assert len([d for d in deltas if d]) > 2 and finish == "stop"
    assert "".join(deltas) == litellm.completion(**kwargs).choices[0].message.content


def test_async_stream_concatenates_to_the_completion(route):
    kwargs = dict(**route("hosted_vllm"), messages=CAPITAL, temperature=0, max_tokens=30)

    async def stream() -> tuple[list[str], str | None]:
        chunks = [chunk async for chunk in await litellm.acompletion(**kwargs, stream=True)]
        return streamed(chunks)

    deltas, finish = asyncio.run(stream())
    assert len([d for d in deltas if d]) > 2 and finish == "stop"
    assert "".join(deltas) == litellm.completion(**kwargs).choices[0].message.content


def test_text_completion_goes_to_the_completions_api(route):
    response = litellm.text_completion(**route("openai"), prompt="The sky is", temperature=0, max_tokens=5)
    assert response.object == "text_completion" and response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5 and response.choices[0].text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_named_tool_choice_gives_a_parsed_call(route, prefix):
    response = litellm.completion(**route(prefix), messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  temperature=0, max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_calls_rebuild_to_the_non_streamed_ones(route):
    kwargs = dict(**route("hosted_vllm"), messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                  tool_choice="required", temperature=0, max_tokens=60)
    chunks = list(litellm.completion(**kwargs, stream=True))
    assert len(chunks) > 2
    rebuilt = litellm.stream_chunk_builder(chunks).choices[0]  # LiteLLM's merge of the tool call deltas
    whole = litellm.completion(**kwargs).choices[0]
    assert rebuilt.finish_reason == whole.finish_reason == "tool_calls"
    calls = [(c.function.name, c.function.arguments) for c in rebuilt.message.tool_calls]
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    for name, arguments in calls:
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
