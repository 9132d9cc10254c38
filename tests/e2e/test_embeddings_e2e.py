"""/v1/embeddings of a real `furiosa-llm serve --runner pooling` on the default model, through
the `openai` client and raw HTTP: every input form, base64, dimensions, usage, truncation, the
errors, and the vectors against transformers' (tests/golden/smollm2_embeddings.json)."""

from __future__ import annotations

import base64
import json
import math
import pathlib
import struct

import httpx
import openai
import pytest
from server import Server

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "smollm2_embeddings.json").read_text())
CASES = GOLDEN["cases"]
HIDDEN_SIZE = GOLDEN["hidden_size"]
POOLING_MAX_MODEL_LEN = 128  # the pooling_server's --max-model-len (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def client(pooling_server) -> openai.OpenAI:
    assert pooling_server.max_model_len == POOLING_MAX_MODEL_LEN
    return openai.OpenAI(base_url=pooling_server.url + "/v1", api_key=pooling_server.api_key, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def http(pooling_server):
    with httpx.Client(base_url=pooling_server.url, timeout=120,
                      headers={"Authorization": f"Bearer {pooling_server.api_key}"}) as http:
        yield http


@pytest.fixture(scope="module")
def model(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def embed(client, model, value, **kwargs) -> list[list[float]]:
    response = client.embeddings.create(model=model, input=value, encoding_format="float", **kwargs)
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return [d.embedding for d in response.data]


def close(a: list[float], b: list[float], atol: float = 2e-6) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= atol


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_vectors_equal_transformers(client, model):
    vectors = embed(client, model, [case["token_ids"] for case in CASES])
    for case, vector in zip(CASES, vectors):
        assert len(vector) == HIDDEN_SIZE and abs(norm(vector) - 1) < 1e-5
        assert close(vector, case["last"], atol=1e-4), case["text"]


def test_every_input_form_gives_the_same_vectors(client, model):
    texts = [CASES[0]["text"], CASES[4]["text"]]
    ids = [CASES[0]["token_ids"], CASES[4]["token_ids"]]
    (one_string,) = embed(client, model, texts[0])
    strings = embed(client, model, texts)
    (one_ids,) = embed(client, model, ids[0])
    id_lists = embed(client, model, ids)
    assert len(strings) == len(id_lists) == 2
    for vector in (strings[0], one_ids, id_lists[0]):
        assert close(vector, one_string)
    assert close(strings[1], id_lists[1]) and not close(strings[0], strings[1], atol=0.1)


def test_a_batch_equals_single_requests(client, model):
    inputs = [case["token_ids"][k:] for k in range(3) for case in CASES]
    batched = embed(client, model, inputs)
    for prompt, vector in zip(inputs, batched):
        assert close(vector, embed(client, model, [prompt])[0])


def test_base64_decodes_to_the_same_floats(client, model, http):
    floats = embed(client, model, CASES[1]["text"])[0]
    default = client.embeddings.create(model=model, input=CASES[1]["text"])  # the client asks for base64
    assert default.data[0].embedding == floats
    raw = http.post("/v1/embeddings", json={"model": model, "input": CASES[1]["text"], "encoding_format": "base64"})
    encoded = raw.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = struct.unpack(f"<{HIDDEN_SIZE}f", base64.b64decode(encoded))
    assert list(decoded) == floats


def test_dimensions_truncate_and_renormalize(client, model):
    full = embed(client, model, CASES[2]["text"])[0]
    short = embed(client, model, CASES[2]["text"], dimensions=64)[0]
    assert len(short) == 64 and abs(norm(short) - 1) < 1e-5
    head_norm = norm(full[:64])
    assert close(short, [x / head_norm for x in full[:64]])
    assert close(embed(client, model, CASES[2]["text"], dimensions=HIDDEN_SIZE)[0], full, atol=0)


def test_usage_counts_the_input_tokens(client, model):
    response = client.embeddings.create(model=model, input=[CASES[0]["text"], CASES[1]["text"]])
    expected = len(CASES[0]["token_ids"]) + len(CASES[1]["token_ids"])
    assert response.usage.prompt_tokens == expected and response.usage.total_tokens == expected
    assert response.model == model and response.object == "list"
    assert all(d.object == "embedding" for d in response.data)


def test_a_long_input_is_refused_unless_truncated(client, model):
    long_ids = (CASES[-1]["token_ids"] * 2)[: POOLING_MAX_MODEL_LEN + 20]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        embed(client, model, long_ids)
    long_text = CASES[-1]["text"] + " " + CASES[-1]["text"]
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        embed(client, model, long_text)
    # vLLM's truncate_prompt_tokens keeps the last N tokens
    (kept,) = embed(client, model, long_ids, extra_body={"truncate_prompt_tokens": 16})
    assert close(kept, embed(client, model, long_ids[-16:])[0])
    (whole_context,) = embed(client, model, long_ids, extra_body={"truncate_prompt_tokens": -1})
    assert close(whole_context, embed(client, model, long_ids[-POOLING_MAX_MODEL_LEN:])[0])
    response = client.embeddings.create(model=model, input=long_text, extra_body={"truncate_prompt_tokens": 16})
    assert response.usage.prompt_tokens == 16
    (exactly_full,) = embed(client, model, long_ids[:POOLING_MAX_MODEL_LEN])  # an input may fill the context
    assert len(exactly_full) == HIDDEN_SIZE


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": []}, "input", "empty list"),
        ({"input": ""}, "input", "empty string"),
        ({"input": ["a", ""]}, "input", "empty string"),
        ({"input": [[1, 2], []]}, "input", "empty list of token ids"),
        ({"input": ["a", [1, 2]]}, "input", "cannot be mixed"),
        ({"input": [1, 10**6]}, "input", "not a token id"),
        ({"input": "a", "dimensions": 0}, "dimensions", "between 1 and 576"),
        ({"input": "a", "dimensions": HIDDEN_SIZE + 1}, "dimensions", "between 1 and 576"),
        ({"input": "a", "truncate_prompt_tokens": POOLING_MAX_MODEL_LEN + 1}, "truncate_prompt_tokens", "between 1"),
        ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "between 1"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": 5}, "input", ""),
    ],
)
def test_bad_requests_are_openai_400s(http, model, body, param, message):
    response = http.post("/v1/embeddings", json={"model": model, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="a")


def test_the_api_key_is_required(pooling_server):
    response = httpx.post(pooling_server.url + "/v1/embeddings", json={"input": "a"}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_generation_routes_say_the_model_is_a_pooling_runner(client, model, http):
    with pytest.raises(openai.BadRequestError, match="pooling runner"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="pooling runner"):
        client.completions.create(model=model, prompt="hi", max_tokens=4)
    assert http.get("/health").status_code == 200  # and the server is fine


def test_embeddings_are_in_the_openapi_document_and_the_metrics(http, model):
    document = http.get("/schema/openapi.json").json()
    body = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/EmbeddingRequest")
    assert "input" in document["components"]["schemas"]["EmbeddingRequest"]["properties"]
    metrics = http.get("/metrics").text
    before = _stop_count(metrics)
    http.post("/v1/embeddings", json={"model": model, "input": ["one", "two"]}).raise_for_status()
    assert _stop_count(http.get("/metrics").text) == before + 2  # one per input


def _stop_count(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("furiosa_llm:request_success_total{") and 'finished_reason="stop"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_generate_server_says_to_start_with_runner_pooling(server):
    response = httpx.post(server.url + "/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert response.status_code == 400
    assert "--runner pooling" in response.json()["error"]["message"]


def test_pooler_type_mean_reaches_the_engine():
    srv = Server("--runner", "pooling", "--pooler-type", "mean", "--max-model-len", "128").wait_ready()
    try:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            model = client.models.list().data[0].id
            vectors = embed(client, model, [case["token_ids"] for case in CASES])
    finally:
        srv.stop()
    for case, vector in zip(CASES, vectors):
        assert close(vector, case["mean"], atol=1e-4), case["text"]
        assert not close(vector, case["last"], atol=1e-2) or len(case["token_ids"]) == 1
