"""Streamed responses: OpenAI's SSE framing, equality with the non-streamed response, usage
chunks, failures after the stream started, and client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx
import pytest
from fake_model import EOS_ID, parse_sse, text_script

from frontend import sse
from frontend.app import create_app

USER_HI = [{"role": "user", "content": "hi"}]


def stream(client, path: str, body: dict) -> list[dict]:
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


def content_chunks(events: list[dict]) -> list[dict]:
    return [e for e in events if e["choices"]]


# ---- framing --------------------------------------------------------------------------------


def test_completion_stream_framing(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world!")
    events = stream(client, "/v1/completions", {"prompt": "x", "max_tokens": 50})
    assert len({e["id"] for e in events}) == 1
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events)
    choices = [e["choices"][0] for e in events]
    assert "".join(c["text"] for c in choices) == "Hello world!"
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] == "stop"


def test_chat_stream_opens_with_the_role_and_ends_with_finish_reason(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world!")
    events = stream(client, "/v1/chat/completions", {"messages": USER_HI})
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == "Hello world!"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)


def test_n_choices_interleave(client):
    events = stream(client, "/v1/chat/completions", {"messages": USER_HI, "n": 3, "max_tokens": 4})
    indices = [e["choices"][0]["index"] for e in events]
    assert indices[:3] == [0, 1, 2]  # the role chunks
    assert indices[3:9] == [0, 1, 2, 0, 1, 2]
    for i in range(3):
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["index"] == i][-1] == "length"


# ---- stream == non-stream -------------------------------------------------------------------


def _join_completion_stream(events: list[dict]) -> dict[int, dict]:
    joined: dict[int, dict] = {}
    for event in events:
        for c in event["choices"]:
            out = joined.setdefault(c["index"], {"text": "", "logprobs": None, "finish_reason": None, "stop_reason": None})
            out["text"] += c["text"]
            if c["logprobs"] is not None:
                lp = out["logprobs"] = out["logprobs"] or {k: [] for k in c["logprobs"]}
                for key, values in c["logprobs"].items():
                    lp[key].extend(values)
            if c["finish_reason"] is not None:
                out["finish_reason"], out["stop_reason"] = c["finish_reason"], c["stop_reason"]
    return joined


@pytest.mark.parametrize("echo", [False, True])
def test_completion_stream_concatenates_to_the_response(client, tokenizer, echo):
    body = {
        "prompt": ["Hello", "The quick"],
        "n": 2,
        "seed": 4,
        "max_tokens": 12,
        "stop": ["lazy", "fox"],
        "logprobs": 2,
        "echo": echo,
    }
    whole = client.post("/v1/completions", json=body).json()
    joined = _join_completion_stream(stream(client, "/v1/completions", body))
    assert len(whole["choices"]) == 4
    for choice in whole["choices"]:
        assert joined[choice["index"]] == {k: choice[k] for k in ("text", "logprobs", "finish_reason", "stop_reason")}
    assert any(c["finish_reason"] == "stop" for c in whole["choices"])  # the stop strings were exercised


def test_chat_stream_concatenates_to_the_response(client):
    body = {"messages": USER_HI, "n": 2, "seed": 7, "max_tokens": 20, "stop": ["fox"], "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", json=body).json()
    events = stream(client, "/v1/chat/completions", body)
    for choice in whole["choices"]:
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == choice["index"]]
        assert "".join(c["delta"].get("content") or "" for c in mine) == choice["message"]["content"]
        streamed_logprobs = [entry for c in mine if c["logprobs"] for entry in c["logprobs"]["content"]]
        assert streamed_logprobs == choice["logprobs"]["content"]
        assert (mine[-1]["finish_reason"], mine[-1]["stop_reason"]) == (choice["finish_reason"], choice["stop_reason"])
    assert {c["finish_reason"] for c in whole["choices"]} == {"stop", "length"}


def test_stop_string_in_one_choice_aborts_only_that_sequence(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "one fox two", "three four five")
    events = stream(client, "/v1/chat/completions", {"messages": USER_HI, "n": 2, "stop": "fox"})
    texts = {0: "", 1: ""}
    for e in events:
        texts[e["choices"][0]["index"]] += e["choices"][0]["delta"].get("content", "")
    assert texts == {0: "one ", 1: "three four five"}
    request_id = engine.requests[0].request_id
    assert engine.abort_calls[0] == ([request_id], [0])


# ---- usage ----------------------------------------------------------------------------------


def test_include_usage_adds_a_final_usage_chunk(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world!")
    events = stream(client, "/v1/completions", {"prompt": "Hello", "n": 2, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert last["choices"] == []
    num_completion = 2 * (len(tokenizer.encode("Hello world!")) + 1)
    num_prompt = len(tokenizer.encode("Hello"))
    assert last["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": num_prompt + num_completion}
    assert all("usage" not in e for e in chunks)


def test_continuous_usage_stats_put_usage_on_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = stream(client, "/v1/chat/completions", {"messages": USER_HI, "max_tokens": 5, "stream_options": options})
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 5
    assert events[-1]["choices"] == []
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"] for e in events)


# ---- rejected before streaming -----------------------------------------------------------------


def test_beam_search_cannot_stream(client, engine):
    response = client.post("/v1/completions", json={"prompt": "x", "stream": True, "use_beam_search": True, "n": 2})
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["param"] == "stream" and "beam" in error["message"].lower()
    assert engine.requests == []


def test_best_of_above_n_cannot_stream(client):
    response = client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": True, "n": 1, "best_of": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "best_of"


# ---- failures after the stream started -------------------------------------------------------


def test_engine_death_mid_stream_is_an_error_event(client, engine):
    engine.die_after_steps = 2
    events = stream(client, "/v1/chat/completions", {"messages": USER_HI})
    *chunks, error_event = events
    assert len(content_chunks(chunks)) == 3  # role + two tokens
    assert set(error_event) == {"error"}
    assert error_event["error"]["code"] == "engine_dead" and error_event["error"]["type"] == "service_unavailable"
    assert client.get("/health").status_code == 503


def test_engine_error_mid_stream_is_an_error_event(client, engine):
    engine.error_message = "cannot fit"
    events = stream(client, "/v1/completions", {"prompt": "x"})
    assert events[-1]["error"]["type"] == "invalid_request_error" and "cannot fit" in events[-1]["error"]["message"]


# ---- client disconnects ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(app):
    """Runs the ASGI lifespan of `app` in this event loop."""
    to_app: asyncio.Queue = asyncio.Queue()
    from_app: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await task


def post_scope(path: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("test", 1),
        "server": ("test", 80),
        "state": {},
    }


async def post_then_disconnect(app, path: str, body: dict, disconnect_after) -> list[dict]:
    """POSTs `body`; the client disconnects once `disconnect_after` completes."""
    scope = post_scope(path)
    sent: list[dict] = []
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnect_after()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.anyio
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 50}),
    ("/v1/chat/completions", {"messages": USER_HI}),
])
async def test_streaming_client_disconnect_aborts_the_request(config, engine, tokenizer, path, body):
    engine.hang_after_steps = 2
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    async with running(app):
        sent = await post_then_disconnect(app, path, {**body, "stream": True}, lambda: engine.wait_for("hanging"))
    assert sent[0]["status"] == 200
    streamed = b"".join(m.get("body", b"") for m in sent[1:])
    assert streamed.startswith(b"data: {")  # the client got chunks before it left
    assert engine.closed_unfinished == [engine.requests[0].request_id]
    # what the engine makes from now on is counted as made for a client that had gone
    assert engine.client_gone_ids == [engine.requests[0].request_id]
    assert 'furiosa_llm:request_success_total{finished_reason="abort",model_name="test-model"} 1.0' in (
        app.state.services.metrics.render().decode())


@pytest.mark.anyio
async def test_non_streaming_client_disconnect_aborts_the_request(config, engine, tokenizer):
    engine.hang_after_steps = 1
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    async with running(app):
        await post_then_disconnect(app, "/v1/chat/completions", {"messages": USER_HI}, lambda: engine.wait_for("hanging"))
    assert engine.closed_unfinished == [engine.requests[0].request_id]


@pytest.mark.anyio
async def test_multi_prompt_disconnect_aborts_every_prompt(config, engine, tokenizer):
    engine.hang_after_steps = 1
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    async with running(app):
        body = {"prompt": ["a", "b", "c"], "stream": True}
        await post_then_disconnect(app, "/v1/completions", body, lambda: engine.wait_for("hanging"))
    assert sorted(engine.closed_unfinished) == sorted(r.request_id for r in engine.requests)
    assert len(engine.requests) == 3
    assert sorted(engine.client_gone_ids) == sorted(engine.closed_unfinished)


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_client_gone_while_sending_the_body_is_not_a_server_error(config, engine, tokenizer, path, caplog):
    """Litestar raises a 500 for it; it is the client's doing: a 499 logged at INFO."""
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    messages = [{"type": "http.request", "body": b'{"prompt": "Hel', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async with running(app):
        with caplog.at_level(logging.INFO):
            await asyncio.wait_for(app(post_scope(path), receive, send), timeout=10)
    assert sent[0]["status"] == 499
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["type"] == "client_closed_request"
    assert engine.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert any("client disconnected" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_eos_id_constant_matches_tokenizer(tokenizer):
    assert tokenizer.eos_token_id == EOS_ID


# ---- keep-alive comments while a stream waits ------------------------------------------------


def spying(app, engine, bodies: list[tuple[bytes, int]], *, release_after: int | None = None,
           keepalives_sent: asyncio.Event | None = None, count: int = 2):
    """`app`, recording each body part it sends with the number of tokens the engine had made by
    then; once `count` keep-alive comments went out it releases the hanging engine (if
    `release_after` is set) or sets `keepalives_sent`."""
    async def wrapped(scope, receive, send):
        async def spy(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                bodies.append((message["body"], engine.num_generation_tokens))
                if sum(body == sse.SSE_KEEPALIVE for body, _ in bodies) == count:
                    if release_after is not None:
                        engine.release()
                    if keepalives_sent is not None:
                        keepalives_sent.set()
            await send(message)

        await app(scope, receive, spy)

    return wrapped


@pytest.mark.anyio
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 50}),
    ("/v1/chat/completions", {"messages": USER_HI}),
])
async def test_a_waiting_stream_gets_keepalive_comments_then_its_chunks(config, engine, tokenizer, monkeypatch,
                                                                         path, body):
    monkeypatch.setattr(sse, "KEEPALIVE_INTERVAL_S", 0.01)
    engine.script = text_script(tokenizer, "Hello world!")
    engine.hang_after_steps = 0  # the engine makes nothing until released
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    bodies: list[tuple[bytes, int]] = []
    async with running(app):
        transport = httpx.ASGITransport(app=spying(app, engine, bodies, release_after=2))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await asyncio.wait_for(http.post(path, json={**body, "stream": True}), timeout=10)
    assert response.status_code == 200
    is_chat = path == "/v1/chat/completions"
    head = bodies[:3] if is_chat else bodies[:2]
    if is_chat:  # the role chunk goes out at once, before the engine made anything
        role_body, tokens_made = head.pop(0)
        assert tokens_made == 0
        assert parse_sse(role_body.decode() + "data: [DONE]\n\n")[0]["choices"][0]["delta"] == {
            "role": "assistant", "content": ""}
    assert head == [(sse.SSE_KEEPALIVE, 0), (sse.SSE_KEEPALIVE, 0)]
    # the comments are the only difference: without them the stream is the usual one
    text = response.text
    assert text.count(": keep-alive\n\n") >= 2
    events = parse_sse(text.replace(": keep-alive\n\n", ""))
    key = "content" if is_chat else "text"
    pieces = [(e["choices"][0]["delta"] if is_chat else e["choices"][0]).get(key, "") for e in events]
    assert "".join(pieces) == "Hello world!"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_no_keepalive_while_chunks_flow(config, engine, tokenizer):
    """With the default interval a stream that never waits long carries no comments."""
    assert sse.KEEPALIVE_INTERVAL_S == 10.0
    engine.script = text_script(tokenizer, "Hello world!")
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await asyncio.wait_for(http.post("/v1/completions", json={"prompt": "x", "stream": True}),
                                              timeout=10)
    assert b"keep-alive" not in response.content
    assert "".join(e["choices"][0]["text"] for e in parse_sse(response.text)) == "Hello world!"


@pytest.mark.anyio
async def test_a_client_gone_during_keepalives_aborts_the_request(config, engine, tokenizer, monkeypatch):
    monkeypatch.setattr(sse, "KEEPALIVE_INTERVAL_S", 0.01)
    engine.hang_after_steps = 0
    app = create_app(config, engine_client=engine, tokenizer=tokenizer)
    bodies: list[tuple[bytes, int]] = []
    keepalives_sent = asyncio.Event()
    async with running(app):
        wrapped = spying(app, engine, bodies, keepalives_sent=keepalives_sent)
        sent = await post_then_disconnect(wrapped, "/v1/chat/completions", {"messages": USER_HI, "stream": True},
                                          keepalives_sent.wait)
        # the task that awaited the next chunk was cancelled and awaited, not left behind
        assert [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__name__", "") == "_next"] == []
    assert sent[0]["status"] == 200
    assert [body for body, _ in bodies[1:3]] == [sse.SSE_KEEPALIVE, sse.SSE_KEEPALIVE]
    assert engine.closed_unfinished == [engine.requests[0].request_id]
    assert engine.client_gone_ids == [engine.requests[0].request_id]


@pytest.mark.anyio
async def test_closing_a_waiting_stream_closes_its_chunks(monkeypatch):
    """A stream closed while it waits for a chunk (not cancelled: the server stops reading it)
    ends the pending read and closes the chunks, whose cleanup runs at once."""
    monkeypatch.setattr(sse, "KEEPALIVE_INTERVAL_S", 0.01)
    cleaned_up = []

    async def chunks():
        try:
            await asyncio.Event().wait()  # never a chunk
            yield None
        finally:
            cleaned_up.append(True)

    stream = sse.sse_stream(chunks())
    assert [await anext(stream), await anext(stream)] == [sse.SSE_KEEPALIVE, sse.SSE_KEEPALIVE]
    await stream.aclose()
    assert cleaned_up == [True]
    assert [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__name__", "") == "_next"] == []
