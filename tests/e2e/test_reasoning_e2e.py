"""--reasoning-parser deepseek_r1 on the real server with the default model and an R1-style chat
template (the generation prompt opens the think block): a regex makes the model write its
thinking, with or without repeating `<think>`, then `</think>` and its answer (or a hermes tool
call); the openai client sees the block as message.reasoning_content, streamed as reasoning
chunks before the content, and the stream assembles to the same split as the whole response."""

from __future__ import annotations

import json
import re

import openai
import pytest

from server import Server

THINK = r"<think>[a-z ]{3,30}</think>"
ANSWER = r"The answer is [0-9]{1,3}\."
ANSWER_REGEX = THINK + ANSWER
OPENED_ANSWER_REGEX = r"[a-z ]{3,30}</think>" + ANSWER  # the template wrote the <think>
# ChatML, as the default model's, with DeepSeek-R1's habit of opening the think block
R1_STYLE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_REGEX = THINK + re.escape(CALL)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PROMPTS = ["What is 6 times 7?", "How many legs has a spider?"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    template = tmp_path_factory.mktemp("reasoning") / "r1_style.jinja"
    template.write_text(R1_STYLE_TEMPLATE)
    server = Server("--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                    "--chat-template", str(template)).wait_ready()
    model = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    yield model
    assert server.stop() == 0


def create(client, prompt: str, regex: str, **kwargs):
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": prompt}],
        temperature=0, max_tokens=80, extra_body={"structured_outputs": {"regex": regex}}, **kwargs)


def assembled_stream(client, prompt: str, regex: str, **kwargs) -> tuple[str, str, list]:
    reasoning, content, kinds, calls = [], [], [], []
    for chunk in create(client, prompt, regex, stream=True, **kwargs):
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                assert extra["reasoning"] == extra["reasoning_content"]
                reasoning.append(extra["reasoning_content"])
                kinds.append("reasoning")
            if choice.delta.content:
                content.append(choice.delta.content)
                kinds.append("content")
            calls.extend(choice.delta.tool_calls or [])
    assert kinds == sorted(kinds, key=lambda k: k == "content"), "reasoning chunks come before content"
    return "".join(reasoning), "".join(content), calls


@pytest.mark.parametrize("regex", [ANSWER_REGEX, OPENED_ANSWER_REGEX], ids=["tag-repeated", "tag-in-prompt"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_think_block_is_reasoning_content_streamed_and_not(client, prompt, regex):
    response = create(client, prompt, regex)
    message = response.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert message.model_extra["reasoning"] == reasoning
    assert re.fullmatch(r"[a-z ]{3,30}", reasoning), reasoning
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", message.content), message.content
    details = response.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < response.usage.completion_tokens
    assert assembled_stream(client, prompt, regex) == (reasoning, message.content, [])


def test_a_tool_call_after_the_think_block(client):
    response = create(client, PROMPTS[0], CALL_REGEX, tools=[WEATHER_TOOL])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert re.fullmatch(r"[a-z ]{3,30}", choice.message.model_extra["reasoning_content"])
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    reasoning, content, calls = assembled_stream(client, PROMPTS[0], CALL_REGEX, tools=[WEATHER_TOOL])
    assert (reasoning, content) == (choice.message.model_extra["reasoning_content"], "")
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}
