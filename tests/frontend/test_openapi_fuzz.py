"""Schemathesis against the app's own OpenAPI document, with the fake engine client: for every
generated request, valid or not, no 5xx, and every error is OpenAI's envelope. Bounded: at most
MAX_EXAMPLES cases per operation (a few hundred in all, seconds)."""

from __future__ import annotations

import json
import zlib

import schemathesis
from fake_engine import FakeEngineClient
from fake_model import MAX_MODEL_LEN, MODEL_NAME, build_tokenizer, rotating_script
from hypothesis import HealthCheck, settings
from schemathesis.core.transport import STREAM_CUT_SHORT_ATTRIBUTE

from frontend.app import create_app
from ipc.config import ServeConfig
from ipc.messages import EngineReady

MAX_EXAMPLES = 60
ERROR_FIELDS = {"message", "type", "param", "code"}


def make_app():
    tokenizer = build_tokenizer()
    info = EngineReady(MODEL_NAME, MAX_MODEL_LEN, len(tokenizer), num_kv_blocks=64, block_size=16)
    engine = FakeEngineClient(info, script=rotating_script(tokenizer))
    config = ServeConfig(model="/nonexistent/model", served_model_name=MODEL_NAME, max_num_seqs=16)
    return create_app(config, engine_client=engine, tokenizer=tokenizer)


schema = schemathesis.openapi.from_asgi("/schema/openapi.json", make_app())
schema.config.max_stream_events = 10_000  # read whole streams (at most 16 choices x 128 tokens)


@schema.hook
def map_body(context, body):
    """Most generated model names are unknown (a 404 before anything else is looked at): name
    the served model instead, so that the rest of the body is exercised. And as optional fields
    are mostly left out, half the bodies without `stream` (by a hash of their text) stream."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL_NAME
        if "stream" not in body and zlib.crc32(json.dumps(body, sort_keys=True).encode()) % 2:
            body["stream"] = True
    return body


def check_response(response) -> None:
    """No server error; every error body is exactly OpenAI's envelope; streams end with [DONE]
    and carry errors as `data: {"error": ...}` events."""
    where = f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]
        assert set(error) == ERROR_FIELDS and isinstance(error["message"], str) and error["message"], where
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]" and not getattr(response, STREAM_CUT_SHORT_ATTRIBUTE, False), where
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:
                assert set(payload["error"]) == ERROR_FIELDS, where


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
