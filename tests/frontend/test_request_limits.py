"""What a request may ask for: sequences in flight (admission), prompts per request, prompt
size (refused cheaply, tokenized off the event loop), nesting depth, and the small checks of
/health, /detokenize and content parts."""

from __future__ import annotations

import asyncio
import gc
import json
import threading

import pytest
from fake_model import MAX_MODEL_LEN, MODEL_NAME
from litestar.testing import TestClient
from test_streaming import post_scope, running

from frontend.app import create_app
from frontend.errors import OpenAIError
from frontend.protocol import CompletionRequest
from frontend.serving_completions import MAX_PROMPTS_PER_REQUEST
from ipc.messages import EngineReady

USER_HI = [{"role": "user", "content": "hi"}]


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- admission counts sequences ------------------------------------------------------------


@pytest.fixture
def small_bound(config):
    config.engine.max_num_seqs, config.max_waiting_requests = 2, 2  # 4 sequences in flight at most
    return config


def test_a_request_with_more_sequences_than_the_bound_is_a_400(small_bound, engine, tokenizer):
    with TestClient(create_app(small_bound, engine_client=engine, tokenizer=tokenizer)) as client:
        error = _error(client.post("/v1/completions", json={"prompt": ["x"] * 40, "max_tokens": 1}), 400)
        assert "40 sequences" in error["message"] and error["param"] == "prompt"
        error = _error(client.post("/v1/completions", json={"prompt": ["x"] * 3, "n": 2, "max_tokens": 1}), 400)
        assert "6 sequences" in error["message"]
        assert client.post("/v1/completions", json={"prompt": ["x"] * 4, "max_tokens": 1}).status_code == 200
    assert len(engine.requests) == 4  # only the admitted request's prompts reached the engine


def test_prompts_per_request_are_capped_whatever_the_bound(config, engine, tokenizer):
    config.max_waiting_requests = 100_000
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        body = {"prompt": ["x"] * (MAX_PROMPTS_PER_REQUEST + 1), "max_tokens": 1}
        error = _error(client.post("/v1/completions", json=body), 400)
        assert f"at most {MAX_PROMPTS_PER_REQUEST} prompts" in error["message"]
        body = {"prompt": [[5]] * 5000, "max_tokens": 1}  # token-id prompts count too
        assert _error(client.post("/v1/completions", json=body), 400)["param"] == "prompt"
    assert engine.requests == []


@pytest.mark.anyio
async def test_sequences_in_flight_are_counted_and_released(small_bound, engine, tokenizer):
    engine.hang_after_steps = 1
    app = create_app(small_bound, engine_client=engine, tokenizer=tokenizer)
    async with running(app):
        serving = app.state.services.completions
        first = await serving.create_completion(CompletionRequest(prompt=["a", "b", "c"], stream=True))
        await anext(first)  # the three prompts run, then hang
        await engine.wait_for("hanging")
        assert app.state.services.chat.load.num_seqs == 3  # one count for both endpoints
        with pytest.raises(OpenAIError) as refused:
            await serving.create_completion(CompletionRequest(prompt=["d", "e"], max_tokens=1))
        assert refused.value.status == 503 and refused.value.code == "server_overloaded"
        await first.aclose()  # the client goes away
        assert serving.load.num_seqs == 0
        engine.hang_after_steps = None
        response = await serving.create_completion(CompletionRequest(prompt=["d", "e", "f", "g"], max_tokens=1))
        assert len(response.choices) == 4
        assert serving.load.num_seqs == 0


def test_best_of_counts_its_candidates(small_bound, engine, tokenizer):
    with TestClient(create_app(small_bound, engine_client=engine, tokenizer=tokenizer)) as client:
        client.app.state.services.completions.load.num_seqs = 3
        body = {"prompt": "x", "n": 1, "best_of": 2, "max_tokens": 1}
        assert _error(client.post("/v1/completions", json=body), 503)["code"] == "server_overloaded"
        body = {"messages": USER_HI, "use_beam_search": True, "n": 2, "max_tokens": 1}
        assert _error(client.post("/v1/chat/completions", json=body), 503)["code"] == "server_overloaded"


# ---- huge prompts ----------------------------------------------------------------------------

HUGE_PROMPT = "lorem ipsum dolor sit amet " * 40_000  # about 1 MB, thousands of times the context


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": HUGE_PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE_PROMPT}]}),
])
def test_a_huge_prompt_is_refused_after_tokenizing_a_few_pieces(client, engine, tokenizer, monkeypatch, path, body):
    tokenized: list[int] = []
    encode = tokenizer.encode

    def counting_encode(text, *args, **kwargs):
        tokenized.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", counting_encode)
    error = _error(client.post(path, json=body), 400)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert error["param"] == ("prompt" if path == "/v1/completions" else "messages")
    assert sum(tokenized) < 50_000  # not the whole megabyte
    assert engine.requests == []


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": HUGE_PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE_PROMPT}]}),
    ("/v1/completions", {"prompt": HUGE_PROMPT, "stream": True}),
])
def test_a_refused_prompt_is_freed_at_once(client, path, body):
    """Not left to the cyclic collector: a reference cycle through the error's traceback kept
    each refused prompt alive, and the frontend grew by hundreds of megabytes."""
    gc.collect()
    gc.disable()
    try:
        _error(client.post(path, json=body), 400)
        assert [o for o in gc.get_objects() if isinstance(o, OpenAIError)] == []
    finally:
        gc.enable()


@pytest.mark.anyio
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hello"}),
    ("/v1/chat/completions", {"messages": USER_HI}),
    ("/tokenize", {"prompt": "Hello"}),
])
async def test_tokenizing_leaves_the_event_loop_free(config, engine, tokenizer, monkeypatch, path, body):
    """While a prompt is being tokenized, /health answers. On the event loop, the blocked
    tokenizer would hold /health until the wait below timed out."""
    release = threading.Event()
    events: list[str] = []
    encode = tokenizer.encode

    def blocking_encode(text, *args, **kwargs):
        events.append("tokenizing")
        release.wait(timeout=10)
        events.append("tokenized")
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", blocking_encode)
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    async with running(app):
        post = asyncio.create_task(_call(app, "POST", path, body))
        while "tokenizing" not in events:
            await asyncio.sleep(0)  # yields to the request being prepared
        health = await _call(app, "GET", "/health")
        events.append("health")
        release.set()
        assert (await post)[0]["status"] == 200
    assert health[0]["status"] == 200
    assert events[:3] == ["tokenizing", "health", "tokenized"]


async def _call(app, method: str, path: str, body: dict | None = None) -> list[dict]:
    scope = {**post_scope(path), "method": method}
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": json.dumps(body or {}).encode() if body else b"", "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays until the response is sent
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


# ---- nesting, stop strings, small checks ---------------------------------------------------


DEEP = "[" * 1000 + "]" * 1000  # msgspec's decoder raises RecursionError


@pytest.mark.parametrize("path, field", [
    ("/v1/completions", "x"),  # unknown fields are skipped, but read
    ("/v1/chat/completions", "x"),
    ("/v1/chat/completions", "chat_template_kwargs"),
    ("/tokenize", "x"),
    ("/detokenize", "x"),
])
def test_deeply_nested_json_is_a_400(client, path, field):
    value = DEEP if field == "x" else '{"a": ' + DEEP + "}"
    body = '{"prompt": "x", "messages": [], "tokens": [], "%s": %s}' % (field, value)
    error = _error(client.post(path, content=body, headers={"content-type": "application/json"}), 400)
    assert error["type"] == "invalid_request_error" and "nested too deeply" in error["message"]


def test_deeply_nested_tool_parameters_are_a_400(client):
    """Deep enough to decode, too deep for the code that walks it afterwards."""
    schema = '{"type": "object", "properties": {"x": ' * 300 + "{}" + "}}" * 300  # 600 levels
    body = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, '
            '"tools": [{"type": "function", "function": {"name": "f", "parameters": %s}}]}' % schema)
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert "nested too deeply" in _error(response, 400)["message"]


def test_head_health(client, engine):
    response = client.head("/health")
    assert response.status_code == 200 and response.content == b""
    engine.dead_reason = "killed"
    assert client.head("/health").status_code == 503


def test_a_text_part_without_text_names_the_missing_field(client):
    messages = [{"role": "user", "content": [{"type": "text"}]}]
    error = _error(client.post("/v1/chat/completions", json={"messages": messages}), 400)
    assert "`text` field" in error["message"] and "got a 'text' part" not in error["message"]
    assert error["param"] == "messages[0].content[0].text"


def test_detokenize_accepts_what_prompts_accept_with_a_padded_vocabulary(config, tokenizer):
    from fake_engine import FakeEngineClient
    from fake_model import rotating_script

    padded = len(tokenizer) + 64  # models pad their embedding past the tokenizer's vocabulary
    engine = FakeEngineClient(EngineReady(MODEL_NAME, MAX_MODEL_LEN, padded, num_kv_blocks=64, block_size=16),
                              script=rotating_script(tokenizer))
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        hello = tokenizer.encode("Hello")
        in_padding = len(tokenizer) + 5
        assert client.post("/v1/completions", json={"prompt": [*hello, in_padding], "max_tokens": 1}).status_code == 200
        assert client.post("/detokenize", json={"tokens": [*hello, in_padding]}).json() == {"prompt": "Hello"}
        error = _error(client.post("/detokenize", json={"tokens": [padded]}), 400)
        assert f"the vocabulary has {padded}" in error["message"]


def test_a_body_over_10_mb_is_a_413_in_the_envelope(client, engine):
    body = b'{"prompt": "' + b"a" * 10_000_000 + b'"}'
    error = _error(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 413)
    assert error["type"] == "invalid_request_error"
    assert engine.requests == []
