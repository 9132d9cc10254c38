"""Pooling requests (`--runner pooling`) in an in-process EngineCore on the default model.

The golden vectors come from scripts/make_embedding_golden.py: transformers + PyTorch on the
same GGUF, the final-normed hidden states pooled (last token; mean over the prompt) and
L2-normalized.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest

from engine_helpers import assert_all_blocks_free, collect, request
from ipc.messages import EngineCoreOutput, EngineCoreRequest, FinishCause, FinishReason, PoolingParams, SamplingParams

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "smollm2_embeddings.json").read_text())
CASES = GOLDEN["cases"]
HIDDEN_SIZE = GOLDEN["hidden_size"]


def pooling_request(request_id: str, prompt: list[int], normalize: bool = True) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, list(prompt), SamplingParams(max_tokens=0), [], time.time(),
                             pooling=PoolingParams(normalize=normalize))


def vector(output: EngineCoreOutput) -> np.ndarray:
    assert output.finish_reason == FinishReason.STOP and output.finish_cause == FinishCause.POOLED, output
    assert output.new_token_ids == []
    return np.frombuffer(output.pooled, dtype="<f4")


def embed(core, prompts: dict[str, list[int]]) -> dict[str, np.ndarray]:
    for request_id, prompt in prompts.items():
        core.add_request(pooling_request(request_id, prompt))
    outputs = collect(core)
    assert sorted(o.request_id for o in outputs) == sorted(prompts)  # one final output each
    assert_all_blocks_free(core)
    return {o.request_id: vector(o) for o in outputs}


def prompts_of(count: int) -> dict[str, list[int]]:
    """`count` distinct prompts of various lengths, from the golden cases' token ids."""
    prompts = {}
    for i in range(count):
        ids = CASES[i % len(CASES)]["token_ids"]
        prompts[f"p{i}"] = ids[i // len(CASES):] or ids  # shifted starts make each one distinct
    return prompts


@pytest.mark.parametrize("pooler_type", ["last", "mean"])
def test_vectors_equal_transformers(make_core, pooler_type):
    core = make_core(runner="pooling", pooler_type=pooler_type)
    assert core.ready_message().hidden_size == HIDDEN_SIZE
    got = embed(core, {str(i): case["token_ids"] for i, case in enumerate(CASES)})
    for i, case in enumerate(CASES):
        expected = np.array(case[pooler_type], dtype=np.float32)
        assert got[str(i)].shape == (HIDDEN_SIZE,)
        np.testing.assert_allclose(got[str(i)], expected, atol=1e-4, err_msg=f"{pooler_type} case {i}")
        assert abs(np.linalg.norm(got[str(i)]) - 1.0) < 1e-5


def test_mean_and_last_differ_and_mean_of_one_token_is_last(make_core):
    """Both poolings read the same hidden states: for one token they agree, for more they do not."""
    long_prompt = CASES[-1]["token_ids"]
    last = embed(make_core(runner="pooling", pooler_type="last"), {"one": long_prompt[:1], "long": long_prompt})
    mean = embed(make_core(runner="pooling", pooler_type="mean"), {"one": long_prompt[:1], "long": long_prompt})
    np.testing.assert_allclose(mean["one"], last["one"], atol=1e-6)
    assert float(mean["long"] @ last["long"]) < 0.99


@pytest.mark.parametrize("pooler_type", ["last", "mean"])
def test_a_batch_of_32_equals_32_single_requests(make_core, pooler_type):
    prompts = prompts_of(32)
    core = make_core(runner="pooling", pooler_type=pooler_type)
    for request_id, prompt in prompts.items():
        core.add_request(pooling_request(request_id, prompt))
    first_step = core.step()  # one prefill batch holds them all, and finishes them all
    assert sorted(o.request_id for o in first_step) == sorted(prompts)
    assert_all_blocks_free(core)
    batched = {o.request_id: vector(o) for o in first_step}
    single_core = make_core(runner="pooling", pooler_type=pooler_type)
    for request_id, prompt in prompts.items():
        single = embed(single_core, {request_id: prompt})[request_id]
        np.testing.assert_allclose(batched[request_id], single, atol=2e-6, err_msg=request_id)


@pytest.mark.parametrize("pooler_type", ["last", "mean"])
def test_chunked_prefill_equals_unchunked(make_core, pooler_type):
    prompts = {str(i): case["token_ids"] for i, case in enumerate(CASES)}
    whole = embed(make_core(runner="pooling", pooler_type=pooler_type), prompts)
    core = make_core(runner="pooling", pooler_type=pooler_type, max_num_batched_tokens=16)
    chunked = embed(core, prompts)
    assert core.num_prompt_tokens_computed == sum(map(len, prompts.values()))
    for request_id in prompts:
        np.testing.assert_allclose(chunked[request_id], whole[request_id], atol=2e-6, err_msg=request_id)
        expected = np.array(CASES[int(request_id)][pooler_type], dtype=np.float32)
        np.testing.assert_allclose(chunked[request_id], expected, atol=1e-4)


@pytest.mark.parametrize("pooler_type", ["last", "mean"])
def test_a_cached_prefix_gives_the_same_vector(make_core, pooler_type):
    """Last pooling may start on cached blocks (the last token is still computed); mean pooling
    needs every position's hidden state, so it never does."""
    prompt = CASES[-1]["token_ids"]
    core = make_core(runner="pooling", pooler_type=pooler_type)
    first = embed(core, {"a": prompt})["a"]
    hits_before = core.kv.num_hit_tokens
    again = embed(core, {"b": prompt})["b"]
    hit = core.kv.num_hit_tokens - hits_before
    assert hit == (len(prompt) - 1) // 16 * 16 if pooler_type == "last" else hit == 0
    np.testing.assert_allclose(again, first, atol=2e-6)


def test_unnormalized_vector_is_the_raw_pooled_state(make_core):
    core = make_core(runner="pooling", pooler_type="last")
    prompt = CASES[1]["token_ids"]
    core.add_request(pooling_request("raw", prompt, normalize=False))
    raw = vector(collect(core)[0])
    assert np.linalg.norm(raw) > 2.0  # the final RMSNorm's scale, not 1
    np.testing.assert_allclose(raw / np.linalg.norm(raw), np.array(CASES[1]["last"]), atol=1e-4)


def test_runner_mismatches_are_errors_not_crashes(make_core):
    pooling_core = make_core(runner="pooling")
    pooling_core.add_request(request("gen", [1, 2, 3], max_tokens=4))
    [output] = collect(pooling_core)
    assert output.finish_reason == FinishReason.ERROR and "pooling runner" in output.error
    generate_core = make_core()
    generate_core.add_request(pooling_request("emb", [1, 2, 3]))
    [output] = collect(generate_core)
    assert output.finish_reason == FinishReason.ERROR and "--runner pooling" in output.error
    assert_all_blocks_free(pooling_core)
    assert_all_blocks_free(generate_core)


def test_a_pooled_prompt_may_fill_the_context(make_core):
    core = make_core(runner="pooling", max_model_len=32)
    prompt = (CASES[-1]["token_ids"] * 2)[:32]
    core.add_request(pooling_request("full", prompt))
    core.add_request(pooling_request("over", prompt + [1]))
    outputs = {o.request_id: o for o in collect(core)}
    assert vector(outputs["full"]).shape == (HIDDEN_SIZE,)
    assert outputs["over"].finish_reason == FinishReason.ERROR and "context is 32" in outputs["over"].error


def test_an_aborted_pooling_request_ends_with_abort(make_core):
    core = make_core(runner="pooling", max_num_batched_tokens=16)
    core.add_request(pooling_request("a", CASES[-1]["token_ids"]))
    core.step()  # its first chunk
    core.abort_requests(["a"])
    [output] = collect(core)
    assert output.finish_reason == FinishReason.ABORT and output.pooled is None
    assert_all_blocks_free(core)


def test_unknown_runner_or_pooler_type_is_refused(make_core):
    with pytest.raises(ValueError, match="runner 'embed'"):
        make_core(runner="embed")
    with pytest.raises(ValueError, match="pooler type 'cls'"):
        make_core(runner="pooling", pooler_type="cls")
