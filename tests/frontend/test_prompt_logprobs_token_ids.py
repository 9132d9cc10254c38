"""vLLM's prompt_logprobs and return_token_ids on both endpoints, and --max-logprobs, with the
fake engine (whose prompt entries rank the prompt's own token first)."""

from __future__ import annotations

import pytest
from fake_model import parse_sse

CHAT = {"messages": [{"role": "user", "content": "hi there"}]}
COMPLETION = {"prompt": "hello big world"}
OUTPUT = "Hello world!"


def post(client, endpoint: str, **fields):
    path, base = ("/v1/chat/completions", CHAT) if endpoint == "chat" else ("/v1/completions", COMPLETION)
    return client.post(path, json={**base, "max_tokens": 8, **fields})


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_prompt_logprobs_has_one_entry_per_prompt_token(make_client, tokenizer, endpoint):
    client, engine = make_client(OUTPUT)
    body = ok(post(client, endpoint, prompt_logprobs=2))
    prompt_ids = engine.requests[-1].prompt_token_ids
    assert engine.requests[-1].sampling_params.prompt_logprobs == 2
    entries = body["prompt_logprobs"] if endpoint == "chat" else body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for position, (token_id, entry) in enumerate(zip(prompt_ids[1:], entries[1:])):
        assert str(token_id) in entry and len(entry) <= 3  # its own token and the top 2
        own = entry[str(token_id)]
        assert own["rank"] == 1 and own["logprob"] == pytest.approx(-0.25 - position / 100)
        assert own["decoded_token"] == tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])


def test_prompt_logprobs_zero_gives_the_prompt_tokens_only(make_client):
    client, engine = make_client(OUTPUT)
    entries = ok(post(client, "completions", prompt_logprobs=0))["choices"][0]["prompt_logprobs"]
    assert all(len(entry) == 1 for entry in entries[1:])


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_without_prompt_logprobs_none_are_computed(make_client, endpoint):
    client, engine = make_client(OUTPUT)
    body = ok(post(client, endpoint))
    assert engine.requests[-1].sampling_params.prompt_logprobs is None
    assert (body.get("prompt_logprobs") if endpoint == "chat" else body["choices"][0]["prompt_logprobs"]) is None


def test_echo_logprobs_and_prompt_logprobs_share_one_engine_computation(make_client):
    client, engine = make_client(OUTPUT)
    body = ok(post(client, "completions", echo=True, logprobs=1, prompt_logprobs=3))
    assert engine.requests[-1].sampling_params.prompt_logprobs == 3
    choice = body["choices"][0]
    assert all(len(top) <= 1 for top in choice["logprobs"]["top_logprobs"] if top)  # echo keeps its own 1
    assert max(len(entry) for entry in choice["prompt_logprobs"][1:]) > 1


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_return_token_ids_streamed_and_not(make_client, tokenizer, endpoint):
    client, engine = make_client(OUTPUT)
    body = ok(post(client, endpoint, return_token_ids=True, n=2))
    prompt_ids = engine.requests[-1].prompt_token_ids
    output_ids = tokenizer.encode("Hello world!", add_special_tokens=False)
    if endpoint == "chat":
        assert body["prompt_token_ids"] == prompt_ids
    for choice in body["choices"]:
        if endpoint == "completions":
            assert choice["prompt_token_ids"] == prompt_ids
        assert choice["token_ids"][: len(output_ids)] == output_ids

    response = post(client, endpoint, return_token_ids=True, n=2, stream=True)
    chunks = [c for c in parse_sse(response.text) if isinstance(c, dict)]
    for index, choice in enumerate(body["choices"]):
        streamed = [c for chunk in chunks for c in chunk["choices"] if c["index"] == index]
        assert sum((c["token_ids"] or [] for c in streamed), []) == choice["token_ids"]
        firsts = [c["prompt_token_ids"] for c in streamed if c.get("prompt_token_ids")]
        if endpoint == "completions":
            assert firsts == [prompt_ids]
    if endpoint == "chat":
        assert [c["prompt_token_ids"] for c in chunks if "prompt_token_ids" in c] == [prompt_ids]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_without_return_token_ids_there_are_none(make_client, endpoint):
    client, _ = make_client(OUTPUT)
    body = ok(post(client, endpoint))
    assert body["choices"][0]["token_ids"] is None and body.get("prompt_token_ids") is None


@pytest.mark.parametrize(
    "endpoint, fields, param",
    [
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"prompt_logprobs": 6}, "prompt_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ("chat", {"prompt_logprobs": 6}, "prompt_logprobs"),
        ("chat", {"prompt_logprobs": -1}, "prompt_logprobs"),
        ("chat", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_max_logprobs_bounds_every_logprobs_field(make_client, endpoint, fields, param):
    client, engine = make_client(OUTPUT, max_logprobs=5)
    response = post(client, endpoint, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert engine.requests == []
    limit = {k: (5 if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in fields.items()}
    if "stream" not in fields:
        assert "5" in error["message"]
        ok(post(client, endpoint, **limit))  # at the limit: fine
