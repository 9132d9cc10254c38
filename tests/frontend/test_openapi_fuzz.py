"""Schemathesis against the app's own OpenAPI document, with the fake engine client: for every
generated request, valid or not, no 5xx, and every error is OpenAI's envelope. Bounded: at most
MAX_EXAMPLES cases per operation (a few hundred in all, seconds)."""

from __future__ import annotations

import schemathesis
from fake_engine import FakeEngineClient
from fake_model import MAX_MODEL_LEN, MODEL_NAME, build_tokenizer, rotating_script
from fuzz_checks import check_response, name_model_and_half_stream
from hypothesis import HealthCheck, settings

from frontend.app import create_app
from frontend.config import FrontendConfig
from ipc.config import EngineConfig
from ipc.messages import EngineReady

MAX_EXAMPLES = 60


def make_app():
    tokenizer = build_tokenizer()
    info = EngineReady(MODEL_NAME, MAX_MODEL_LEN, len(tokenizer), num_kv_blocks=64, block_size=16)
    engine = FakeEngineClient(info, script=rotating_script(tokenizer))
    config = FrontendConfig(engine=EngineConfig(model="/nonexistent/model", served_model_name=MODEL_NAME, max_num_seqs=16))
    return create_app(config, engine_client=engine, tokenizer=tokenizer)


schema = schemathesis.openapi.from_asgi("/schema/openapi.json", make_app())
schema.config.max_stream_events = 10_000  # read whole streams (at most 16 choices x 128 tokens)


@schema.hook
def map_body(context, body):
    return name_model_and_half_stream(body, MODEL_NAME)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_generated_request_is_a_server_error_or_a_foreign_error_body(case):
    check_response(case.call())


def test_the_document_describes_the_request_bodies():
    document = schema.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].startswith("#/components/schemas/")
    completion = document["components"]["schemas"]["CompletionRequest"]
    assert "prompt" in completion["required"] and "max_tokens" in completion["properties"]
