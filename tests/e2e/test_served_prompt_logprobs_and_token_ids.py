"""vLLM's prompt_logprobs and return_token_ids from the real server on the default model."""

from __future__ import annotations

import httpx
import pytest


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(server.url + path, json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_prompt_logprobs_agree_with_echoed_logprobs(server, model_name):
    body = post(server, "/v1/completions", {"model": model_name, "prompt": "The capital of France is Paris.",
                                            "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2,
                                            "prompt_logprobs": 2, "return_token_ids": True})
    choice = body["choices"][0]
    prompt_ids = choice["prompt_token_ids"]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    echoed = choice["logprobs"]["token_logprobs"][: len(prompt_ids)]
    for token_id, entry, echo_logprob in zip(prompt_ids[1:], entries[1:], echoed[1:]):
        own = entry[str(token_id)]
        assert own["logprob"] == pytest.approx(echo_logprob, abs=1e-4)
        assert own["logprob"] <= 0 and own["rank"] >= 1
        assert max(entry.values(), key=lambda e: e["logprob"])["rank"] == 1
        assert sum(e["logprob"] > own["logprob"] for e in entry.values()) < own["rank"]  # rank: 1 + those above


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_return_token_ids_spell_the_prompt_and_the_output(server, model_name, path):
    base = {"prompt": "Once upon a time"} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "Say hello."}]}
    body = post(server, path, {"model": model_name, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
                               "skip_special_tokens": False, **base})
    choice = body["choices"][0]
    prompt_ids = choice["prompt_token_ids"] if path == "/v1/completions" else body["prompt_token_ids"]
    assert len(prompt_ids) == body["usage"]["prompt_tokens"]
    assert len(choice["token_ids"]) == body["usage"]["completion_tokens"]
    text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
    spelled = post(server, "/detokenize", {"model": model_name, "tokens": choice["token_ids"]})["prompt"]
    assert spelled.startswith(text)
    if path == "/v1/completions":
        assert post(server, "/tokenize", {"model": model_name, "prompt": base["prompt"]})["tokens"] == prompt_ids
