"""Routes other than generation, the app's wiring, and `python -m frontend`."""

from __future__ import annotations

import re
import subprocess
import sys

from fake_model import MAX_MODEL_LEN, MODEL_NAME
from litestar.testing import TestClient

from frontend.__main__ import main
from frontend.app import create_app
from frontend.engine_client import EngineClient
from ipc.sockets import ipc_addresses

USER_HI = [{"role": "user", "content": "hi"}]


def test_health_is_503_until_ready_200_while_serving_503_after_death(config, engine, tokenizer):
    engine.model_info = None
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_not_ready"
        engine.set_ready()
        assert client.get("/health").status_code == 200
        engine.dead_reason = "killed"
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"


def test_models_list_and_retrieve(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == (MODEL_NAME, "model", MAX_MODEL_LEN)
    assert client.get(f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME


def test_model_ids_with_slashes(config, engine, tokenizer):
    config.engine.served_model_name = "org/model-1"
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        assert client.get("/v1/models/org/model-1").json()["id"] == "org/model-1"
        assert client.get("/v1/models/org/other").status_code == 404
        response = client.post("/v1/completions", json={"model": "org/model-1", "prompt": "x", "max_tokens": 1})
        assert response.status_code == 200


def test_version(client):
    version = client.get("/version").json()["version"]
    assert isinstance(version, str) and version[0].isdigit()


def test_tokenize_prompt_and_messages(client, tokenizer):
    body = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert body["tokens"] == tokenizer.encode("Hello world")
    assert (body["count"], body["max_model_len"]) == (len(body["tokens"]), MAX_MODEL_LEN)
    body = client.post("/tokenize", json={"messages": USER_HI}).json()
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert body["tokens"] == tokenizer.encode(prompt, add_special_tokens=False)
    body = client.post("/tokenize", json={"messages": USER_HI, "add_generation_prompt": False}).json()
    assert tokenizer.decode(body["tokens"]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_tokenize_needs_exactly_one_input(client):
    assert client.post("/tokenize", json={}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "x", "messages": USER_HI}).status_code == 400


def test_detokenize(client, tokenizer):
    tokens = tokenizer.encode("Hello world")
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "Hello world"}
    response = client.post("/detokenize", json={"tokens": [len(tokenizer) + 5]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"


def _routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in."""
    routes = []
    for route in app.routes:
        path = re.sub(r"\{[^}]*\}", "x", route.path)
        routes += [(method, path) for method in sorted(route.methods) if method not in ("HEAD", "OPTIONS")]
    return routes


def test_api_key_guards_every_route_but_health_and_metrics(config, engine, tokenizer):
    config.api_key = "sesame"
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        routes = _routes(client.app)
        assert ("GET", "/schema/openapi.json") in routes and ("POST", "/v1/completions") in routes
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                response = client.request(method, path, headers=headers)
                if path in ("/health", "/metrics"):
                    assert response.status_code == 200, path
                else:
                    assert response.status_code == 401, (method, path, headers)
                    assert response.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer sesame"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get("/version", headers=good).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=good).status_code == 200
    assert len(engine.requests) == 1


def test_metrics_require_key(config, engine, tokenizer):
    config.api_key, config.metrics_require_key = "sesame", True
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_cors_allows_configured_origins(config, engine, tokenizer):
    config.allowed_origins = ["https://app.example"]
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        response = client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        response = client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers


def test_overload_is_503(config, engine, tokenizer):
    config.engine.max_num_seqs, config.max_waiting_requests = 1, 0
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        client.app.state.services.completions.load.num_seqs = 1  # one sequence in flight
        response = client.post("/v1/chat/completions", json={"messages": USER_HI})
        assert response.status_code == 503 and response.json()["error"]["code"] == "server_overloaded"
        assert int(response.headers["retry-after"]) > 0
        client.app.state.services.completions.load.num_seqs = 0
        assert client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 1}).status_code == 200
        assert client.app.state.services.chat.load.num_seqs == 0  # released after the request


def test_startup_does_not_wait_for_the_engine(config, tokenizer, tmp_path):
    # A real EngineClient whose engine never comes: the app serves, and says it is not ready.
    config.engine.input_address, config.engine.output_address = ipc_addresses(str(tmp_path))
    with TestClient(create_app(config, tokenizer=tokenizer)) as client:
        assert isinstance(client.app.state.services.engine_client, EngineClient)
        assert client.get("/health").status_code == 503
        response = client.post("/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_not_ready"
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] is None


def test_main_rejects_a_bad_config(capsys):
    assert main(["--config-json", '{"model": 3}']) == 2
    assert "invalid --config-json" in capsys.readouterr().err


def test_main_exits_non_zero_when_startup_fails(tmp_path):
    config = f'{{"engine": {{"model": "{tmp_path}/missing.gguf", "served_model_name": "m"}}, "port": 0}}'
    result = subprocess.run(
        [sys.executable, "-m", "frontend", "--config-json", config], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "missing.gguf" in result.stderr
