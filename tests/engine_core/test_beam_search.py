"""Beam search equals Hugging Face transformers' `generate(num_beams=...)`, and its beams share
KV blocks instead of copying them.

The golden file comes from scripts/make_golden.py (transformers 5.24.0 + torch, fp32, the same
GGUF). Our log-probabilities differ from torch's by ~2e-5 relative; the closest pair of returned
scores in the file differs by 2.4e-3 relative, so no returned ranking there is a near tie, and
sequences and their order are compared exactly (scores with a tolerance).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from engine_core.beam_search import BeamSearch
from engine_helpers import assert_all_blocks_free, collect, request, run_to_completion
from engine_helpers import tiny_core, tiny_request, write_tiny_model  # the tiny random model
from ipc.messages import FinishCause, FinishReason

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "smollm2_beam.json").read_text())
BLOCK_BYTES = 737_280  # 2 * 30 layers * 3 kv heads * 16 tokens * 64 dims * 4 bytes


def beam_request(request_id: str, case: dict, n: int | None = None):
    p = case["params"]
    return request(request_id, case["prompt_token_ids"], use_beam_search=True, n=n or p["num_return_sequences"],
                   best_of=p["num_beams"], length_penalty=p["length_penalty"],
                   early_stopping=p["early_stopping"], max_tokens=p["max_new_tokens"])


def final_outputs(core) -> dict[str, dict[int, object]]:
    outputs: dict[str, dict[int, object]] = {}
    for _ in range(5000):
        if not core.has_unfinished_requests:
            return outputs
        for out in core.step():
            assert out.finish_reason is not None, "beam search reports each hypothesis once, finished"
            assert out.index not in outputs.setdefault(out.request_id, {})
            outputs[out.request_id][out.index] = out
    raise AssertionError("the engine did not finish its requests")


def assert_matches_golden(case: dict, outs: dict[int, object], n: int | None = None) -> None:
    expected = case["sequences"][:n]
    assert sorted(outs) == list(range(len(expected)))
    got = [outs[i].new_token_ids for i in range(len(expected))]
    assert got == expected, case["name"]
    lp = case["params"]["length_penalty"]
    scores = [outs[i].cumulative_logprob / len(got[i]) ** lp for i in range(len(got))]
    np.testing.assert_allclose(scores, case["sequences_scores"][:n], rtol=2e-4, err_msg=case["name"])
    np.testing.assert_allclose([outs[i].cumulative_logprob for i in range(len(got))], case["sum_logprobs"][:n],
                               rtol=2e-4, err_msg=case["name"])
    for i, ends_with_eos in enumerate(case["ends_with_eos"][:n]):
        assert outs[i].finish_reason == (FinishReason.STOP if ends_with_eos else FinishReason.LENGTH)


def test_every_golden_case_returns_transformers_sequences_in_order(make_core):
    cases = GOLDEN["cases"]
    assert len(cases) == 48
    core = make_core()
    for i, case in enumerate(cases):  # all 48 searches batched together
        core.add_request(beam_request(str(i), case))
    longer = next(c for c in cases if c["name"] == "raw_list/beams=4/lp=1.0/early=False")
    core.add_request(beam_request("n=2", longer, n=2))  # best_of=4, n=2: the 2 best of the 4
    outputs = final_outputs(core)
    for i, case in enumerate(cases):
        assert_matches_golden(case, outputs[str(i)])
        assert outputs[str(i)][0].num_generated_tokens >= max(len(s) for s in case["sequences"])
    assert_matches_golden(longer, outputs["n=2"], n=2)
    assert_all_blocks_free(core)


@pytest.mark.parametrize("squeeze", ["budget", "blocks"])
def test_beams_scheduled_apart_or_preempted_give_the_same_result(make_core, squeeze):
    """A step's beams need not run in one batch: the search waits for all of their logits."""
    case = next(c for c in GOLDEN["cases"] if c["name"] == "raw_list/beams=4/lp=2.0/early=False")
    if squeeze == "budget":  # 3 tokens a step: beams of one search complete in different steps
        core = make_core(max_num_batched_tokens=3)
    else:  # 6 blocks for 4 beams of up to 32 tokens: beams are preempted and recomputed
        core = make_core(kv_cache_gib=6 * BLOCK_BYTES / 2**30)
    core.add_request(beam_request("a", case))
    assert_matches_golden(case, final_outputs(core)["a"])
    if squeeze == "blocks":
        assert core.scheduler.num_preemptions > 0
    assert_all_blocks_free(core)


def test_beams_share_a_long_prompts_blocks(make_core):
    prompt = np.random.default_rng(5).integers(100, 40_000, size=1000).tolist()
    alone = make_core()
    alone.add_request(request("alone", prompt, temperature=0.0, max_tokens=16))
    run_to_completion(alone)
    beams = make_core()
    beams.add_request(request("beams", prompt, use_beam_search=True, n=4, max_tokens=16, ignore_eos=True))
    while len(beams.requests["beams"].sequences) < 4:
        beams.step()
    first_block = beams.requests["beams"].sequences[0].block_ids[0]
    assert beams.kv.pool.ref_counts[first_block] == 4  # one prompt block, four holders
    outputs = final_outputs(beams)["beams"]
    assert sorted(outputs) == [0, 1, 2, 3] and all(len(o.new_token_ids) == 16 for o in outputs.values())
    peak_alone, peak_beams = alone.kv.pool.peak_num_used, beams.kv.pool.peak_num_used
    assert peak_alone == -(-1016 // 16)
    assert peak_beams < 1.5 * peak_alone, (peak_beams, peak_alone)
    assert_all_blocks_free(alone)
    assert_all_blocks_free(beams)


def test_aborting_a_beam_search_ends_every_choice(make_core):
    core = make_core()
    core.add_request(request("a", [1, 9690, 198, 2683], use_beam_search=True, n=2, best_of=3, max_tokens=20,
                             ignore_eos=True))
    core.add_request(request("b", [1, 9690, 198], use_beam_search=True, n=2, max_tokens=3, logprobs=2))
    outputs = []
    for _ in range(4):
        outputs += core.step()
    assert all(o.request_id != "a" for o in outputs)  # nothing is reported before the end
    core.abort_requests(["a"], indices=[1])  # one index still ends the whole search
    while core.has_unfinished_requests:
        outputs += core.step()
    by_request: dict[str, dict[int, object]] = {}
    for out in outputs:
        assert out.index not in by_request.setdefault(out.request_id, {})
        by_request[out.request_id][out.index] = out
    assert sorted(by_request["a"]) == [0, 1]
    assert all(o.finish_reason == FinishReason.ABORT and o.new_token_ids == [] for o in by_request["a"].values())
    assert sorted(by_request["b"]) == [0, 1]
    for out in by_request["b"].values():  # logprobs follow each hypothesis' own path
        assert [lp.token_id for lp in out.new_logprobs] == out.new_token_ids
        assert sum(lp.logprob for lp in out.new_logprobs) == pytest.approx(out.cumulative_logprob, abs=1e-4)
        assert all(len(lp.top_token_ids) == 2 for lp in out.new_logprobs)
    assert_all_blocks_free(core)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_beams_that_cannot_all_fit_at_once_take_turns_and_give_the_same_result(tmp_path, prefix_caching):
    """8 beams of a 60-token prompt and 40 new tokens need about 35 blocks at once; 10 hold one
    beam (7 blocks) at a time. Each beam computes its logits and then waits, preempted, for its siblings
    instead of being recomputed at once (which used to preempt a sibling in turn, forever),
    and a short request sent beside it finishes too."""
    model_dir = write_tiny_model(tmp_path)
    results = {}
    for num_blocks in (64, 10):
        core = tiny_core(model_dir, num_blocks=num_blocks, enable_prefix_caching=prefix_caching)
        core.add_request(tiny_request("beams", list(range(3, 63)), use_beam_search=True, n=8, max_tokens=40,
                                      ignore_eos=True))
        core.add_request(tiny_request("short", [5, 6, 7], max_tokens=3))
        outputs = collect(core, max_steps=2000)  # raises if the requests are not done by then
        beams = {o.index: o for o in outputs if o.request_id == "beams"}
        results[num_blocks] = [beams[i].new_token_ids for i in range(8)]
        assert all(len(tokens) == 40 for tokens in results[num_blocks])
        assert sum(len(o.new_token_ids) for o in outputs if o.request_id == "short") == 3
        assert (core.scheduler.num_preemptions > 0) == (num_blocks == 10)
        assert_all_blocks_free(core)
    assert results[10] == results[64]


# ---------------------------------------------------------------- the search alone, on made-up logprobs

EOS = 0


def rows(*values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def run_search(search: BeamSearch, steps: list[np.ndarray]) -> int:
    """Feed per-step logprobs (one row per live beam) until the search ends; the steps it took."""
    beams = [(0.0, [])]
    for number, step_rows in enumerate(steps, 1):
        result = search.step(step_rows[: len(beams)], [b[0] for b in beams], [b[1] for b in beams])
        if search.is_done:
            return number
        beams = [(c.cumulative_logprob, beams[c.parent][1] + [c.token_id]) for c in result.next_beams]
    raise AssertionError("the search did not end")


EARLY_STOPPING_STEPS = [
    rows([-0.5, -1.0, -1.2, -5, -6]),  # EOS (-0.5/1) finishes; beams [1], [2]
    rows([-0.9, -0.1, -5, -6, -7], [-9, -1.0, -5, -6, -7]),  # [1, EOS] (-1.9/2) finishes: the set is full
    rows([-0.2, -2, -5, -6, -7], [-0.3, -3, -5, -6, -7]),  # [1, 1, EOS] (-1.3/3) beats both
    rows([-10, -10, -10, -10, -10], [-10, -10, -10, -10, -10]),
]


def test_hypotheses_say_which_condition_ended_them(tmp_path):
    core = tiny_core(write_tiny_model(tmp_path))
    every_token = list(range(core.model_config.vocab_size))
    beams = dict(use_beam_search=True, n=2)
    core.add_request(tiny_request("eos", [5, 6, 7], eos_token_ids=every_token, **beams))
    core.add_request(tiny_request("stop", [5, 6, 7], eos_token_ids=every_token, ignore_eos=True,
                                  stop_token_ids=every_token, **beams))
    core.add_request(tiny_request("length", [5, 6, 7], eos_token_ids=[], max_tokens=2, **beams))
    core.add_request(tiny_request("aborted", [5, 6, 7], eos_token_ids=[], **beams))
    core.abort_requests(["aborted"])
    finals = {(o.request_id, o.index): o for o in collect(core)}
    assert len(finals) == 8
    for index in range(2):
        eos, stop, length = finals["eos", index], finals["stop", index], finals["length", index]
        assert (eos.finish_cause, eos.finish_reason, eos.stop_reason) == (FinishCause.EOS, FinishReason.STOP, None)
        assert len(eos.new_token_ids) == 1
        assert (stop.finish_cause, stop.finish_reason) == (FinishCause.STOP_TOKEN, FinishReason.STOP)
        assert stop.stop_reason == stop.new_token_ids[-1]
        assert (length.finish_cause, length.finish_reason) == (FinishCause.LENGTH, FinishReason.LENGTH)
        assert len(length.new_token_ids) == 2
        assert finals["aborted", index].finish_cause == FinishCause.ABORT
    assert_all_blocks_free(core)


@pytest.mark.parametrize(
    "early_stopping, num_steps, best",
    [
        (True, 2, [[EOS], [1, EOS]]),  # stops as soon as `width` hypotheses exist
        (False, 3, [[1, 1, EOS], [EOS]]),  # goes on while the best beam (-1.1/2) beats -0.95
        ("never", 4, [[1, 1, EOS], [EOS]]),  # bound at max length: -3.1/10 still beats -0.5
    ],
)
def test_early_stopping_modes(early_stopping, num_steps, best):
    search = BeamSearch(width=2, length_penalty=1.0, early_stopping=early_stopping,
                        stop_token_ids=frozenset({EOS}), max_new_tokens=10)
    assert run_search(search, EARLY_STOPPING_STEPS) == num_steps
    assert [h.token_ids for h in search.best(2)] == best
    assert all(h.stop_token_id == EOS for h in search.best(2))


def test_length_limit_finalizes_the_top_candidates_and_ends_ranked_low_are_dropped():
    search = BeamSearch(width=2, length_penalty=1.0, early_stopping=False,
                        stop_token_ids=frozenset({EOS}), max_new_tokens=2, min_tokens=1)
    steps = [
        rows([0.0, -1.0, -1.1, -3, -4]),  # min_tokens: EOS (the best) is suppressed; beams [1], [2]
        rows([-0.2, -0.5, -4, -5, -6], [-2, -0.1, -4, -5, -6]),  # the last step: everything ends
    ]
    assert run_search(search, steps) == 2
    # candidates: [1, EOS] -1.2, [2, 1] -1.2, [1, 1] -1.5, ...: only the first two are kept
    assert [h.token_ids for h in search.best(2)] == [[1, EOS], [2, 1]]
    assert [h.stop_token_id for h in search.best(2)] == [EOS, None]
    assert search.best(2)[0].score == pytest.approx(-1.2 / 2)


def test_each_stop_id_widens_the_candidates_kept():
    one = BeamSearch(width=3, length_penalty=1.0, early_stopping=False, stop_token_ids=frozenset({0}),
                     max_new_tokens=5)
    three = BeamSearch(width=3, length_penalty=1.0, early_stopping=False, stop_token_ids=frozenset({0, 7, 9}),
                       max_new_tokens=5)
    assert (one.num_candidates_kept, three.num_candidates_kept) == (6, 12)


def test_scores_with_extreme_length_penalties_do_not_raise():
    from engine_core.beam_search import BeamSearch

    for penalty in (300.0, -300.0):
        search = BeamSearch(width=2, length_penalty=penalty, early_stopping=False, stop_token_ids=frozenset([2]),
                            max_new_tokens=4, min_tokens=0)
        assert search.score(-3.0, 16) <= 0.0 or search.score(-3.0, 16) == float("-inf")
