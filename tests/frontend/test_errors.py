"""Every failure, on every route, is OpenAI's error envelope with the right status."""

from __future__ import annotations

import msgspec
import pytest

from frontend.errors import OpenAIError, error_type_for_status, from_decode_error
from frontend.protocol import ChatCompletionRequest, CompletionRequest


def assert_error(response, status: int, *, param=None, code=None, type=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    assert error["code"] == code
    if type is not None:
        assert error["type"] == type
    return error


def test_malformed_json_is_400(client):
    error = assert_error(client.post("/v1/completions", content=b'{"prompt": "x",'), 400, type="invalid_request_error")
    assert "JSON" in error["message"]


def test_body_that_is_not_an_object_is_400(client):
    assert_error(client.post("/v1/chat/completions", json=[1, 2]), 400)


def test_wrong_type_names_the_field(client):
    error = assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": "ten"}), 400, param="max_tokens")
    assert "int" in error["message"]


def test_wrong_nested_value_names_the_path(client):
    body = {"messages": [{"role": "wizard", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=body), 400, param="messages[0].role")


def test_missing_required_field_names_it(client):
    assert_error(client.post("/v1/completions", json={"max_tokens": 3}), 400, param="prompt")
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"content": "hi"}]}), 400, param="messages[0].role")


def test_unknown_route_is_404(client):
    error = assert_error(client.post("/v1/nothing-here", json={}), 404, type="NotFoundError")
    assert "/v1/nothing-here" in error["message"]


def test_wrong_method_is_405(client):
    assert_error(client.get("/v1/chat/completions"), 405)
    assert_error(client.delete("/v1/models"), 405)


def test_unknown_model_is_404_model_not_found(client):
    for path, body in [
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        ("/tokenize", {"model": "gpt-9", "prompt": "x"}),
    ]:
        error = assert_error(client.post(path, json=body), 404, param="model", code="model_not_found")
        assert "gpt-9" in error["message"]
    assert_error(client.get("/v1/models/gpt-9"), 404, param="model", code="model_not_found")


def test_internal_error_is_500_without_traceback(client, engine):
    def broken_script(request, index):
        raise RuntimeError("secret internal detail")

    engine.script = broken_script
    error = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 500, type="server_error")
    assert "secret" not in error["message"]


def test_internal_error_in_a_stream_is_an_error_event(client, engine):
    def broken_script(request, index):
        raise RuntimeError("secret internal detail")

    engine.script = broken_script
    response = client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert response.status_code == 200
    assert "secret" not in response.text
    assert '"type":"server_error"' in response.text and response.text.endswith("data: [DONE]\n\n")


def test_engine_not_ready_is_503(client, engine):
    engine.model_info = None
    assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503, code="engine_not_ready")


def test_dead_engine_is_503(client, engine):
    engine.dead_reason = "gone"
    error = assert_error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503, code="engine_dead"
    )
    assert "gone" in error["message"]


def test_error_type_follows_status():
    assert error_type_for_status(400) == "invalid_request_error"
    assert error_type_for_status(404) == "NotFoundError"
    assert error_type_for_status(500) == "server_error"
    assert error_type_for_status(418) == "invalid_request_error"
    assert error_type_for_status(502) == "server_error"
    assert OpenAIError(503, "x").to_response_body().error.type == "service_unavailable"


@pytest.mark.parametrize(
    "body, type, param",
    [
        (b'{"prompt": 1.5}', CompletionRequest, "prompt"),
        (b'{"prompt": "x", "stop": 3}', CompletionRequest, "stop"),
        (b'{"messages": [{"role": "user", "content": 5}]}', ChatCompletionRequest, "messages[0].content"),
        (b'{"messages": []', ChatCompletionRequest, None),
    ],
)
def test_decode_errors_name_the_param(body, type, param):
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(body, type=type)
    error = from_decode_error(info.value)
    assert error.status == 400 and error.param == param
