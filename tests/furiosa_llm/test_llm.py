"""`furiosa_llm.LLM` on the default model: batching, sampling options, errors, the engine's lifetime."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from furiosa_llm import LLM, BeamSearchParams, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def llm():
    with LLM(kv_cache_gib=0.5) as instance:
        yield instance


def _process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[:1]


def _count_engine_steps(llm: LLM) -> list[int]:
    """Counts the engine's output messages (one per step that had news) from now on."""
    count = [0]
    route = llm._client._route

    def counting_route(engine, message):
        count[0] += 1
        route(engine, message)

    llm._client._route = counting_route
    return count


def test_outputs_come_in_input_order_with_prompts_and_token_ids(llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Hello"]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    tokenizer = llm.get_tokenizer()
    for output in outputs:
        assert output.prompt_token_ids == tokenizer.encode(output.prompt)
        (choice,) = output.outputs
        assert choice.index == 0 and choice.finish_reason == "length" and len(choice.token_ids) == 12
        assert choice.text == tokenizer.decode(choice.token_ids)
        assert output.metrics.finished_time >= output.metrics.first_token_time >= output.metrics.arrival_time
    assert "Paris" in outputs[0].outputs[0].text
    assert outputs[1].outputs[0].text.startswith(" 5, 6")


def test_token_id_prompts_and_one_sampling_params_per_prompt(llm):
    ids = llm.get_tokenizer().encode("The capital of France is")
    by_text, by_ids, short = llm.generate(
        ["The capital of France is", ids, {"prompt_token_ids": ids}],
        [GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=3)], use_tqdm=False)[:3]
    assert by_ids.prompt_token_ids == ids and by_ids.outputs[0].text == by_text.outputs[0].text
    assert len(short.outputs[0].token_ids) == 3 and by_text.outputs[0].text.startswith(short.outputs[0].text)
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])


def test_one_call_of_64_prompts_takes_fewer_engine_steps_than_64_calls(llm):
    prompts = [f"Count from {i}:" for i in range(64)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    steps = _count_engine_steps(llm)
    batched = llm.generate(prompts, params, use_tqdm=False)
    num_batched_steps = steps[0]
    one_by_one = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    num_single_steps = steps[0] - num_batched_steps
    assert num_batched_steps < num_single_steps / 4
    assert [o.outputs[0].text for o in batched] == [o.outputs[0].text for o in one_by_one]


def test_n_best_of_and_seed(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    first, again = llm.generate(["Tell me a story.", "Tell me a story."], params, use_tqdm=False)
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]  # a seed reproduces in a batch
    assert len({c.text for c in first.outputs}) > 1
    (best,) = llm.generate("Tell me a story.", SamplingParams(n=1, best_of=3, seed=7, max_tokens=8),
                           use_tqdm=False)[0].outputs
    assert best.text in {c.text for c in first.outputs}  # the best of the same three candidates


def test_stop_strings_end_the_text_before_them(llm):
    (choice,) = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=30, stop=[" 7"]),
                             use_tqdm=False)[0].outputs
    assert choice.text == " 5, 6," and choice.finish_reason == "stop" and choice.stop_reason == " 7"
    (kept,) = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=30, stop=[" 7"],
                                                          include_stop_str_in_output=True), use_tqdm=False)[0].outputs
    assert kept.text == " 5, 6, 7"


def test_logprobs_and_prompt_logprobs(llm):
    (output,) = llm.generate("The capital of France is",
                             SamplingParams(temperature=0, max_tokens=5, logprobs=2, prompt_logprobs=1), use_tqdm=False)
    choice = output.outputs[0]
    assert len(choice.logprobs) == len(choice.token_ids) == 5
    for token_id, position in zip(choice.token_ids, choice.logprobs):
        assert position[token_id].rank == 1  # greedy: the chosen token is the most likely one
        assert 2 <= len(position) <= 3 and all(p.logprob <= 0 for p in position.values())
    assert choice.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(choice.token_ids, choice.logprobs)))
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(output.prompt_token_ids)
    assert output.prompt_token_ids[1] in output.prompt_logprobs[1]
    (plain,) = llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_beam_search(llm):
    (result,) = llm.beam_search(["The capital of France is"], BeamSearchParams(beam_width=3, max_tokens=6))
    assert len(result.sequences) == 3
    assert len({tuple(s.tokens) for s in result.sequences}) == 3
    prompt_ids = llm.get_tokenizer().encode("The capital of France is")
    assert all(s.tokens[:len(prompt_ids)] == prompt_ids for s in result.sequences)
    (same,) = llm.generate("The capital of France is", SamplingParams(n=3, use_beam_search=True, max_tokens=6),
                           use_tqdm=False)
    assert [c.text for c in same.outputs] == [s.text for s in result.sequences]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=3), "temperature must be in [0, 2], got 3.0."),
    (dict(n=2, best_of=1), "best_of must be at least n (2), got 1."),
    (dict(top_p=0), "top_p must be in (0, 1], got 0.0."),
    (dict(stop=[""]), "stop cannot contain an empty string."),
])
def test_invalid_sampling_params_raise_the_servers_message(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


def test_limits_of_the_model_raise_value_errors_when_generating(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate("Hi", SamplingParams(max_tokens=10**6), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias: 999999999 is not a token id"):
        llm.generate("Hi", SamplingParams(logit_bias={999999999: 1.0}), use_tqdm=False)
    assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_chat_renders_the_template_with_its_options(llm):
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    (output,) = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert "Paris" in output.outputs[0].text
    assert output.prompt.endswith("<|im_start|>assistant\n")
    both = llm.chat([conversation, conversation], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert [o.outputs[0].text for o in both] == [output.outputs[0].text] * 2
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}{% if tools %}TOOLS{% endif %}"
    (custom,) = llm.chat(conversation, SamplingParams(max_tokens=1), use_tqdm=False, chat_template=template,
                         tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert custom.prompt == "[user] What is the capital of France?TOOLS"
    (no_prompt,) = llm.chat(conversation, SamplingParams(max_tokens=1), use_tqdm=False, add_generation_prompt=False)
    assert not no_prompt.prompt.endswith("assistant\n")


def test_two_instances_in_one_process(llm):
    with LLM(kv_cache_gib=0.25) as other:
        assert other.engine_pid != llm.engine_pid
        prompts = ["The capital of France is", "Hello"]
        assert ([o.outputs[0].text for o in other.generate(prompts, GREEDY, use_tqdm=False)]
                == [o.outputs[0].text for o in llm.generate(prompts, GREEDY, use_tqdm=False)])
    assert not _process_exists(other.engine_pid)
    assert llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].text


def test_close_stops_the_engine_and_is_idempotent():
    llm = LLM(kv_cache_gib=0.25)
    pid = llm.engine_pid
    assert _process_exists(pid)
    llm.close()
    assert not _process_exists(pid)
    llm.close()


def test_the_engine_is_gone_after_the_interpreter_exits_without_close():
    script = textwrap.dedent("""
        from furiosa_llm import LLM
        llm = LLM(kv_cache_gib=0.25)
        print(llm.engine_pid, flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    pid = int(result.stdout.split()[-1])
    assert not _process_exists(pid)


def test_garbage_collection_stops_the_engine():
    llm = LLM(kv_cache_gib=0.25)
    pid = llm.engine_pid
    del llm  # no reference cycles: CPython frees it here
    assert not _process_exists(pid)


def test_start_up_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope.gguf"))
    with pytest.raises(TypeError, match="no_such_setting"):
        LLM(no_such_setting=1)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="broken.gguf: not a readable GGUF file"):  # the tokenizer's check
        LLM(str(bad))
    template = tmp_path / "bad.jinja"
    template.write_text("{% if %}")
    with pytest.raises(ValueError, match="invalid chat template"):
        LLM(chat_template=str(template), kv_cache_gib=0.25)
    with pytest.raises(RuntimeError, match="could not start: .*--max-model-len 10000000"):  # the engine's own one line
        LLM(max_model_len=10**7, kv_cache_gib=0.25)


def test_async_llm_streams_partial_outputs_that_end_in_the_full_one(llm):
    import asyncio

    from furiosa_llm import AsyncLLM

    async_llm = AsyncLLM.__new__(AsyncLLM)
    async_llm.llm = llm  # the module's engine, not a third one

    async def collect(params):
        return [output async for output in async_llm.generate("1, 2, 3, 4,", params)]

    params = SamplingParams(temperature=0, max_tokens=8)
    partial = asyncio.run(collect(params))
    full = llm.generate("1, 2, 3, 4,", params, use_tqdm=False)[0]
    assert len(partial) > 1 and not partial[0].finished and partial[-1].finished
    assert partial[-1].outputs[0].text == full.outputs[0].text
    assert all(full.outputs[0].text.startswith(p.outputs[0].text) for p in partial)
    with pytest.raises(ValueError, match="maximum context length"):
        asyncio.run(collect(SamplingParams(max_tokens=10**6)))


def test_calls_without_sampling_params_use_the_generation_config(tmp_path):
    """As vLLM's LLM.get_default_sampling_params: the model's sampling defaults over SamplingParams()."""
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.0, "top_k": 20, "max_length": 99}')
    with LLM(kv_cache_gib=0.25, generation_config=str(tmp_path)) as greedy_llm:
        assert greedy_llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_k=20)
        prompt = "The capital of France is"
        reference = greedy_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        outputs = [greedy_llm.generate(prompt, use_tqdm=False)[0] for _ in range(2)]
        chat = greedy_llm.chat([{"role": "user", "content": "Say hi."}], use_tqdm=False)[0]
        chat_reference = greedy_llm.chat([{"role": "user", "content": "Say hi."}],
                                         SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    texts = [o.outputs[0].text for o in outputs]
    assert texts == [reference[0].outputs[0].text] * 2
    assert chat.outputs[0].text == chat_reference.outputs[0].text
    with pytest.raises(ValueError, match="generation_config 'greedy': not 'auto', 'vllm' or a directory"):
        LLM(generation_config="greedy")


def test_without_a_generation_config_the_defaults_are_vllms(llm):
    # the default model's GGUF carries no general.sampling.* keys
    assert llm.get_default_sampling_params() == SamplingParams()
