"""Sampling as vLLM V1 defines it, on crafted logits; then the engine's stop conditions, prompt
scoring and aborts on a tiny random Llama (a few milliseconds per request)."""

from __future__ import annotations

import numpy as np
import pytest

from engine_core.request import Request, Sequence
from engine_core.sampler import Sampler, log_softmax
from ipc.messages import EngineCoreRequest, FinishCause, FinishReason, SamplingParams
from engine_helpers import assert_all_blocks_free, collect, tiny_core, tiny_request, write_tiny_model

# ------------------------------------------------------------------ the sampler on crafted logits

# Ten token probabilities, placed at shuffled ids so that a sampler confusing candidate positions
# with token ids draws the wrong tokens.
PROBS = np.array([0.30, 0.20, 0.15, 0.12, 0.08, 0.06, 0.04, 0.03, 0.015, 0.005])
IDS_BY_RANK = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4]  # IDS_BY_RANK[r]: the token with the r-th largest prob
LOGITS = np.zeros(10, dtype=np.float32)
LOGITS[IDS_BY_RANK] = np.log(PROBS) + 3.0  # a shift changes nothing
EOS = 7


def sequence(params: SamplingParams, prompt=(1,), output=(), eos=(EOS,)) -> Sequence:
    request = Request(EngineCoreRequest("r", list(prompt), params, list(eos), 0.0), vocab_size=len(LOGITS))
    seq = request.sequences[0]
    seq.token_ids.extend(output)
    return seq


def draw_counts(num_draws: int = 4000, logits: np.ndarray = LOGITS, **params) -> np.ndarray:
    """How often each token id is drawn by one seeded sequence, num_draws times."""
    seq = sequence(SamplingParams(max_tokens=1, seed=7, **params))
    sampler = Sampler()
    counts = np.zeros(len(logits), dtype=np.int64)
    for _ in range(num_draws):
        (token,) = sampler.sample(logits[None, :], [seq], [False])
        counts[token.token_id] += 1
    return counts


def assert_draws_follow(counts: np.ndarray, kept_ranks: int, probs: np.ndarray = PROBS) -> None:
    """Exactly the `kept_ranks` most likely tokens are drawn, in proportion to their probs."""
    kept = IDS_BY_RANK[:kept_ranks]
    assert set(np.flatnonzero(counts).tolist()) == set(kept)
    expected = probs[:kept_ranks] / probs[:kept_ranks].sum()
    frequencies = counts[kept] / counts.sum()
    np.testing.assert_allclose(frequencies, expected, atol=0.03)  # ~4 standard errors at 4000 draws


def test_temperature_one_draws_the_whole_distribution():
    counts = draw_counts(8000)
    assert set(np.flatnonzero(counts).tolist()) >= set(IDS_BY_RANK[:8])  # all but the rarest two surely
    np.testing.assert_allclose(counts[IDS_BY_RANK] / counts.sum(), PROBS, atol=0.02)


@pytest.mark.parametrize(
    ("params", "kept_ranks"),
    [
        ({"top_k": 3}, 3),
        ({"top_k": 1}, 1),
        # top_p keeps every token whose more likely tokens hold less than top_p of the mass:
        # cumulative 0.30, 0.50, 0.65 (< 0.7: the 4th is kept), 0.77 (the 5th is not)
        ({"top_p": 0.7}, 4),
        ({"top_p": 0.05}, 1),
        # min_p keeps tokens with prob >= min_p x the top prob: 0.25 x 0.30 = 0.075 keeps 0.08
        ({"min_p": 0.25}, 5),
        # top_p applies to the top-k renormalized distribution: 0.39, 0.26, 0.195, 0.156;
        # cumulative 0.39, 0.65 >= 0.6 drops the 3rd (top_p alone would keep 3)
        ({"top_k": 4, "top_p": 0.6}, 2),
        # vLLM V1 applies min_p first, then top_p to what min_p kept (0.353, 0.235, 0.176, ...):
        # cumulative 0.765 >= 0.7 drops the 4th, which top_p alone keeps
        ({"min_p": 0.25, "top_p": 0.7}, 3),
    ],
)
def test_filters_keep_exactly_the_right_candidates(params, kept_ranks):
    assert_draws_follow(draw_counts(**params), kept_ranks)


def test_min_p_applies_after_temperature():
    """At temperature 2 the probs flatten to sqrt(p): 0.45 x top keeps five tokens, not three."""
    assert set(np.flatnonzero(draw_counts(1000, min_p=0.45)).tolist()) == set(IDS_BY_RANK[:3])
    flat = np.sqrt(PROBS)
    assert_draws_follow(draw_counts(min_p=0.45, temperature=2.0), 5, flat / flat.sum())


def test_temperature_sharpens_and_flattens():
    cold = draw_counts(2000, temperature=0.25)
    hot = draw_counts(2000, temperature=4.0)
    top = IDS_BY_RANK[0]
    assert cold[top] / 2000 > 0.7 > 0.3 > hot[top] / 2000
    sharpened = PROBS**4 / (PROBS**4).sum()
    np.testing.assert_allclose(cold[IDS_BY_RANK[:3]] / 2000, sharpened[:3], atol=0.03)


def test_temperature_zero_is_argmax_on_both_paths():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 50)).astype(np.float32)
    plain = [sequence(SamplingParams(max_tokens=1, temperature=0.0)) for _ in range(16)]
    # asking for logprobs (or any penalty) takes the row-by-row path instead of the vectorized one
    with_logprobs = [sequence(SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, seed=i)) for i in range(16)]
    sampler = Sampler(seed=123)
    expected = np.argmax(logits, axis=-1).tolist()
    assert [t.token_id for t in sampler.sample(logits, plain, [False] * 16)] == expected
    assert [t.token_id for t in sampler.sample(logits, with_logprobs, [False] * 16)] == expected
    assert [t.token_id for t in sampler.sample(logits, plain, [True] * 16)] == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    raw = np.array([2.0, -2.0, 1.0, -1.0, 0.5, 3.0], dtype=np.float32)
    # prompt tokens 0 and 1, output tokens 2 (twice) and 3: all four are "seen"; 4 and 5 are not
    seq = sequence(SamplingParams(max_tokens=8, repetition_penalty=2.0), prompt=(0, 1), output=(2, 3, 2))
    processed = Sampler.process_logits(raw, seq)
    np.testing.assert_allclose(processed, [1.0, -4.0, 0.5, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(raw, [2.0, -2.0, 1.0, -1.0, 0.5, 3.0])  # the raw logits are untouched


def test_a_vanishing_repetition_penalty_still_samples_a_seen_token_and_no_nan():
    """The API allows any penalty above 0; 1e-300 would divide float32 logits to inf (and the
    softmax to NaN, which drew the last token of the vocabulary). It acts as 1e-4 instead."""
    raw = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    seq = sequence(SamplingParams(max_tokens=8, repetition_penalty=1e-300, seed=3), prompt=(2,))
    processed = Sampler.process_logits(raw, seq)
    assert np.isfinite(processed).all()
    np.testing.assert_allclose(processed, [2.0, -2.0, 1e4, 0.5])
    tokens = {Sampler().sample(raw[None, :], [seq], [False])[0].token_id for _ in range(20)}
    assert tokens == {2}


def test_logit_bias_is_added_before_penalties_and_moves_greedy_and_sampled_choices():
    raw = np.array([0.0, 5.0, 4.0, 1.0], dtype=np.float32)
    seq = sequence(SamplingParams(max_tokens=8, temperature=0.0, logit_bias={3: 10.0, 1: -100.0},
                                  repetition_penalty=2.0), prompt=(3,))
    # token 3: (1 + 10) / 2 (seen, so penalized after the bias); token 1: 5 - 100
    np.testing.assert_allclose(Sampler.process_logits(raw, seq), [0.0, -95.0, 4.0, 5.5])
    (token,) = Sampler().sample(raw[None, :], [seq], [False])  # not the vectorized greedy path
    assert token.token_id == 3
    banned = draw_counts(2000, logit_bias={IDS_BY_RANK[0]: -100.0, IDS_BY_RANK[1]: -100.0})
    assert counts_of(banned, IDS_BY_RANK[:2]) == 0 and banned.sum() == 2000
    forced = draw_counts(200, logit_bias={IDS_BY_RANK[9]: 100.0})
    assert forced[IDS_BY_RANK[9]] == 200


def counts_of(counts: np.ndarray, ids: list[int]) -> int:
    return int(counts[ids].sum())


def test_frequency_and_presence_penalties_count_output_tokens_only():
    raw = np.zeros(6, dtype=np.float32)
    seq = sequence(SamplingParams(max_tokens=8, frequency_penalty=0.5, presence_penalty=0.25),
                   prompt=(0, 1, 1), output=(2, 3, 3, 3, 1))
    processed = Sampler.process_logits(raw, seq)
    # token 1: once in the output (its two prompt occurrences do not count)
    np.testing.assert_allclose(processed, [0.0, -0.75, -0.75, -1.75, 0.0, 0.0])
    negative = sequence(SamplingParams(max_tokens=8, frequency_penalty=-1.0, presence_penalty=-0.5), output=(4, 4))
    np.testing.assert_allclose(Sampler.process_logits(raw, negative), [0, 0, 0, 0, 2.5, 0])


def test_penalties_change_the_greedy_choice():
    raw = np.array([0.0, 5.0, 4.0, 1.0], dtype=np.float32)
    repeated = sequence(SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=2.0), output=(1,))
    (token,) = Sampler().sample(raw[None, :], [repeated], [False])
    assert token.token_id == 2  # 5 - 2 < 4


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached():
    raw = np.arange(10, dtype=np.float32)
    params = SamplingParams(max_tokens=20, min_tokens=3, stop_token_ids=[9, 5])
    for num_output in range(5):
        seq = sequence(params, output=[0] * num_output, eos=(8, 6))
        processed = Sampler.process_logits(raw, seq)
        suppressed = np.flatnonzero(np.isneginf(processed)).tolist()
        assert suppressed == ([5, 6, 8, 9] if num_output < 3 else []), num_output
    # ignore_eos: EOS is an ordinary token, but stop token ids still wait for min_tokens
    ignoring = sequence(SamplingParams(max_tokens=20, min_tokens=3, stop_token_ids=[9], ignore_eos=True), eos=(8,))
    assert np.flatnonzero(np.isneginf(Sampler.process_logits(raw, ignoring))).tolist() == [9]
    greedy = sequence(SamplingParams(max_tokens=20, min_tokens=1, temperature=0.0), eos=(9,))
    (token,) = Sampler().sample(raw[None, :], [greedy], [False])
    assert token.token_id == 8


def test_logprobs_are_raw_ranked_and_sorted():
    """Logprobs describe the model's distribution, before penalties and temperature (vLLM's
    default raw_logprobs), even when those made the sampler choose another token."""
    raw = np.array([1.0, 3.0, 2.5, -1.0, 0.0], dtype=np.float32)
    seq = sequence(SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=4.0, logprobs=3),
                   prompt=(1,))
    (token,) = Sampler().sample(raw[None, :], [seq], [False])
    expected = log_softmax(raw.astype(np.float64))
    assert token.token_id == 2  # 3.0 / 4 < 2.5
    lp = token.logprobs
    assert lp.token_id == 2 and lp.rank == 2
    np.testing.assert_allclose(lp.logprob, expected[2], rtol=1e-6)
    assert lp.top_token_ids == [1, 2, 0]
    np.testing.assert_allclose(lp.top_logprobs, expected[[1, 2, 0]], rtol=1e-6)
    assert token.logprob == pytest.approx(lp.logprob)
    last = sequence(SamplingParams(max_tokens=4, temperature=0.0, logprobs=0, stop_token_ids=[1, 2, 0, 4],
                                   min_tokens=1), eos=())
    (token,) = Sampler().sample(raw[None, :], [last], [False])
    assert token.token_id == 3 and token.logprobs.rank == 5
    assert token.logprobs.top_token_ids == [] and token.logprobs.top_logprobs == []


def test_a_seed_reproduces_its_draws_whatever_the_sampler_or_batch():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 40)).astype(np.float32)

    def draws(seed, sampler_seed, batch_rows):
        seqs = [sequence(SamplingParams(max_tokens=1, seed=seed, temperature=1.0))]
        seqs += [sequence(SamplingParams(max_tokens=1, temperature=1.0)) for _ in range(batch_rows)]
        sampler = Sampler(seed=sampler_seed)
        return [sampler.sample(logits[: len(seqs)], seqs, [False] * len(seqs))[0].token_id for _ in range(60)]

    reference = draws(5, 0, 0)
    assert draws(5, 99, 2) == reference
    assert draws(6, 0, 0) != reference
    assert len(set(reference)) > 5  # really sampling, not a constant


@pytest.mark.parametrize("params", [{"top_k": 2}, {"top_p": 0.5}, {"top_k": 4, "top_p": 0.9}])
def test_a_seeded_draw_does_not_flip_when_two_near_equal_logits_swap_order(params):
    """Two computations of the same row differ in the last bits (another batch shape, a cached
    prefix, another CPU's BLAS kernel); where that swaps two near-equal logits, the same seed
    still draws the same token."""
    row = np.full(50, -4.0, dtype=np.float32)
    row[[11, 37]] = 2.0
    row[37] += 1e-6
    swapped = row.copy()
    swapped[[11, 37]] = row[[37, 11]]

    def draws(logits):
        seq = sequence(SamplingParams(max_tokens=1, seed=2, temperature=1.0, **params))
        sampler = Sampler()
        return [sampler.sample(logits[None, :].copy(), [seq], [False])[0].token_id for _ in range(200)]

    reference = draws(row)
    assert set(reference) == {11, 37}
    assert draws(swapped) == reference


def test_an_unseeded_request_follows_the_samplers_generator():
    def draws(sampler_seed):
        sampler, seq = Sampler(seed=sampler_seed), sequence(SamplingParams(max_tokens=1))
        return [sampler.sample(LOGITS[None, :], [seq], [False])[0].token_id for _ in range(60)]

    assert draws(3) == draws(3) != draws(4)


# ------------------------------------------------------------------ stop conditions in the engine

PROMPT = [0, 5, 77, 120, 255, 256, 3, 42]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # the llama3 variant: its greedy continuations vary (the tied one repeats its last token)
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama3", "llama3")


@pytest.fixture(scope="module")
def greedy_reference(model_dir) -> list[int]:
    """The first 12 greedy tokens after PROMPT with no EOS at all."""
    core = tiny_core(model_dir)
    core.add_request(tiny_request("ref", PROMPT, temperature=0.0, max_tokens=12, eos_token_ids=[]))
    tokens = [t for o in collect(core) for t in o.new_token_ids]
    assert len(tokens) == 12
    assert len(set(tokens[:5])) == 5, "the tests below need five distinct leading tokens"
    return tokens


def finish(model_dir, **params) -> tuple[list[int], object, object]:
    """Run one request alone: its tokens, its final output and the engine (for block checks)."""
    core = tiny_core(model_dir)
    core.add_request(tiny_request("r", PROMPT, temperature=0.0, **params))
    outputs = collect(core)
    assert [o.finish_reason is not None for o in outputs].count(True) == 1
    assert outputs[-1].finish_reason is not None
    return [t for o in outputs for t in o.new_token_ids], outputs[-1], core


def test_stop_token_id_ends_the_request_and_is_reported(model_dir, greedy_reference):
    stop = greedy_reference[3]
    tokens, final, core = finish(model_dir, max_tokens=12, eos_token_ids=[], stop_token_ids=[999, stop])
    assert tokens == greedy_reference[:4]
    assert final.finish_reason == FinishReason.STOP and final.stop_reason == stop
    assert final.num_generated_tokens == 4
    assert_all_blocks_free(core)


def test_max_tokens_ends_with_length(model_dir, greedy_reference):
    tokens, final, core = finish(model_dir, max_tokens=5, eos_token_ids=[])
    assert tokens == greedy_reference[:5]
    assert final.finish_reason == FinishReason.LENGTH and final.stop_reason is None
    assert_all_blocks_free(core)


def test_eos_ends_with_stop_and_the_eos_token_in_the_output(model_dir, greedy_reference):
    eos = greedy_reference[2]
    tokens, final, core = finish(model_dir, max_tokens=12, eos_token_ids=[eos, 299])
    assert tokens == greedy_reference[:3] and tokens[-1] == eos
    assert final.finish_reason == FinishReason.STOP and final.stop_reason is None
    assert_all_blocks_free(core)


def test_ignore_eos_generates_past_eos(model_dir, greedy_reference):
    eos = greedy_reference[2]
    tokens, final, _ = finish(model_dir, max_tokens=8, eos_token_ids=[eos], ignore_eos=True)
    assert tokens == greedy_reference[:8]
    assert final.finish_reason == FinishReason.LENGTH


def test_min_tokens_holds_back_eos_and_stop_ids_until_reached(model_dir, greedy_reference):
    first, second = greedy_reference[:2]
    # without min_tokens the first token would end the request
    tokens, final, _ = finish(model_dir, max_tokens=12, eos_token_ids=[first], stop_token_ids=[second], min_tokens=4)
    assert len(tokens) >= 4
    assert first not in tokens[:4] and second not in tokens[:4]
    if final.finish_reason == FinishReason.STOP:
        assert tokens[-1] in (first, second) and len(tokens) >= 5
    else:
        assert final.finish_reason == FinishReason.LENGTH and len(tokens) == 12
    # min_tokens does not delay an EOS that comes after it
    tokens, final, _ = finish(model_dir, max_tokens=12, eos_token_ids=[greedy_reference[4]], min_tokens=2)
    assert tokens == greedy_reference[:5] and final.finish_reason == FinishReason.STOP


def test_each_final_output_says_which_condition_ended_it(model_dir, greedy_reference):
    first, second, third = greedy_reference[:3]
    cases = [  # (params, cause, stop_reason)
        (dict(eos_token_ids=[third]), FinishCause.EOS, None),
        (dict(eos_token_ids=[], stop_token_ids=[second]), FinishCause.STOP_TOKEN, second),
        (dict(eos_token_ids=[second], stop_token_ids=[second]), FinishCause.EOS, None),  # EOS first
        (dict(eos_token_ids=[second], ignore_eos=True, stop_token_ids=[third]), FinishCause.STOP_TOKEN, third),
        (dict(eos_token_ids=[first], min_tokens=12), FinishCause.LENGTH, None),
        (dict(eos_token_ids=[]), FinishCause.LENGTH, None),
    ]
    for params, cause, stop_reason in cases:
        _, final, _ = finish(model_dir, max_tokens=12, **params)
        assert (final.finish_cause, final.stop_reason) == (cause, stop_reason), params
        assert final.finish_reason == cause.finish_reason
    core = tiny_core(model_dir, max_model_len=len(PROMPT) + 2)
    core.add_request(tiny_request("context", PROMPT, max_tokens=12, eos_token_ids=[]))
    core.add_request(tiny_request("too-long", PROMPT * 2, eos_token_ids=[]))
    core.add_request(tiny_request("aborted", PROMPT, max_tokens=12, eos_token_ids=[]))
    core.abort_requests(["aborted"])
    outputs = collect(core)
    finals = {o.request_id: o for o in outputs if o.finish_reason is not None}
    assert finals["context"].finish_cause == FinishCause.LENGTH
    assert finals["too-long"].finish_cause == FinishCause.ERROR and "context" in finals["too-long"].error
    assert finals["aborted"].finish_cause == FinishCause.ABORT
    assert [o.finish_cause for o in outputs if o.finish_reason is None] == [None]  # context's first token


def test_prompt_scoring_with_max_tokens_zero(model_dir):
    core = tiny_core(model_dir)
    core.add_request(tiny_request("score", PROMPT, max_tokens=0, prompt_logprobs=0))
    core.add_request(tiny_request("score2", PROMPT[:3], max_tokens=0, prompt_logprobs=2))
    outputs = {o.request_id: o for o in collect(core)}
    score = outputs["score"]
    assert score.new_token_ids == [] and score.finish_reason == FinishReason.LENGTH
    assert score.prompt_logprobs[0] is None and len(score.prompt_logprobs) == len(PROMPT)
    assert [lp.token_id for lp in score.prompt_logprobs[1:]] == PROMPT[1:]
    assert all(lp.logprob < 0 and lp.rank >= 1 and lp.top_token_ids == [] for lp in score.prompt_logprobs[1:])
    short = outputs["score2"].prompt_logprobs
    assert [lp.token_id for lp in short[1:]] == PROMPT[1:3] and all(len(lp.top_token_ids) == 2 for lp in short[1:])
    # the same prompt prefix scores the same whatever comes after it
    for a, b in zip(score.prompt_logprobs[1:3], short[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.rank == b.rank
    assert_all_blocks_free(core)


def test_prompt_logprobs_are_the_same_with_chunked_prefill(model_dir):
    prompt = np.random.default_rng(5).integers(4, 300, size=45).tolist()
    results = []
    for budget in (2048, 6):
        core = tiny_core(model_dir, max_num_batched_tokens=budget)
        core.add_request(tiny_request("a", prompt, temperature=0.0, max_tokens=4, eos_token_ids=[],
                                      prompt_logprobs=3, logprobs=1))
        outputs = collect(core)
        assert len(outputs) == 4  # one per token; nothing while the prompt is prefilled
        results.append(outputs)
        assert_all_blocks_free(core)
    (whole, chunked) = results
    first_whole, first_chunked = whole[0].prompt_logprobs, chunked[0].prompt_logprobs
    assert len(first_whole) == len(first_chunked) == len(prompt)
    for a, b in zip(first_whole[1:], first_chunked[1:]):
        assert (a.token_id, a.rank, a.top_token_ids) == (b.token_id, b.rank, b.top_token_ids)
        np.testing.assert_allclose([a.logprob, *a.top_logprobs], [b.logprob, *b.top_logprobs], atol=1e-5)
    assert [o.new_token_ids for o in whole] == [o.new_token_ids for o in chunked]
    assert all(o.prompt_logprobs is None for o in whole[1:] + chunked[1:])  # sent once


def test_abort_is_idempotent_and_frees_blocks(model_dir):
    core = tiny_core(model_dir, max_num_seqs=2)
    for request_id in ("a", "b", "waiting"):
        core.add_request(tiny_request(request_id, PROMPT * 5, max_tokens=50, eos_token_ids=[]))
    core.step()
    core.step()
    assert core.kv.pool.num_free < core.kv.pool.num_blocks and len(core.scheduler.waiting) == 1
    core.abort_requests(["a", "waiting", "unknown"])
    core.abort_requests(["a"])
    core.abort_requests(["waiting"], indices=[0])
    outputs = core.step()
    aborted = [o for o in outputs if o.finish_reason == FinishReason.ABORT]
    assert sorted(o.request_id for o in aborted) == ["a", "waiting"]
    assert [o.new_token_ids for o in aborted if o.request_id == "waiting"] == [[]]
    rest = outputs + collect(core)
    assert [o.finish_reason for o in rest if o.request_id == "b" and o.finish_reason] == [FinishReason.LENGTH]
    core.abort_requests(["a", "b", "waiting"])  # all finished: nothing happens
    assert core.step() == []
    assert_all_blocks_free(core)


def test_logit_bias_steers_sampling_and_beam_search_in_the_engine(model_dir, greedy_reference):
    banned = greedy_reference[0]
    core = tiny_core(model_dir)
    core.add_request(tiny_request("forced", PROMPT, temperature=0.0, max_tokens=5, logit_bias={77: 100.0}))
    core.add_request(tiny_request("banned", PROMPT, temperature=0.0, max_tokens=1, logit_bias={banned: -100.0}))
    core.add_request(tiny_request("beams", PROMPT, use_beam_search=True, n=2, max_tokens=4, ignore_eos=True,
                                  logit_bias={120: 100.0}))
    outputs = collect(core)
    tokens = {}
    for out in outputs:
        tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
    assert tokens["forced", 0] == [77] * 5
    assert tokens["banned", 0] != [banned]
    assert tokens["beams", 0] == [120] * 4  # the best hypothesis follows the bias at every step
