"""Clients that speak the Responses API against the real server on the default model: the OpenAI
Agents SDK's default model class (`OpenAIResponsesModel`) runs a one-tool agent, streamed and
not, and LangChain's `ChatOpenAI(use_responses_api=True)` answers and calls a tool."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import openai
import pytest
from agents import (Agent, MessageOutputItem, ModelSettings, OpenAIResponsesModel, Runner, ToolCallItem,
                    ToolCallOutputItem, function_tool)
from agents.result import RunResultBase
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from pydantic import Field

MAX_TURNS = 3  # the tool call, then the answer


class WeatherTool:
    """A function tool that records the arguments it was called with."""

    def __init__(self):
        self.cities: list[str] = []

        @function_tool
        def get_weather(city: Annotated[str, Field(max_length=30)]) -> str:
            """Get the current weather in a city."""
            self.cities.append(city)
            return f"It is sunny and 21 degrees in {city}."

        self.tool = get_weather


@pytest.fixture
def model(server, model_name) -> OpenAIResponsesModel:
    """One per test: an async client's connections belong to the event loop of the run that opened them."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    return OpenAIResponsesModel(model=model_name, openai_client=client)


def weather_agent(model, weather: WeatherTool, **settings) -> Agent:
    # tool_choice forces the call: a 135M model does not reliably choose a tool by itself
    return Agent(name="weather", instructions="Answer questions about the weather.", tools=[weather.tool], model=model,
                 model_settings=ModelSettings(temperature=0, max_tokens=60, **settings))


def assert_called_once_then_answered(result: RunResultBase, weather: WeatherTool) -> None:
    # The SDK resets a forced tool_choice after the call, so the second turn answers in text.
    assert [type(item) for item in result.new_items] == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    call, output = result.new_items[0].raw_item, result.new_items[1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": weather.cities[0]}
    assert len(weather.cities) == 1 and 0 < len(weather.cities[0]) <= 30
    assert output.output == f"It is sunny and 21 degrees in {weather.cities[0]}."
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert len(result.raw_responses) == 2
    usage = result.context_wrapper.usage
    assert usage.requests == 2 and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_the_agents_sdk_default_model_runs_a_one_tool_agent(model):
    weather = WeatherTool()
    result = Runner.run_sync(weather_agent(model, weather, tool_choice="get_weather"), "What is the weather in Paris?",
                             max_turns=MAX_TURNS)
    assert_called_once_then_answered(result, weather)
    assert all(response.response_id.startswith("resp_") for response in result.raw_responses)


def test_the_agents_sdk_default_model_streamed_runs_a_one_tool_agent(model):
    weather = WeatherTool()
    agent = weather_agent(model, weather, tool_choice="required")

    async def run():
        result = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=MAX_TURNS)
        names = [event.name async for event in result.stream_events() if event.type == "run_item_stream_event"]
        return result, names

    result, names = asyncio.run(run())
    assert result.is_complete and names == ["tool_called", "tool_output", "message_output_created"]
    assert_called_once_then_answered(result, weather)


@pytest.fixture(scope="module")
def llm(server, model_name) -> ChatOpenAI:
    return ChatOpenAI(model=model_name, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=60,
                      max_retries=0, timeout=300, use_responses_api=True)


def test_langchain_with_the_responses_api_answers(llm):
    message = llm.invoke("What is the capital of France?")
    assert isinstance(message, AIMessage) and "Paris" in message.text
    assert message.response_metadata["id"].startswith("resp_")
    assert message.usage_metadata["input_tokens"] > 0 and message.usage_metadata["output_tokens"] > 0


def test_langchain_with_the_responses_api_calls_a_forced_tool(llm):
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert call["id"].startswith("call_")
