"""A few dozen schemathesis cases against the real server (the default model, a short context so
that no valid case generates for long): no 5xx and only OpenAI error envelopes, as with the fake
engine in tests/frontend/test_openapi_fuzz.py, but through uvicorn, the engine and back."""

from __future__ import annotations

import json
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.transport import STREAM_CUT_SHORT_ATTRIBUTE

from server import Server

MAX_EXAMPLES = 15  # per operation: ~120 cases, under a minute on two cores (most are 4xx)
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzzed_server():
    server = Server("--max-model-len", "64", "--max-num-seqs", "4").wait_ready()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    model = __import__("httpx").get(fuzzed_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    loaded = schemathesis.openapi.from_url(fuzzed_server.url + "/schema/openapi.json")
    loaded.config.max_stream_events = 10_000

    def map_body(context, body):
        if isinstance(body, dict):
            if isinstance(body.get("model"), str):
                body["model"] = model
            if "stream" not in body and zlib.crc32(json.dumps(body, sort_keys=True).encode()) % 2:
                body["stream"] = True
        return body

    loaded.hook(map_body)
    return loaded


def test_real_server_answers_generated_requests_without_5xx(api_schema):
    # (schemathesis' lazy pytest fixture loader does not work with this pytest: the operations
    # are looped over here, each a bounded hypothesis run)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for operation in operations:
        @given(operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(timeout=120)
            where = f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
            assert response.status_code < 500, where
            if response.status_code >= 400:
                assert set(json.loads(response.text)["error"]) == ERROR_FIELDS, where
            elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                assert not getattr(response, STREAM_CUT_SHORT_ATTRIBUTE, False)
                assert response.text.endswith("data: [DONE]\n\n"), where

        check()
