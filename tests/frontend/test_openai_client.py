"""The `openai` client parses our responses, streams and errors (through the test transport)."""

from __future__ import annotations

import openai
import pytest
from fake_model import MODEL_NAME, text_script


@pytest.fixture
def api(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key="unused", http_client=client, max_retries=0)


def test_chat_completion(api, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world!")
    completion = api.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1
    )
    choice = completion.choices[0]
    assert choice.message.content == "Hello world!" and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.logprobs.content[0].token == "Hell"
    assert completion.usage.completion_tokens == len(tokenizer.encode("Hello world!")) + 1


def test_chat_completion_stream(api, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world!")
    chunks = list(
        api.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world!"
    assert chunks[-1].usage.total_tokens > 0


def test_completion_and_stream(api, engine, tokenizer):
    engine.script = text_script(tokenizer, " there")
    completion = api.completions.create(model=MODEL_NAME, prompt="Hello", echo=True, logprobs=1)
    assert completion.choices[0].text == "Hello there"
    assert completion.choices[0].logprobs.tokens[0] == "Hell"
    text = "".join(c.choices[0].text for c in api.completions.create(model=MODEL_NAME, prompt="Hello", stream=True))
    assert text == " there"


def test_errors_become_openai_exceptions(api, engine):
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=MODEL_NAME, prompt="x", temperature=9)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    engine.die_after_steps = 1
    with pytest.raises(openai.APIError, match="engine"):
        list(api.completions.create(model=MODEL_NAME, prompt="x", stream=True))


def test_models(api):
    assert [m.id for m in api.models.list()] == [MODEL_NAME]
    assert api.models.retrieve(MODEL_NAME).id == MODEL_NAME
