"""What the OpenAI Agents SDK tests share, whichever model class they drive (chat completions in
test_openai_agents, the Responses API in test_responses_clients): an async client for the real
server, a recording weather tool, an agent that uses it, and the checks of a forced one-tool run
(streamed and not)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import openai
from agents import Agent, MessageOutputItem, ModelSettings, Runner, ToolCallItem, ToolCallOutputItem, function_tool
from agents.result import RunResultBase
from pydantic import Field

MAX_TURNS = 3  # the tool call, then the answer; a third turn would be the SDK's loop going wrong


def async_client(server) -> openai.AsyncOpenAI:
    """Make one per test: an async client's connections belong to the event loop of the run that
    opened them."""
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


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


def weather_agent(model, weather: WeatherTool, **settings) -> Agent:
    # callers force the call with tool_choice: a 135M model does not reliably choose a tool by itself
    return Agent(name="weather", instructions="Answer questions about the weather.", tools=[weather.tool], model=model,
                 model_settings=ModelSettings(temperature=0, max_tokens=60, **settings))


def assert_called_once_then_answered(result: RunResultBase, weather: WeatherTool) -> None:
    """Two model requests: one forced call of the tool with a valid city, then a text answer."""
    # The SDK resets a forced tool_choice after the call (reset_tool_choice), so the second turn answers.
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


def assert_streamed_call_then_answer(agent: Agent, weather: WeatherTool) -> None:
    """The agent's streamed run ends, its item events in order, as a forced one-tool run."""

    async def run():
        result = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=MAX_TURNS)
        names = [event.name async for event in result.stream_events() if event.type == "run_item_stream_event"]
        return result, names

    result, names = asyncio.run(run())
    assert result.is_complete and names == ["tool_called", "tool_output", "message_output_created"]
    assert_called_once_then_answered(result, weather)
