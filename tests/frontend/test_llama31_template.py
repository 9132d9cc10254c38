"""examples/llama3.1_chat_template.jinja renders Llama 3.1's documented tool-calling format, and
the calls it writes back are what the llama3_json parser reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frontend.chat_template import ChatTemplate, ChatTemplateError
from frontend.tool_parsers import ToolParserRegistry

TEMPLATE = ChatTemplate(
    (Path(__file__).parents[2] / "examples" / "llama3.1_chat_template.jinja").read_text(),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
HEADER = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"


def render(messages, **kwargs) -> str:
    return TEMPLATE.render(messages, date_string="01 Jan 2025", **kwargs)


def test_a_tool_round_trip_in_the_model_cards_format():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    tool_json = json.dumps(TOOLS[0]["function"], indent=4)
    assert render(messages, tools=TOOLS) == (
        f"{HEADER}Today Date: 01 Jan 2025\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
        f"Do not use variables.\n\n{tool_json}\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n21 C<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_the_calls_it_writes_are_what_llama3_json_reads():
    second = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
    text = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [CALL, second]}],
                  add_generation_prompt=False)
    turn = text.rsplit("<|end_header_id|>\n\n", 1)[1].removesuffix("<|eot_id|>")
    content, calls = ToolParserRegistry.get("llama3_json")().extract(turn)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]


def test_without_tools_there_are_no_tool_instructions():
    text = render([{"role": "user", "content": "hi"}], tools=None)
    assert text == f"{HEADER}Today Date: 01 Jan 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_an_unknown_role_is_a_template_error():
    with pytest.raises(ChatTemplateError, match="no role"):
        render([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "meanwhile"}])
