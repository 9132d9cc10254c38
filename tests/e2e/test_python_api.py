"""`furiosa_llm.LLM` answers as the server does: same texts, stops, logprobs, beams and errors."""

from __future__ import annotations

import httpx
import pytest

from furiosa_llm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def llm():
    with LLM(kv_cache_gib=0.5) as instance:
        yield instance


def _completion(server, model_name, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": model_name, **body}, timeout=300)


def test_greedy_text_is_the_servers(server, model_name, llm):
    served = _completion(server, model_name, prompt=PROMPTS, temperature=0, max_tokens=24).json()["choices"]
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].text for o in outputs] == [c["text"] for c in served]
    assert [o.outputs[0].finish_reason for o in outputs] == [c["finish_reason"] for c in served]


def test_chat_is_the_servers(server, model_name, llm):
    messages = [{"role": "user", "content": "Name three colours."}]
    served = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                        json={"model": model_name, "messages": messages, "temperature": 0, "max_tokens": 20}).json()
    (output,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert output.outputs[0].text == served["choices"][0]["message"]["content"]


@pytest.mark.parametrize("options", [
    dict(n=3, temperature=0.9, seed=11, max_tokens=10),
    dict(n=2, best_of=4, temperature=0.9, seed=5, max_tokens=10),
    dict(n=2, use_beam_search=True, max_tokens=8),
    dict(temperature=0, max_tokens=30, stop=[" 7", "\n"]),
    dict(temperature=0, max_tokens=30, stop=[" 7"], include_stop_str_in_output=True),
])
def test_sampling_options_behave_as_on_the_server(server, model_name, llm, options):
    served = _completion(server, model_name, prompt=PROMPTS[2], **options).json()["choices"]
    (output,) = llm.generate(PROMPTS[2], SamplingParams(**options), use_tqdm=False)
    assert [(c.text, c.finish_reason, c.stop_reason) for c in output.outputs] == [
        (c["text"], c["finish_reason"], c["stop_reason"]) for c in served]


def test_logprobs_are_the_servers(server, model_name, llm):
    served = _completion(server, model_name, prompt=PROMPTS[0], temperature=0, max_tokens=6, logprobs=2).json()
    served_logprobs = served["choices"][0]["logprobs"]
    (output,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, logprobs=2), use_tqdm=False)
    choice = output.outputs[0]
    ours = [position[token_id].logprob for token_id, position in zip(choice.token_ids, choice.logprobs)]
    assert ours == pytest.approx(served_logprobs["token_logprobs"], abs=1e-6)
    assert [position[t].decoded_token for t, position in zip(choice.token_ids, choice.logprobs)] == served_logprobs["tokens"]


@pytest.mark.parametrize("options", [dict(temperature=2.5), dict(n=3, best_of=2), dict(min_p=1.5),
                                     dict(repetition_penalty=0), dict(stop=["a", ""])])
def test_invalid_sampling_params_raise_the_servers_message(server, model_name, options):
    response = _completion(server, model_name, prompt="Hi", **options)
    assert response.status_code == 400
    with pytest.raises(ValueError) as info:
        SamplingParams(**options)
    assert str(info.value) == response.json()["error"]["message"]


def test_a_prompt_too_long_raises_the_servers_message(server, model_name, llm):
    response = _completion(server, model_name, prompt="Hi", max_tokens=10**6)
    with pytest.raises(ValueError) as info:
        llm.generate("Hi", SamplingParams(max_tokens=10**6), use_tqdm=False)
    assert response.status_code == 400
    # the server's KV cache (1 GiB) gives it a longer context than this LLM's (0.5 GiB)
    assert str(info.value).split(" tokens.")[1] == response.json()["error"]["message"].split(" tokens.")[1]
