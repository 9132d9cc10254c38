"""A few dozen schemathesis cases against the real server (the default model, a short context so
that no valid case generates for long): no 5xx and only OpenAI error envelopes, as with the fake
engine in tests/frontend/test_openapi_fuzz.py, but through uvicorn, the engine and back."""

from __future__ import annotations

import pytest
import schemathesis
from fuzz_checks import check_response, name_model_and_half_stream
from hypothesis import HealthCheck, given, settings

from server import Server

MAX_EXAMPLES = 15  # per operation: ~120 cases, under a minute on two cores (most are 4xx)


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
        return name_model_and_half_stream(body, model)

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
            check_response(case.call(timeout=120))

        check()
