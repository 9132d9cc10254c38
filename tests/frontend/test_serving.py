"""Completions and chat completions, non-streamed, over the fake engine."""

from __future__ import annotations

import msgspec
import pytest
from fake_model import EOS_ID, MAX_MODEL_LEN, MODEL_NAME, parse_sse, text_script
from litestar.testing import TestClient

from frontend.app import create_app
from frontend.protocol import ChatCompletionRequest, CompletionRequest
from frontend.metrics import RequestTiming
from ipc.messages import FinishReason

USER_HI = [{"role": "user", "content": "hi"}]


def complete(client, **body):
    body.setdefault("prompt", "Hello")
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def chat(client, **body):
    body.setdefault("messages", USER_HI)
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_400(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error["message"]


# ---- parameter validation ----------------------------------------------------------------

BAD_SAMPLING_VALUES = [
    ("n", 0),
    ("best_of", 1, {"n": 2}),
    ("temperature", -0.1),
    ("temperature", 2.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("min_p", -0.5),
    ("min_p", 1.5),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", 2.5),
    ("seed", 2**64),
    ("min_tokens", -1),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("min_tokens", 10, {"max_tokens": 5}),
    ("stop_token_ids", [99999]),
    ("stop_token_ids", [-1]),
    ("n", 17),  # more sequences than max_num_seqs (16)
    ("stream_options", {"include_usage": True}),  # without stream
    ("cache_salt", ""),
    ("stop", ""),  # vLLM's 400, not silently dropped
    ("stop", [""]),
    ("stop", ["a", ""]),
]


def _case(entry):
    param, value, *rest = entry
    return param, value, rest[0] if rest else {}


@pytest.mark.parametrize("entry", BAD_SAMPLING_VALUES, ids=lambda e: f"{e[0]}={e[1]}")
def test_completions_reject_out_of_range_values(client, engine, entry):
    param, value, extra = _case(entry)
    message = assert_400(client.post("/v1/completions", json={"prompt": "Hello", param: value, **extra}), param)
    assert param in message
    assert engine.requests == []


@pytest.mark.parametrize("entry", BAD_SAMPLING_VALUES, ids=lambda e: f"{e[0]}={e[1]}")
def test_chat_rejects_out_of_range_values(client, engine, entry):
    param, value, extra = _case(entry)
    assert_400(client.post("/v1/chat/completions", json={"messages": USER_HI, param: value, **extra}), param)
    assert engine.requests == []


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"suffix": "tail"}, "suffix"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [99999]}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_completions_specific_validation(client, body, param):
    assert_400(client.post("/v1/completions", json={"prompt": "Hello", **body}), param)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"not": {}}}}},
         "response_format"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ],
)
def test_chat_specific_validation(client, body, param):
    assert_400(client.post("/v1/chat/completions", json={"messages": USER_HI, **body}), param)


def test_suffix_message_says_it_is_unsupported(client):
    message = assert_400(client.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), "suffix")
    assert "not supported" in message


def test_auto_tool_choice_is_accepted_when_enabled(config, engine, tokenizer):
    config.enable_auto_tool_choice, config.tool_call_parser = True, "hermes"
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        chat(client, tools=tools, tool_choice="auto", max_tokens=2)


def test_unknown_fields_are_ignored(client):
    assert complete(client, max_tokens=2, logit_bias={"1": 5}, some_future_field=[1, 2])["choices"]


def test_missing_and_served_model_name_are_accepted(client):
    assert complete(client, max_tokens=1)["model"] == MODEL_NAME
    assert complete(client, max_tokens=1, model=MODEL_NAME)["model"] == MODEL_NAME


# ---- max_tokens and the context length -----------------------------------------------------


def test_completions_default_max_tokens_is_16(client, engine):
    body = complete(client)
    assert engine.requests[0].sampling_params.max_tokens == 16
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_default_max_tokens_is_the_rest_of_the_context(client, engine, tokenizer):
    chat(client)
    request = engine.requests[0]
    assert request.sampling_params.max_tokens == MAX_MODEL_LEN - len(request.prompt_token_ids)


def test_max_completion_tokens_wins_over_max_tokens(client, engine):
    body = chat(client, max_tokens=9, max_completion_tokens=3)
    assert engine.requests[0].sampling_params.max_tokens == 3
    assert body["usage"]["completion_tokens"] == 3


def test_prompt_plus_max_tokens_over_the_context_is_400_with_numbers(client, tokenizer):
    num_prompt_tokens = len(tokenizer.encode("Hello"))
    message = assert_400(client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": MAX_MODEL_LEN}), "max_tokens")
    assert str(MAX_MODEL_LEN) in message and str(num_prompt_tokens) in message
    assert str(MAX_MODEL_LEN + num_prompt_tokens) in message


def test_prompt_that_fills_the_context_is_400(client):
    message = assert_400(client.post("/v1/completions", json={"prompt": [5] * MAX_MODEL_LEN}), "prompt")
    assert str(MAX_MODEL_LEN) in message


def test_clamp_max_tokens_clamps_instead(config, engine, tokenizer):
    config.clamp_max_tokens = True
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        complete(client, prompt=[5, 6, 7], max_tokens=1000)
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_completion_tokens": 1000})
        assert chat.status_code == 200
    assert engine.requests[0].sampling_params.max_tokens == MAX_MODEL_LEN - 3
    chat_request = engine.requests[1]
    assert chat_request.sampling_params.max_tokens == MAX_MODEL_LEN - len(chat_request.prompt_token_ids)


# ---- sampling parameters reach the engine ---------------------------------------------------


def test_sampling_params_are_passed_through(client, engine):
    complete(
        client,
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        min_p=0.1,
        seed=-1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        min_tokens=2,
        stop_token_ids=[7],
        ignore_eos=True,
        n=2,
        best_of=3,
        length_penalty=0.8,
        early_stopping="never",
    )
    params = engine.requests[0].sampling_params
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 0, 0.1)
    assert params.seed == 2**64 - 1  # negative seeds map to their unsigned value
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (params.min_tokens, params.stop_token_ids, params.ignore_eos) == (2, [7], True)
    assert (params.n, params.best_of, params.length_penalty, params.early_stopping) == (2, 3, 0.8, "never")
    assert params.logprobs is None and params.prompt_logprobs is None
    assert engine.requests[0].eos_token_ids == [EOS_ID]


def test_defaults_reach_the_engine_as_neutral_values(client, engine):
    complete(client, max_tokens=1)
    params = engine.requests[0].sampling_params
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (1.0, 1.0, 0, 0.0, None)
    assert (params.n, params.best_of, params.use_beam_search) == (1, None, False)


def test_beam_search_ignores_temperature(client, engine):
    complete(client, max_tokens=2, use_beam_search=True, temperature=7.0, n=2, best_of=2)
    params = engine.requests[0].sampling_params
    assert params.use_beam_search and params.temperature == 1.0


def test_prompt_is_tokenized_with_special_tokens_and_chat_without(client, engine, tokenizer):
    complete(client, prompt="Hello world", max_tokens=1)
    assert engine.requests[0].prompt_token_ids == tokenizer.encode("Hello world", add_special_tokens=True)
    chat(client, max_tokens=1)
    expected = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert engine.requests[1].prompt_token_ids == expected


# ---- output assembly ----------------------------------------------------------------------


def test_eos_ends_with_stop_and_is_not_in_the_text(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world!")
    body = complete(client, max_tokens=50)
    choice = body["choices"][0]
    assert choice["text"] == "Hello world!"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None  # as the engine and vLLM: only a stop token id or string is a reason
    assert body["usage"]["completion_tokens"] == len(tokenizer.encode("Hello world!")) + 1


def test_stop_string_inside_a_token(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "The quick brown fox jumps")
    assert any(tokenizer.decode([t]) == " quick" for t in tokenizer.encode(" quick"))
    body = complete(client, max_tokens=50, stop="uic")
    choice = body["choices"][0]
    assert choice["text"] == "The q"
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "uic")
    request_id = engine.requests[0].request_id
    assert (([request_id], [0])) in engine.abort_calls
    assert body["usage"]["completion_tokens"] == 2  # "The", " quick"


def test_stop_string_across_tokens(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "The quick brown fox jumps")
    body = complete(client, max_tokens=50, stop=["zzz", "ck bro"])
    assert body["choices"][0]["text"] == "The qui"
    assert body["choices"][0]["stop_reason"] == "ck bro"


def test_include_stop_str_in_output(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "The quick brown fox jumps")
    body = chat(client, stop=["brown"], include_stop_str_in_output=True)
    assert body["choices"][0]["message"]["content"] == "The quick brown"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_held_back_text_is_released_when_no_stop_matches(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "The quick brown fo")
    body = complete(client, max_tokens=50, stop=["fox"])
    assert body["choices"][0]["text"] == "The quick brown fo"
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] is None


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_count_only_once_min_tokens_exist(client, engine, tokenizer, stream):
    """As vLLM: a stop string ending within the first min_tokens tokens does not end the choice."""
    text = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"
    engine.script = text_script(tokenizer, text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    body = {"max_tokens": 50, "stop": [","], "min_tokens": 10}
    if stream:
        events = parse_sse(client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "count",
                                                               "stream": True, **body}).text)
        got = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])
    else:
        got = complete(client, **body)["choices"][0]["text"]
    # the first "," ending at or after the 11th token
    end = len(tokenizer.decode(ids[:11]))
    assert got == text[: text.index(",", end - 1)]
    assert got.count(",") >= 3  # "1" alone without min_tokens


def test_stop_token_id_ends_with_stop_reason(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world! The end", eos=False)
    stop_id = tokenizer.encode("!")[0]
    body = complete(client, max_tokens=50, stop_token_ids=[stop_id])
    # as vLLM: the stop token's text is left out unless include_stop_str_in_output
    assert body["choices"][0]["text"] == "Hello world"
    assert body["choices"][0]["stop_reason"] == stop_id
    body = complete(client, max_tokens=50, stop_token_ids=[stop_id], include_stop_str_in_output=True)
    assert body["choices"][0]["text"] == "Hello world!"


def test_skip_special_tokens_false_shows_special_tokens_but_not_the_ending_eos(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hi<|im_start|>")
    body = complete(client, max_tokens=50, skip_special_tokens=False)
    assert body["choices"][0]["text"] == "Hi<|im_start|>"
    body = complete(client, max_tokens=50, skip_special_tokens=False, include_stop_str_in_output=True)
    assert body["choices"][0]["text"] == "Hi<|im_start|><|im_end|>"


def test_n_choices_are_indexed_and_counted(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "one two", "three")
    body = chat(client, n=2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["one two", "three"]
    expected = len(tokenizer.encode("one two")) + len(tokenizer.encode("three")) + 2
    assert body["usage"]["completion_tokens"] == expected
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + expected


def test_each_prompt_is_its_own_request_and_choices_are_prompt_major(client, engine, tokenizer):
    engine.script = lambda request, index: tokenizer.encode(f"{request.prompt_token_ids[0]}-{index}") + [EOS_ID]
    prompts = [[10, 11], [20], [30, 31, 32]]
    body = complete(client, prompt=prompts, n=2, max_tokens=20)
    assert len(engine.requests) == 3
    assert len({r.request_id for r in engine.requests}) == 3
    texts = [c["text"] for c in body["choices"]]
    assert texts == ["10-0", "10-1", "20-0", "20-1", "30-0", "30-1"]
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["usage"]["prompt_tokens"] == 6


def test_list_of_strings_prompt(client, engine):
    body = complete(client, prompt=["Hello", "world"], max_tokens=2)
    assert len(body["choices"]) == 2 and len(engine.requests) == 2


def test_best_of_usage_counts_all_candidates(client, engine):
    engine.num_generated_tokens = 12
    body = complete(client, max_tokens=4, n=1, best_of=3)
    assert len(body["choices"]) == 1
    assert body["usage"]["completion_tokens"] == 12


def test_echo_prepends_the_prompt(client, engine, tokenizer):
    engine.script = text_script(tokenizer, " world")
    body = complete(client, prompt="Hello", echo=True, max_tokens=10)
    assert body["choices"][0]["text"] == "Hello world"
    body = complete(client, prompt=tokenizer.encode("Hello"), echo=True, max_tokens=10)
    assert body["choices"][0]["text"] == "Hello world"


def test_engine_error_finish_is_400_with_its_message(client, engine):
    engine.error_message = "the prompt does not fit the KV cache"
    response = client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 400
    assert "KV cache" in response.json()["error"]["message"]


def test_engine_death_during_a_request_is_503(client, engine):
    engine.die_after_steps = 3
    response = client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_dead"


def test_abort_not_requested_by_us_is_503(client, engine):
    engine.unrequested_abort = True
    response = client.post("/v1/chat/completions", json={"messages": USER_HI})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "request_aborted"


# ---- logprobs ----------------------------------------------------------------------------


def test_completions_logprobs_format(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hello world")
    body = complete(client, prompt="x", logprobs=2, max_tokens=50)
    logprobs = body["choices"][0]["logprobs"]
    tokens = [tokenizer.decode([t]) for t in tokenizer.encode("Hello world")] + ["<|im_end|>"]
    assert logprobs["tokens"] == tokens
    assert logprobs["token_logprobs"] == [-0.25 - k / 100 for k in range(len(tokens))]
    offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    assert logprobs["text_offset"] == offsets
    for token, top in zip(tokens, logprobs["top_logprobs"]):
        assert token in top and 1 <= len(top) <= 2
    assert engine.requests[0].sampling_params.logprobs == 2


def test_completions_echo_logprobs_start_with_the_prompt(client, engine, tokenizer):
    engine.script = text_script(tokenizer, " world")
    prompt_ids = tokenizer.encode("Hello there")
    body = complete(client, prompt=prompt_ids, echo=True, logprobs=1, max_tokens=50)
    assert engine.requests[0].sampling_params.prompt_logprobs == 1
    logprobs = body["choices"][0]["logprobs"]
    num_prompt = len(prompt_ids)
    assert "".join(logprobs["tokens"][:num_prompt]) == "Hello there"
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp is not None for lp in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"][num_prompt] == len("Hello there")


def test_chat_logprobs_format(client, engine, tokenizer):
    engine.script = text_script(tokenizer, "Hi 🙂")
    body = chat(client, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    token_ids = tokenizer.encode("Hi 🙂") + [EOS_ID]
    assert len(content) == len(token_ids)
    assert b"".join(bytes(entry["bytes"]) for entry in content[:-1]) == "Hi 🙂".encode()
    for k, entry in enumerate(content):
        assert entry["logprob"] == pytest.approx(-0.25 - k / 100)
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert content[-1]["token"] == "<|im_end|>"
    assert engine.requests[0].sampling_params.logprobs == 2


def test_chat_logprobs_without_top(client, engine):
    body = chat(client, logprobs=True, max_tokens=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(entry["top_logprobs"] == [] for entry in content)
    assert engine.requests[0].sampling_params.logprobs == 0


def test_no_logprobs_unless_asked(client, engine):
    assert chat(client, max_tokens=2)["choices"][0]["logprobs"] is None
    assert complete(client, max_tokens=2)["choices"][0]["logprobs"] is None
    assert engine.requests[0].sampling_params.logprobs is None


# ---- chat templating ------------------------------------------------------------------------


def test_text_parts_are_joined(client, engine, tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    chat(client, messages=messages, max_tokens=1)
    assert tokenizer.decode(engine.requests[0].prompt_token_ids).startswith("<|im_start|>user\na\nb<|im_end|>")


def test_continue_final_message_ends_the_prompt_inside_it(client, engine, tokenizer):
    messages = [*USER_HI, {"role": "assistant", "content": "Sure, the answer is"}]
    chat(client, messages=messages, add_generation_prompt=False, continue_final_message=True, max_tokens=1)
    prompt = tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert prompt.endswith("<|im_start|>assistant\nSure, the answer is")


def test_add_generation_prompt_false(client, engine, tokenizer):
    chat(client, add_generation_prompt=False, max_tokens=1)
    assert tokenizer.decode(engine.requests[0].prompt_token_ids) == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_kwargs_and_tools_reach_the_template(config, engine, tokenizer, tmp_path):
    template = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{{ greeting }}{% for m in messages %}[{{ m.role }}:{{ m.content }}]"
        "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% endif %}{% endfor %}"
    )
    template_path = tmp_path / "template.jinja"
    template_path.write_text(template)
    config.chat_template = str(template_path)
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Seoul"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "weather"}}]
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        chat(client, messages=messages, tools=tools, chat_template_kwargs={"greeting": "HI"}, max_tokens=1)
    prompt = tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert prompt == "TOOLS:weather\nHI[user:weather?][assistant:]Seoul[tool:sunny]"


def test_template_error_is_400(config, engine, tokenizer, tmp_path):
    template_path = tmp_path / "template.jinja"
    template_path.write_text("{% if tools %}{{ raise_exception('this model takes no tools') }}{% endif %}")
    config.chat_template = str(template_path)
    tools = [{"type": "function", "function": {"name": "f"}}]
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER_HI, "tools": tools})
        assert "this model takes no tools" in assert_400(response, "messages")


def test_model_without_chat_template_refuses_chat(config, engine, tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    bare.chat_template = None
    with TestClient(create_app(config, engine_client=engine, tokenizer=bare)) as client:
        message = assert_400(client.post("/v1/chat/completions", json={"messages": USER_HI}), "messages")
        assert "chat template" in message


# ---- timing -------------------------------------------------------------------------------


def test_request_timing_is_recorded(client, engine):
    timings: list[RequestTiming] = []
    services = client.app.state.services
    services.completions.on_request_finished = timings.append
    complete(client, max_tokens=3)
    (timing,) = timings
    assert timing.arrival_time <= timing.first_token_time <= timing.finish_time
    assert (timing.num_prompt_tokens, timing.num_generation_tokens) == (len(engine.requests[0].prompt_token_ids), 3)


def test_finish_reason_enum_is_covered():
    # The frontend maps every engine finish reason; a new one must be handled here first.
    assert {r.name for r in FinishReason} == {"STOP", "LENGTH", "ABORT", "ERROR"}


@pytest.mark.parametrize("penalty", [300.0, -300.0])
def test_an_extreme_length_penalty_is_a_400_not_an_engine_crash(client, engine, penalty):
    response = client.post("/v1/completions", json={"prompt": "Hello", "use_beam_search": True, "n": 2,
                                                    "length_penalty": penalty})
    assert response.status_code == 400 and response.json()["error"]["param"] == "length_penalty"
    assert engine.requests == []


def test_a_vanishing_temperature_is_greedy(client, engine):
    complete(client, temperature=1e-50)
    assert engine.requests[0].sampling_params.temperature == 0.0


def test_cache_salt_reaches_the_engine(client, engine):
    for path, body in (("/v1/completions", {"prompt": "Hello"}), ("/v1/chat/completions", {"messages": USER_HI})):
        response = client.post(path, json={**body, "max_tokens": 2, "cache_salt": "tenant-7"})
        assert response.status_code == 200, response.text
    assert [r.sampling_params.cache_salt for r in engine.requests] == ["tenant-7", "tenant-7"]


# ---- null means the default -----------------------------------------------------------------

ENDPOINTS = [("/v1/completions", CompletionRequest, {"prompt": "Hello"}),
             ("/v1/chat/completions", ChatCompletionRequest, {"messages": USER_HI})]


@pytest.mark.parametrize("path, cls, body", ENDPOINTS, ids=["completions", "chat"])
def test_every_optional_field_sent_as_null_means_its_default(client, engine, path, cls, body):
    nulls = {f.name: None for f in msgspec.structs.fields(cls) if not f.required}
    assert {"n", "logprobs", "stream", "stream_options", "min_tokens", "ignore_eos", "include_stop_str_in_output",
            "skip_special_tokens", "use_beam_search", "early_stopping", "logit_bias"} <= set(nulls)
    with_nulls = client.post(path, json={**body, **nulls})
    assert with_nulls.status_code == 200, with_nulls.text
    without = client.post(path, json=body)
    assert with_nulls.json()["choices"] == without.json()["choices"]
    assert with_nulls.json()["usage"] == without.json()["usage"]
    first, second = engine.requests
    assert first.sampling_params == second.sampling_params
    assert first.prompt_token_ids == second.prompt_token_ids


def test_null_chat_extras_mean_their_defaults(client, engine):
    chat(client, max_tokens=1, add_generation_prompt=None, continue_final_message=None, echo=None)
    chat(client, max_tokens=1)
    assert engine.requests[0].prompt_token_ids == engine.requests[1].prompt_token_ids


def test_null_stream_options_fields_mean_their_defaults(client):
    response = client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 2, "stream": True,
                                                         "stream_options": {"include_usage": None,
                                                                            "continuous_usage_stats": None}})
    events = parse_sse(response.text)
    assert events and all("usage" not in e for e in events)
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True,
                                                    "stream_options": {"include_usage": True,
                                                                       "continuous_usage_stats": None}})
    events = parse_sse(response.text)
    assert [("usage" in e) for e in events] == [False] * (len(events) - 1) + [True]


@pytest.mark.parametrize("param, value", [("n", "two"), ("stream", "yes"), ("min_tokens", 1.5),
                                          ("use_beam_search", 1), ("early_stopping", "sometimes")])
def test_a_wrong_type_is_still_a_400(client, engine, param, value):
    for path, _, body in ENDPOINTS:
        assert_400(client.post(path, json={**body, param: value}), param)
    assert engine.requests == []


# ---- logit_bias -----------------------------------------------------------------------------


def test_logit_bias_reaches_the_engine_with_integer_token_ids(client, engine, tokenizer):
    last = len(tokenizer) - 1
    bias = {"1": 5, "28": -100, "0": 100, str(last): 0.5}
    complete(client, prompt=["Hello", "world"], max_tokens=2, logit_bias=bias)
    chat(client, max_tokens=2, logit_bias=bias)
    assert [r.sampling_params.logit_bias for r in engine.requests] == [{1: 5.0, 28: -100.0, 0: 100.0, last: 0.5}] * 3


@pytest.mark.parametrize("bias", [None, {}])
def test_null_or_empty_logit_bias_is_none(client, engine, bias):
    complete(client, max_tokens=1, logit_bias=bias)
    chat(client, max_tokens=1, logit_bias=bias)
    assert [r.sampling_params.logit_bias for r in engine.requests] == [None, None]


@pytest.mark.parametrize("bias", [
    {"abc": 1}, {"1.5": 1}, {"": 1}, {" 1": 1}, {"+1": 1}, {"0x1": 1}, {"-1": 1}, {"99999": 1},
    {"1" * 30: 1}, {"1": 100.5}, {"1": -101}, {"1": 1e300}, {"1": "x"}, {"1": None}, [1], 5,
], ids=repr)
def test_invalid_logit_bias_is_a_400(client, engine, bias):
    for path, _, body in ENDPOINTS:
        assert_400(client.post(path, json={**body, "logit_bias": bias}), "logit_bias")
    assert engine.requests == []


def test_an_infinite_logit_bias_is_a_400(client, engine):
    assert_400(client.post("/v1/completions", content=b'{"prompt": "x", "logit_bias": {"1": 1e999}}'), "logit_bias")
    assert engine.requests == []


def test_logit_bias_token_ids_end_at_the_vocabulary(client, engine, tokenizer):
    vocab_size = engine.model_info.vocab_size
    message = assert_400(client.post("/v1/completions", json={"prompt": "x", "logit_bias": {str(vocab_size): 1}}),
                         "logit_bias")
    assert str(vocab_size) in message
    complete(client, max_tokens=1, logit_bias={str(vocab_size - 1): 1})
    assert engine.requests[0].sampling_params.logit_bias == {vocab_size - 1: 1.0}


# ---- usage: prompt tokens served from the prefix cache -----------------------------------------


def test_cached_tokens_are_reported_when_a_stop_string_ends_the_request(client, engine):
    """The frontend ends such a sequence itself; the engine's count came with the choice's first
    output, so the usage looks the same however the request ended."""
    engine.num_cached_tokens = 32
    by_length = chat(client, max_tokens=3)
    by_stop = chat(client, stop=["quick"])
    assert by_stop["choices"][0]["finish_reason"] == "stop" and by_stop["choices"][0]["stop_reason"] == "quick"
    assert engine.abort_calls == [([engine.requests[1].request_id], [0])]
    assert by_stop["usage"]["prompt_tokens_details"] == by_length["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 32}


def test_cached_tokens_of_every_prompt_and_choice_ended_by_stop_strings(client, engine):
    engine.num_cached_tokens = 16
    body = complete(client, prompt=["Hello", "world"], n=2, stop="quick", max_tokens=50)
    assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 4
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}  # 16 for each prompt
    events = parse_sse(client.post("/v1/chat/completions", json={
        "messages": USER_HI, "n": 2, "stop": ["quick"], "stream": True,
        "stream_options": {"include_usage": True}}).text)
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}


def test_without_prefix_caching_a_stop_string_ends_the_request_at_once(config, engine, tokenizer):
    config.engine.enable_prefix_caching = False  # the engine reports no cached tokens then
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        body = chat(client, stop=["quick"])
    assert "prompt_tokens_details" not in body["usage"]
    # the frontend stopped reading before the engine's ABORT: nothing is worth waiting for
    assert engine.closed_unfinished == [engine.requests[0].request_id]


def test_a_stream_without_usage_ends_without_waiting_for_the_abort(client, engine):
    engine.num_cached_tokens = 16
    response = client.post("/v1/chat/completions", json={"messages": USER_HI, "stop": ["quick"], "stream": True})
    events = parse_sse(response.text)
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and all("usage" not in e for e in events)
    assert engine.closed_unfinished == [engine.requests[0].request_id]


def test_cached_tokens_sent_early_need_no_wait_for_the_abort(client, engine):
    engine.num_cached_tokens = 48  # on the choice's first output, as the engine sends it
    body = chat(client, stop=["quick"])
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
    assert engine.closed_unfinished == [engine.requests[0].request_id]


def test_engine_death_after_every_choice_ended_still_answers(client, engine, tokenizer):
    """Once a stop string has ended every choice nothing more is read from the engine (the
    cached-token count came with the first output), so its death right after is not seen."""
    engine.num_cached_tokens = 16
    engine.script = text_script(tokenizer, "Hello world! The quick brown fox")
    engine.die_after_steps = 4  # right after step 3, whose token completes the stop string
    body = chat(client, stop=["world"])
    assert body["choices"][0]["message"]["content"] == "Hello " and body["choices"][0]["finish_reason"] == "stop"
    assert engine.abort_calls and engine.dead_reason == "scripted death"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
