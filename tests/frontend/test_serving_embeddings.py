"""/v1/embeddings in the app with the fake engine client (`--runner pooling`, no model): what
goes to the engine, what comes back, the errors; and Schemathesis on the route's own schema."""

from __future__ import annotations

import base64
import math
import struct

import pytest
import schemathesis
from fake_engine import FakeEngineClient, fake_vector
from fake_model import MAX_MODEL_LEN, MODEL_NAME, build_tokenizer, rotating_script
from fuzz_checks import check_response
from hypothesis import HealthCheck, settings
from litestar.testing import TestClient

from frontend.app import create_app
from frontend.config import FrontendConfig
from ipc.config import EngineConfig
from ipc.messages import EngineReady, PoolingParams

HIDDEN_SIZE = 8


def pooling_app(engine_client=None, tokenizer=None, **engine_settings):
    tokenizer = tokenizer or build_tokenizer()
    info = EngineReady(MODEL_NAME, MAX_MODEL_LEN, len(tokenizer), num_kv_blocks=64, block_size=16,
                       hidden_size=HIDDEN_SIZE)
    engine_client = engine_client or FakeEngineClient(info, script=rotating_script(tokenizer))
    engine = EngineConfig(model="/nonexistent/model", served_model_name=MODEL_NAME, max_num_seqs=16,
                          runner="pooling", **engine_settings)
    return create_app(FrontendConfig(engine=engine), engine_client=engine_client, tokenizer=tokenizer), engine_client


@pytest.fixture
def pooling(tokenizer):
    app, engine = pooling_app(tokenizer=tokenizer)
    with TestClient(app) as test_client:
        yield test_client, engine


def floats(vector: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(vector) // 4}f", vector))


def test_each_input_is_one_pooling_request_sent_together(pooling, tokenizer):
    client, engine = pooling
    response = client.post("/v1/embeddings", json={"input": ["hello world", "abc"], "model": MODEL_NAME})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r.pooling for r in engine.requests] == [PoolingParams(), PoolingParams()]
    assert [r.sampling_params.max_tokens for r in engine.requests] == [0, 0]
    ids = [tokenizer.encode(t) for t in ("hello world", "abc")]
    assert [r.prompt_token_ids for r in engine.requests] == ids
    assert body["object"] == "list" and body["model"] == MODEL_NAME
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    for index, item in enumerate(body["data"]):
        assert item["object"] == "embedding" and item["index"] == index
        assert item["embedding"] == floats(fake_vector(ids[index], HIDDEN_SIZE))


def test_base64_and_dimensions(pooling):
    client, engine = pooling
    full = client.post("/v1/embeddings", json={"input": [5, 6, 7]}).json()["data"][0]["embedding"]
    encoded = client.post("/v1/embeddings", json={"input": [5, 6, 7], "encoding_format": "base64"}).json()
    assert floats(base64.b64decode(encoded["data"][0]["embedding"])) == full
    short = client.post("/v1/embeddings", json={"input": [5, 6, 7], "dimensions": 3}).json()["data"][0]["embedding"]
    head_norm = math.sqrt(sum(v * v for v in full[:3]))
    assert short == pytest.approx([v / head_norm for v in full[:3]], abs=1e-7)


def test_truncation_keeps_the_last_tokens(pooling):
    client, engine = pooling
    ids = list(range(3, 3 + MAX_MODEL_LEN + 5))
    response = client.post("/v1/embeddings", json={"input": ids})
    assert response.status_code == 400 and "truncate_prompt_tokens" in response.json()["error"]["message"]
    assert client.post("/v1/embeddings", json={"input": ids, "truncate_prompt_tokens": 4}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": ids, "truncate_prompt_tokens": -1}).status_code == 200
    assert [r.prompt_token_ids for r in engine.requests] == [ids[-4:], ids[-MAX_MODEL_LEN:]]


def test_an_engine_error_is_a_400_and_an_engine_death_a_503(pooling):
    client, engine = pooling
    engine.error_message = "does not fit"
    response = client.post("/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 400 and "does not fit" in response.json()["error"]["message"]
    engine.error_message = None
    engine.dead_reason = "gone"
    assert client.post("/v1/embeddings", json={"input": "hello"}).status_code == 503


def test_generation_routes_are_refused_under_the_pooling_runner(pooling):
    client, engine = pooling
    for path, body in [("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
        response = client.post(path, json=body)
        assert response.status_code == 400 and "pooling runner" in response.json()["error"]["message"]
    assert engine.requests == []


def test_embeddings_are_refused_under_the_generate_runner(client, engine):
    response = client.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 400 and "--runner pooling" in response.json()["error"]["message"]
    assert engine.requests == []


schema = schemathesis.openapi.from_asgi("/schema/openapi.json", pooling_app()[0])


@schema.hook
def map_body(context, body):
    if isinstance(body, dict) and "model" in body:
        body["model"] = MODEL_NAME
    return body


@schema.include(path="/v1/embeddings").parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_generated_embedding_request_is_a_server_error(case):
    check_response(case.call())
