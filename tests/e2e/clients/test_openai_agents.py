"""The OpenAI Agents SDK's `OpenAIChatCompletionsModel` against the real server on the default
model: an agent with a function tool, the tool forced on the first turn, runs to a final answer;
an agent with an output type gets a validated instance."""

from __future__ import annotations

from typing import Literal

import pytest
from agent_helpers import (MAX_TURNS, WeatherTool, assert_called_once_then_answered, assert_streamed_call_then_answer,
                           async_client, weather_agent)
from agents import Agent, MessageOutputItem, ModelSettings, OpenAIChatCompletionsModel, Runner
from pydantic import BaseModel, ConfigDict, Field


@pytest.fixture
def weather() -> WeatherTool:
    return WeatherTool()


@pytest.fixture
def model(server, model_name) -> OpenAIChatCompletionsModel:
    return OpenAIChatCompletionsModel(model=model_name, openai_client=async_client(server))


def test_a_named_tool_is_called_and_the_run_completes(model, weather):
    agent = weather_agent(model, weather, tool_choice="get_weather")
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=MAX_TURNS)
    assert_called_once_then_answered(result, weather)


def test_a_required_tool_streamed_is_called_and_the_run_completes(model, weather):
    # include_usage: the SDK asks a server that is not OpenAI's for streamed usage only when told
    agent = weather_agent(model, weather, tool_choice="required", include_usage=True)
    assert_streamed_call_then_answer(agent, weather)


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
