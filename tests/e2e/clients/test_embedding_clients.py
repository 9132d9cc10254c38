"""LangChain's `OpenAIEmbeddings` and LiteLLM's `embedding()` against the real server run as an
embedding model (`--runner pooling`, the `pooling_server` of tests/e2e/conftest.py, behind an API
key): each gets one unit vector per text, the same one the `openai` client gets."""

from __future__ import annotations

import math

import httpx
import litellm
import pytest
from langchain_openai import OpenAIEmbeddings

TEXTS = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog."]
HIDDEN_SIZE = 576
# LiteLLM's own types, built on first use, warn about ReadOnly TypedDict items under pydantic
pytestmark = pytest.mark.filterwarnings(r"ignore:Items? .+ on TypedDict class:UserWarning")


@pytest.fixture(scope="module")
def model(pooling_server) -> str:
    response = httpx.get(pooling_server.url + "/v1/models", headers={"Authorization": f"Bearer {pooling_server.api_key}"})
    return response.json()["data"][0]["id"]


@pytest.fixture(scope="module")
def reference(pooling_server, model) -> list[list[float]]:
    """The vectors as the API gives them in floats."""
    response = httpx.post(pooling_server.url + "/v1/embeddings", json={"model": model, "input": TEXTS},
                          headers={"Authorization": f"Bearer {pooling_server.api_key}"}, timeout=120)
    return [item["embedding"] for item in response.json()["data"]]


def assert_same_unit_vectors(got: list[list[float]], reference: list[list[float]]) -> None:
    assert len(got) == len(reference) == len(TEXTS)
    for vector, expected in zip(got, reference):
        assert len(vector) == HIDDEN_SIZE
        assert abs(math.sqrt(sum(x * x for x in vector)) - 1) < 1e-5
        assert max(abs(x - y) for x, y in zip(vector, expected)) < 1e-6


def test_langchain_openai_embeddings(pooling_server, model, reference):
    embeddings = OpenAIEmbeddings(model=model, base_url=pooling_server.url + "/v1", api_key=pooling_server.api_key,
                                  check_embedding_ctx_length=False, max_retries=0, timeout=120)
    assert_same_unit_vectors(embeddings.embed_documents(TEXTS), reference)
    assert_same_unit_vectors([embeddings.embed_query(text) for text in TEXTS], reference)


def test_litellm_embedding(pooling_server, model, reference):
    response = litellm.embedding(model=f"openai/{model}", input=TEXTS, api_base=pooling_server.url + "/v1",
                                 api_key=pooling_server.api_key, timeout=120, max_retries=0)
    assert_same_unit_vectors([item["embedding"] for item in response.data], reference)
    assert response.usage.prompt_tokens > len(TEXTS)
