"""--reasoning-parser through the app: the fake engine plays a reasoning model's output; the
think block becomes reasoning_content (and reasoning), streamed before the content, with the
same split streamed and not, per choice, and tool calls read from the content only."""

from __future__ import annotations

import json

from fake_model import parse_sse

USER = [{"role": "user", "content": "What is 2 + 2?"}]
THOUGHT = "\nTwo plus two: count </b> up <think> from two.\n"
ANSWER = "\n\nIt is 4."
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Qwen3's habit: with enable_thinking false the template closes an empty think block itself
QWEN3_LIKE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def chat(client, **body) -> dict:
    body.setdefault("messages", USER)
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client, **body) -> list[dict]:
    body.setdefault("messages", USER)
    response = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    return [event for event in parse_sse(response.text)]


def assembled(events: list[dict], index: int = 0) -> dict:
    """What a client assembles for choice `index`, checking that reasoning comes before content."""
    deltas = [c["delta"] for e in events for c in e["choices"] if c["index"] == index]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert reasoning == "".join(d.get("reasoning") or "" for d in deltas)
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=lambda k: k == "content"), "reasoning chunks come first"
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    return {"reasoning_content": reasoning or None, "content": content or None, "tool_calls": calls or None}


def test_deepseek_r1_splits_the_think_block_streamed_and_not(make_client):
    client, _ = make_client(f"<think>{THOUGHT}</think>{ANSWER}", reasoning_parser="deepseek_r1")
    response = chat(client)
    message = response["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == THOUGHT.replace("<think>", "")
    assert message["content"] == ANSWER
    details = response["usage"]["completion_tokens_details"]
    assert 0 < details["reasoning_tokens"] < response["usage"]["completion_tokens"]

    events = stream(client, stream_options={"include_usage": True})
    assert assembled(events) == {"reasoning_content": message["reasoning_content"], "content": ANSWER,
                                 "tool_calls": None}
    assert events[-1]["usage"] == response["usage"]


def test_deepseek_r1_without_the_opening_tag_or_the_closing_one(make_client):
    client, _ = make_client("all thinking, cut short", reasoning_parser="deepseek_r1")
    message = chat(client)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("all thinking, cut short", None)
    assert assembled(stream(client)) == {"reasoning_content": "all thinking, cut short", "content": None,
                                         "tool_calls": None}


def test_without_the_flag_the_think_block_is_content(make_client):
    text = f"<think>{THOUGHT}</think>{ANSWER}"
    client, _ = make_client(text)
    message = chat(client)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": text}
    assert "completion_tokens_details" not in chat(client)["usage"]


def test_each_choice_has_its_own_split(make_client):
    texts = ("<think>first</think>one", "no thinking here", "<think>third, never closed")
    client, _ = make_client(*texts, reasoning_parser="qwen3")
    choices = chat(client, n=3)["choices"]
    want = [("first", "one"), (None, "no thinking here"), ("third, never closed", None)]
    assert [(c["message"].get("reasoning_content"), c["message"]["content"]) for c in choices] == want
    events = stream(client, n=3)
    assert [(a["reasoning_content"], a["content"]) for a in (assembled(events, i) for i in range(3))] == want


def test_tool_calls_are_read_from_the_content_only(make_client):
    # a call written inside the think block is the model thinking about it, not a call
    thought = f"maybe {HERMES_CALL}?"
    client, _ = make_client(f"<think>{thought}</think>Checking.\n{HERMES_CALL}", reasoning_parser="qwen3",
                            enable_auto_tool_choice=True, tool_call_parser="hermes")
    choice = chat(client, tools=[WEATHER_TOOL])["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["reasoning_content"] == thought
    assert message["content"] == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] \
        == [("get_weather", {"city": "Paris"})]
    events = stream(client, tools=[WEATHER_TOOL])
    got = assembled(events)
    assert (got["reasoning_content"], got["content"]) == (thought, "Checking.")
    assert got["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "".join(c["function"].get("arguments") or "" for c in got["tool_calls"]) \
        == message["tool_calls"][0]["function"]["arguments"]
    assert [c for e in events for c in e["choices"]][-1]["finish_reason"] == "tool_calls"


def test_qwen3_enable_thinking_false_reaches_the_template_and_extracts_nothing(make_client, tmp_path, tokenizer):
    template = tmp_path / "qwen3_like.jinja"
    template.write_text(QWEN3_LIKE_TEMPLATE)
    text = f"<think>{THOUGHT}</think>{ANSWER}"
    client, engine = make_client(text, reasoning_parser="qwen3", chat_template=str(template))
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    message = chat(client, **off)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": text}
    assert assembled(stream(client, **off))["content"] == text
    prompt = tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat(client)["choices"][0]["message"]["reasoning_content"] == THOUGHT.replace("<think>", "")


def test_a_stop_string_inside_the_think_block_ends_it_as_reasoning(make_client):
    client, _ = make_client(f"<think>{THOUGHT}</think>{ANSWER}", reasoning_parser="deepseek_r1")
    choice = chat(client, stop=["count"])["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "count")
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == ("\nTwo plus two: ", None)
    assert assembled(stream(client, stop=["count"]))["reasoning_content"] == "\nTwo plus two: "
