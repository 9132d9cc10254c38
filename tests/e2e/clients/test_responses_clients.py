"""Clients that speak the Responses API against the real server on the default model: the OpenAI
Agents SDK's default model class (`OpenAIResponsesModel`) runs a one-tool agent, streamed and
not, and LangChain's `ChatOpenAI(use_responses_api=True)` answers and calls a tool."""

from __future__ import annotations

import pytest
from agent_helpers import (MAX_TURNS, WeatherTool, assert_called_once_then_answered, assert_streamed_call_then_answer,
                           async_client, weather_agent)
from agents import OpenAIResponsesModel, Runner
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI


@pytest.fixture
def model(server, model_name) -> OpenAIResponsesModel:
    return OpenAIResponsesModel(model=model_name, openai_client=async_client(server))


def test_the_agents_sdk_default_model_runs_a_one_tool_agent(model):
    weather = WeatherTool()
    result = Runner.run_sync(weather_agent(model, weather, tool_choice="get_weather"), "What is the weather in Paris?",
                             max_turns=MAX_TURNS)
    assert_called_once_then_answered(result, weather)
    assert all(response.response_id.startswith("resp_") for response in result.raw_responses)


def test_the_agents_sdk_default_model_streamed_runs_a_one_tool_agent(model):
    weather = WeatherTool()
    agent = weather_agent(model, weather, tool_choice="required")
    assert_streamed_call_then_answer(agent, weather)


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
