"""LlamaIndex's `OpenAILike` (llama-index-llms-openai-like) against the real server on the
default model: complete over the Completions API, chat and stream_chat over the Chat API."""

from __future__ import annotations

import pytest
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.llms.openai_like import OpenAILike

CAPITAL = [ChatMessage(role=MessageRole.USER, content="What is the capital of France?")]


def openai_like(server, model_name, *, is_chat_model: bool) -> OpenAILike:
    # context_window given: OpenAILike does not ask the server (nor tiktoken) for it
    return OpenAILike(model=model_name, api_base=server.url + "/v1", api_key="unused", is_chat_model=is_chat_model,
                      context_window=8192, temperature=0, max_tokens=30, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def text_llm(server, model_name) -> OpenAILike:
    return openai_like(server, model_name, is_chat_model=False)


@pytest.fixture(scope="module")
def chat_llm(server, model_name) -> OpenAILike:
    return openai_like(server, model_name, is_chat_model=True)


def test_complete_uses_the_completions_api(text_llm, model_name):
    response = text_llm.complete("The capital of France is")
    assert response.text and response.raw.object == "text_completion" and response.raw.model == model_name
    assert response.raw.choices[0].text == response.text
    streamed = list(text_llm.stream_complete("The capital of France is"))
    assert len([r for r in streamed if r.delta]) > 2
    assert "".join(r.delta for r in streamed) == streamed[-1].text == response.text


def test_complete_on_a_chat_model_uses_the_chat_api(chat_llm):
    response = chat_llm.complete("What is the capital of France?")
    assert "Paris" in response.text and response.raw.object == "chat.completion"


def test_stream_chat_concatenates_to_chat(chat_llm):
    full = chat_llm.chat(CAPITAL)
    assert full.message.role == MessageRole.ASSISTANT and "Paris" in full.message.content
    assert full.raw.choices[0].finish_reason == "stop"
    streamed = list(chat_llm.stream_chat(CAPITAL))
    deltas = [r.delta for r in streamed]
    assert len([d for d in deltas if d]) > 2
    assert "".join(deltas) == streamed[-1].message.content == full.message.content
