"""Continuous batching does not change results: batch invariance, chunked prefill, preemption,
seeded sampling; and every KV block returns to the pool whatever happens to a request."""

from __future__ import annotations

import numpy as np

from engine_helpers import TWO_CANDIDATES, assert_all_blocks_free, request, run_to_completion
from ipc.messages import FinishReason


def random_prompt(rng: np.random.Generator, length: int) -> list[int]:
    return rng.integers(100, 40_000, size=length).tolist()


def test_32_mixed_length_requests_batched_equal_each_alone(make_core):
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng, int(n)) for n in np.linspace(10, 1000, 32)]
    batched = make_core(max_num_batched_tokens=2048)
    for i, prompt in enumerate(prompts):
        batched.add_request(request(str(i), prompt, temperature=0.0, max_tokens=6, ignore_eos=True))
    together = run_to_completion(batched)
    assert_all_blocks_free(batched)
    alone_core = make_core()
    for i, prompt in enumerate(prompts):
        alone_core.add_request(request(str(i), prompt, temperature=0.0, max_tokens=6, ignore_eos=True))
        alone = run_to_completion(alone_core)
        assert alone[str(i)][0] == together[str(i)][0], f"prompt {i} ({len(prompt)} tokens)"


def test_chunked_prefill_equals_one_shot_prefill(make_core):
    prompt = random_prompt(np.random.default_rng(1), 700)
    results = []
    for budget in (2048, 64):
        core = make_core(max_num_batched_tokens=budget)
        core.add_request(request("a", prompt, temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2))
        outputs = []
        while core.has_unfinished_requests:
            outputs += core.step()
        results.append(outputs)
    one_shot, chunked = results
    assert [t for o in one_shot for t in o.new_token_ids] == [t for o in chunked for t in o.new_token_ids]
    lp_one = [lp.logprob for o in one_shot for lp in o.new_logprobs]
    lp_chunked = [lp.logprob for o in chunked for lp in o.new_logprobs]
    np.testing.assert_allclose(lp_one, lp_chunked, atol=1e-4)


def test_chunked_prefill_runs_in_several_steps_alongside_decodes(make_core):
    core = make_core(max_num_batched_tokens=64)
    core.add_request(request("short", [5, 6, 7], temperature=0.0, max_tokens=20, ignore_eos=True))
    core.step()
    core.add_request(request("long", list(range(100, 400)), temperature=0.0, max_tokens=2, ignore_eos=True))
    plan = core.scheduler.schedule()
    sizes = {e.seq.request_id: e.num_tokens for e in plan.entries}
    assert sizes == {"short": 1, "long": 63}


def test_a_run_forced_to_preempt_gives_the_same_tokens(make_core):
    rng = np.random.default_rng(2)
    prompts = [random_prompt(rng, 60 + 7 * i) for i in range(8)]
    outputs = []
    for blocks in (None, 40):
        # bytes per block: 2 * 30 layers * 3 kv heads * 16 tokens * 64 dims * 4 bytes
        gib = 0.25 if blocks is None else blocks * 737_280 / 2**30
        core = make_core(kv_cache_gib=gib)
        for i, prompt in enumerate(prompts):
            core.add_request(request(str(i), prompt, temperature=0.0, max_tokens=30, ignore_eos=True))
        outputs.append(run_to_completion(core))
        assert_all_blocks_free(core)
        if blocks is not None:
            assert core.num_blocks == blocks
            assert core.scheduler.num_preemptions > 0
    assert outputs[0] == outputs[1]


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_in_a_batch(make_core):
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646]
    params = dict(seed=1234, max_tokens=24, ignore_eos=True, **TWO_CANDIDATES)
    alone = make_core()
    alone.add_request(request("seeded", prompt, **params))
    tokens_alone = run_to_completion(alone)["seeded"][0]
    batch = make_core()
    rng = np.random.default_rng(3)
    for i in range(6):
        batch.add_request(request(f"other{i}", random_prompt(rng, 20 + 30 * i), temperature=1.0, max_tokens=30))
    batch.add_request(request("seeded", prompt, **params))
    assert run_to_completion(batch)["seeded"][0] == tokens_alone
    different_seed = make_core()
    different_seed.add_request(request("seeded", prompt, **{**params, "seed": 99}))
    assert run_to_completion(different_seed)["seeded"][0] != tokens_alone


def test_blocks_return_after_finished_aborted_and_preempted_requests(make_core):
    rng = np.random.default_rng(4)
    core = make_core(kv_cache_gib=30 * 737_280 / 2**30)
    for i in range(6):
        core.add_request(request(str(i), random_prompt(rng, 50 + 10 * i), temperature=0.0, max_tokens=40,
                                 ignore_eos=True, n=1 + i % 3))
    finished = {}
    for step in range(2000):
        if step == 5:
            core.abort_requests(["1", "4"])
            core.abort_requests(["1"])  # idempotent
        if step == 9:
            core.abort_requests(["2"], indices=[1])  # one of n sequences
        for out in core.step():
            if out.finish_reason is not None:
                finished[(out.request_id, out.index)] = out.finish_reason
        if not core.has_unfinished_requests:
            break
    assert core.scheduler.num_preemptions > 0
    assert finished[("1", 0)] == FinishReason.ABORT and finished[("4", 0)] == FinishReason.ABORT
    assert finished[("2", 1)] == FinishReason.ABORT and finished[("2", 0)] == FinishReason.LENGTH
    assert len(finished) == sum(1 + i % 3 for i in range(6))
    assert_all_blocks_free(core)


def test_the_context_is_capped_to_what_the_kv_cache_holds_so_no_sequence_outgrows_it(make_core):
    core = make_core(kv_cache_gib=4 * 737_280 / 2**30)  # 64 tokens of cache
    assert core.ready_message().max_model_len == 64
    core.add_request(request("big", list(range(100, 200)), max_tokens=4))
    core.add_request(request("grows", list(range(100, 150)), temperature=0.0, max_tokens=40, ignore_eos=True))
    outputs = []
    while core.has_unfinished_requests:
        outputs += core.step()
    final = {o.request_id: o for o in outputs if o.finish_reason is not None}
    assert final["big"].finish_reason == FinishReason.ERROR and "64" in final["big"].error
    assert final["grows"].finish_reason == FinishReason.LENGTH
    assert sum(len(o.new_token_ids) for o in outputs if o.request_id == "grows") == 64 - 50
    assert_all_blocks_free(core)


def test_without_the_prefix_cache_freed_blocks_are_reused_first(make_core):
    """(With it, freed blocks keep their prefixes and blocks that hold none are taken first.)"""
    core = make_core(enable_prefix_caching=False)
    rng = np.random.default_rng(5)
    used = set()
    for round_ in range(3):
        for i in range(4):
            core.add_request(request(f"{round_}-{i}", random_prompt(rng, 40), temperature=0.0, max_tokens=4,
                                     ignore_eos=True))
        while core.has_unfinished_requests:
            scheduled_blocks = {b for s in core.scheduler.running for b in s.block_ids}
            used |= scheduled_blocks
            core.step()
    # 4 requests of 44 tokens need 12 blocks at once; three rounds reuse the same ones
    assert used <= set(range(12))
    assert_all_blocks_free(core)


def test_max_num_seqs_counts_the_candidates_a_prompt_will_fork_into(make_core):
    core = make_core(max_num_seqs=4)
    for i in range(2):
        core.add_request(request(str(i), [10 + i, 11, 12], temperature=1.0, seed=i, n=4, max_tokens=3))
    most_running = 0
    while core.has_unfinished_requests:
        core.step()
        most_running = max(most_running, len(core.scheduler.running))
    assert most_running == 4
    assert_all_blocks_free(core)


def test_prompt_logprobs_come_with_the_requests_first_output_whatever_its_index(make_core):
    core = make_core()
    core.add_request(request("r", [1, 9690, 198, 2683, 359], temperature=1.0, seed=3, n=3, max_tokens=1,
                             prompt_logprobs=1))
    outputs = []
    while core.has_unfinished_requests:
        outputs += core.step()
    assert outputs[0].prompt_logprobs is not None and len(outputs[0].prompt_logprobs) == 5
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    assert sorted(o.index for o in outputs) == [0, 1, 2]
