"""LangChain's `ChatOpenAI` (langchain-openai) against the real server on the default model:
invoke, stream, tools and `with_structured_output` in both of its modes."""

from __future__ import annotations

import functools
import operator
from typing import Literal

import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

CAPITAL = "What is the capital of France?"


class City(BaseModel):
    """A city and a few facts about it."""

    # Bounded fields: every valid answer fits in max_tokens. Without extra="forbid" the schema
    # allows other properties (function-calling mode does not add additionalProperties: false).
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=100)
    climate: Literal["cold", "temperate", "hot"]


@pytest.fixture(scope="module")
def llm(server, model_name) -> ChatOpenAI:
    return ChatOpenAI(model=model_name, base_url=server.url + "/v1", api_key="unused", temperature=0,
                      max_tokens=120, max_retries=0, timeout=300, stream_usage=True)


def test_invoke_answers(llm, model_name):
    message = llm.invoke(CAPITAL)
    assert isinstance(message, AIMessage) and "Paris" in message.content
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.response_metadata["model_name"] == model_name
    usage = message.usage_metadata
    assert usage["input_tokens"] > 10 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_stream_concatenates_to_the_invoked_answer(llm):
    chunks = list(llm.stream(CAPITAL))
    assert len([c for c in chunks if c.content]) > 2
    streamed = functools.reduce(operator.add, chunks)  # LangChain's own merge of the chunks
    invoked = llm.invoke(CAPITAL)
    assert streamed.content == "".join(c.content for c in chunks) == invoked.content
    assert streamed.response_metadata["finish_reason"] == "stop"
    # stream_usage=True sends stream_options.include_usage: the last chunk carries the usage
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert streamed.usage_metadata[key] == invoked.usage_metadata[key]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_returns_a_valid_instance(llm, method):
    structured = llm.with_structured_output(City, method=method, include_raw=True)
    result = structured.invoke("Describe Paris.")
    assert result["parsing_error"] is None
    assert isinstance(result["parsed"], City)
    raw = result["raw"]
    if method == "json_schema":  # response_format json_schema: the content is the JSON
        assert raw.response_metadata["finish_reason"] == "stop"
        assert City.model_validate_json(raw.content) == result["parsed"]
    else:  # a tool named City, forced by tool_choice: one call with the fields as arguments
        assert raw.response_metadata["finish_reason"] == "tool_calls"
        assert [call["name"] for call in raw.tool_calls] == ["City"] and raw.invalid_tool_calls == []
        assert City.model_validate(raw.tool_calls[0]["args"]) == result["parsed"]


def test_bound_tools_with_required_choice_are_called(llm):
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Get the current weather in a city."""
        raise AssertionError("not run: the test only reads the call")

    def get_time(timezone: str) -> str:
        """The current time in a timezone."""
        raise AssertionError("not run: the test only reads the call")

    with_tools = llm.bind_tools([get_weather, get_time], tool_choice="any")  # "any" is sent as "required"
    message = with_tools.invoke("What's the weather like in Paris right now?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.tool_calls and message.invalid_tool_calls == []
    for call in message.tool_calls:
        assert call["id"].startswith("call_")
        if call["name"] == "get_weather":
            assert set(call["args"]) == {"city", "unit"} and call["args"]["unit"] in ("celsius", "fahrenheit")
        else:
            assert call["name"] == "get_time" and set(call["args"]) == {"timezone"}
