"""The OpenAI Completions and Chat APIs of a real `furiosa-llm serve`, through the `openai`
client (sync and async) and raw HTTP, on the default model."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_chat_completion_answers(client, model_name):
    completion = client.chat.completions.create(model=model_name, messages=CAPITAL, temperature=0, max_tokens=20)
    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens > 10
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_completion_prompt_forms(server, client, model_name):
    one = client.completions.create(model=model_name, prompt="The sky is", max_tokens=5, temperature=0)
    assert len(one.choices) == 1 and one.choices[0].finish_reason == "length"
    assert one.usage.completion_tokens == 5
    many = client.completions.create(model=model_name, prompt=["The sky is", "Water is"], max_tokens=5, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text
    ids = httpx.post(server.url + "/tokenize", json={"model": model_name, "prompt": "The sky is"}).json()["tokens"]
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    by_id_lists = client.completions.create(model=model_name, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert [c.text for c in by_id_lists.choices] == [one.choices[0].text] * 2
    echoed = client.completions.create(model=model_name, prompt="The sky is", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + one.choices[0].text


def test_default_max_tokens_is_16_for_completions(client, model_name):
    completion = client.completions.create(model=model_name, prompt="Once upon a time",
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16 and completion.choices[0].finish_reason == "length"


def _stream_chat(client, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_chat_stream_equals_non_stream_for_the_same_seed(client, model_name):
    params = dict(model=model_name, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
                  temperature=0.9, top_p=0.95, seed=7, n=2, max_tokens=40)
    full = client.chat.completions.create(**params)
    texts, reasons, chunks = _stream_chat(client, **params, stream_options={"include_usage": True})
    assert texts == {c.index: c.message.content for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    first_of_each = {}
    for chunk in chunks:
        for choice in chunk.choices:
            first_of_each.setdefault(choice.index, choice.delta.role)
    assert first_of_each == {0: "assistant", 1: "assistant"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_equals_non_stream_with_logprobs(client, model_name):
    params = dict(model=model_name, prompt="def fibonacci(n):", max_tokens=24, temperature=0, logprobs=2)
    full = client.completions.create(**params)
    chunks = list(client.completions.create(stream=True, **params))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    streamed_tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == full.choices[0].logprobs.tokens
    assert "".join(full.choices[0].logprobs.tokens) == full.choices[0].text
    assert all(len(top) == 2 for top in full.choices[0].logprobs.top_logprobs)


def test_raw_sse_framing(server, model_name):
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes()).decode()
    assert "\r" not in raw and raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_chat_logprobs(client, model_name):
    completion = client.chat.completions.create(model=model_name, messages=CAPITAL, temperature=0, max_tokens=10,
                                                logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert completion.choices[0].finish_reason == "stop"
    # as vLLM does, the EOS token that ended the answer has its logprob entry too
    assert content[-1].token == "<|im_end|>"
    content = content[:-1]
    assert "".join(t.token for t in content) == completion.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
        assert token.logprob <= 0 and token.top_logprobs[0].token == token.token  # greedy picks the top


def test_stop_string_ends_the_text_before_it(client, model_name):
    params = dict(model=model_name, prompt="The numbers from one to ten are: one, two,", max_tokens=30,
                  temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**params).choices[0].text
    stop = text[len(text) // 3: len(text) // 3 + 4]
    assert stop.strip()
    stopped = client.completions.create(stop=[stop], **params).choices[0]
    assert stopped.text == text[: text.index(stop)] and stopped.finish_reason == "stop"
    kept = client.completions.create(stop=stop, **{**params, "extra_body": {"ignore_eos": True,
                                                                         "include_stop_str_in_output": True}})
    assert kept.choices[0].text == text[: text.index(stop) + len(stop)]


def test_32_concurrent_greedy_requests_equal_the_same_requests_one_by_one(async_client, model_name):
    prompts = [f"Tell me a fact about the number {i}." for i in range(32)]

    async def ask(prompt: str) -> str:
        completion = await async_client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16)
        return completion.choices[0].message.content

    async def run():
        together = await asyncio.gather(*(ask(p) for p in prompts))
        alone = [await ask(p) for p in prompts]
        return together, alone

    together, alone = asyncio.run(run())
    assert together == alone
    assert len(set(together)) > 1


def test_errors_use_the_openai_envelope(server, client, model_name):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=CAPITAL, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="hi " * 9000, max_tokens=10)
    assert "8192" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="hi", stream=True, extra_body={"use_beam_search": True})
    assert "beam" in info.value.body["message"].lower()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="hi", suffix="bye")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=[])
    raw = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.get(server.url + "/v1/nothing-here", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    # the server is still fine
    assert client.completions.create(model=model_name, prompt="ok", max_tokens=2).choices[0].text


def test_health_version_models_tokenize_detokenize(server, client, model_name):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    card = client.models.retrieve(model_name)
    assert card.id == model_name
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 8192
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Hello world"


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(server, client, model_name):
    """The second request starts on the first one's cached blocks: usage says how many prompt
    tokens came from the cache (as OpenAI's prompt_tokens_details does), the answer is the same,
    and /metrics counts the hits."""
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly and politely." for i in range(20))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a primary colour."}]
    hits_before = _metric(server, "furiosa_llm:prefix_cache_hits_total")
    first = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=12)
    second = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=12)
    assert second.choices[0].message.content == first.choices[0].message.content
    prompt_tokens = second.usage.prompt_tokens
    assert prompt_tokens > 200
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (prompt_tokens - 1) // 16 * 16  # every full block but the one with the last token
    assert _metric(server, "furiosa_llm:prefix_cache_hits_total") - hits_before >= cached
    raw = httpx.post(server.url + "/v1/completions", json={"model": model_name, "prompt": system, "max_tokens": 1}).json()
    assert raw["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0


def test_logit_bias_forces_and_bans_tokens_and_null_parameters_mean_their_defaults(server, client, model_name):
    comma = httpx.post(server.url + "/tokenize", json={"model": model_name, "prompt": ","}).json()["tokens"]
    assert len(comma) == 1
    forced = client.completions.create(model=model_name, prompt="The sky is", max_tokens=4, temperature=0,
                                       logit_bias={str(comma[0]): 100})
    assert forced.choices[0].text == ",,,,"
    plain = client.completions.create(model=model_name, prompt="The sky is", max_tokens=1, temperature=0).choices[0]
    first = httpx.post(server.url + "/tokenize", json={"model": model_name, "prompt": plain.text}).json()["tokens"]
    assert len(first) == 1
    banned = client.completions.create(model=model_name, prompt="The sky is", max_tokens=1, temperature=0,
                                       logit_bias={str(first[0]): -100})
    assert banned.choices[0].text != plain.text
    bad = httpx.post(server.url + "/v1/completions",
                     json={"model": model_name, "prompt": "x", "max_tokens": 1, "logit_bias": {"-1": 5}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    nulls = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
        "n": None, "logprobs": None, "stream": None, "stop": None, "seed": None, "logit_bias": None})
    assert nulls.status_code == 200 and len(nulls.json()["choices"]) == 1


def test_cached_tokens_are_reported_when_a_stop_string_ends_the_request(server, model_name):
    """A stop string ends the sequence in the frontend, which aborts it in the engine; the usage
    still says how many prompt tokens came from the cache, streamed or not."""
    system = "You are a patient tutor. " + " ".join(f"Hint {i}: explain every step with care." for i in range(20))
    body = {"model": model_name, "temperature": 0, "max_tokens": 30, "stop": ["e"],
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Describe the sea."}]}
    first = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    second = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert second["choices"][0]["finish_reason"] == "stop" and second["choices"][0]["stop_reason"] == "e"
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    usage = second["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": (usage["prompt_tokens"] - 1) // 16 * 16}
    assert "prompt_tokens_details" in first["usage"]
    streamed = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[len("data: "):]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert events[-1]["usage"] == usage


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_metrics_carry_furiosas_names_and_the_cache_config(server, client, model_name):
    """FuriosaAI's metric names beside ours, with equal values, and cache_config_info naming the KV
    cache the engine really made (1 GiB here, so the block count depends on the model)."""
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=model_name, prompt="Hello", max_tokens=2)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
               for s in family.samples}

    def value(name: str, **labels) -> float:
        [found] = [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]
        return found

    for ours, theirs in [("furiosa_llm:generation_tokens_total", "furiosa_llm_generation_tokens_total"),
                         ("furiosa_llm:e2e_request_latency_seconds_count", "furiosa_llm_e2e_request_latency_seconds_count"),
                         ("furiosa_llm:request_params_max_tokens_sum", "furiosa_llm_request_params_max_tokens_sum")]:
        assert value(theirs, leader_device="cpu") == value(ours) > 0
    [(_, info_labels)] = [key for key in samples if key[0] == "furiosa_llm_cache_config_info"]
    info = dict(info_labels)
    assert info["block_size"] == "16" and info["cache_dtype"] == "auto" and info["enable_prefix_caching"] == "True"
    num_blocks = int(info["num_gpu_blocks"])
    assert num_blocks == int(info["num_blocks"]) > 0
    assert value("furiosa_llm:cache_config_info", num_gpu_blocks=str(num_blocks)) == 1
