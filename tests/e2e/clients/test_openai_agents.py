"""The OpenAI Agents SDK's `OpenAIChatCompletionsModel` against the real server on the default
model: an agent with a function tool, the tool forced on the first turn, runs to a final answer;
an agent with an output type gets a validated instance."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import openai
import pytest
from agents import (Agent, MessageOutputItem, ModelSettings, OpenAIChatCompletionsModel, Runner, ToolCallItem,
                    ToolCallOutputItem, function_tool)
from agents.result import RunResultBase
from pydantic import BaseModel, ConfigDict, Field

MAX_TURNS = 3  # the tool call, then the answer; a third turn would be the SDK's loop going wrong


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
def weather() -> WeatherTool:
    return WeatherTool()


@pytest.fixture
def model(server, model_name) -> OpenAIChatCompletionsModel:
    """One per test: an async client's connections belong to the event loop of the run that opened them."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    return OpenAIChatCompletionsModel(model=model_name, openai_client=client)


def weather_agent(model, weather: WeatherTool, **settings) -> Agent:
    return Agent(name="weather", instructions="Answer questions about the weather.", tools=[weather.tool], model=model,
                 model_settings=ModelSettings(temperature=0, max_tokens=60, **settings))


def assert_called_once_then_answered(result: RunResultBase, weather: WeatherTool) -> None:
    # The SDK resets a forced tool_choice after the call (reset_tool_choice), so the second turn answers.
    assert [type(item) for item in result.new_items] == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    call, output = result.new_items[0].raw_item, result.new_items[1]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": weather.cities[0]}
    assert len(weather.cities) == 1 and 0 < len(weather.cities[0]) <= 30
    assert output.output == f"It is sunny and 21 degrees in {weather.cities[0]}."
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert len(result.raw_responses) == 2


def test_a_named_tool_is_called_and_the_run_completes(model, weather):
    agent = weather_agent(model, weather, tool_choice="get_weather")
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=MAX_TURNS)
    assert_called_once_then_answered(result, weather)
    usage = result.context_wrapper.usage
    assert usage.requests == 2 and usage.input_tokens > 0 and usage.output_tokens > 0


def test_a_required_tool_streamed_is_called_and_the_run_completes(model, weather):
    # include_usage: the SDK asks a server that is not OpenAI's for streamed usage only when told
    agent = weather_agent(model, weather, tool_choice="required", include_usage=True)

    async def run():
        result = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=MAX_TURNS)
        names = [event.name async for event in result.stream_events() if event.type == "run_item_stream_event"]
        return result, names

    result, names = asyncio.run(run())
    assert result.is_complete and names == ["tool_called", "tool_output", "message_output_created"]
    assert_called_once_then_answered(result, weather)
    usage = result.context_wrapper.usage
    assert usage.requests == 2 and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")  # bounded fields: every valid answer fits in max_tokens
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    climate: Literal["cold", "temperate", "hot"]


def test_an_output_type_gives_a_validated_instance(model):
    # The SDK sends the type's schema as response_format json_schema (strict); the server constrains to it.
    agent = Agent(name="cities", instructions="Describe cities.", output_type=City, model=model,
                  model_settings=ModelSettings(temperature=0, max_tokens=100))
    result = Runner.run_sync(agent, "Describe Paris.", max_turns=1)
    assert isinstance(result.final_output, City)
    assert [type(item) for item in result.new_items] == [MessageOutputItem]
    assert City.model_validate_json(result.new_items[0].raw_item.content[0].text) == result.final_output
