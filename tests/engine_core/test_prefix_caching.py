"""Prefix caching: a prompt that begins like an earlier one starts on that one's KV blocks and
gives the same tokens as if computed; every free block keeps its prefix until the pool needs it
(blocks holding none are taken first, then the least recently used cached ones)."""

from __future__ import annotations

import numpy as np

from engine_core.kv_cache_manager import BlockPool, block_hash
from engine_helpers import TWO_CANDIDATES, assert_all_blocks_free, collect, request, run_to_completion
from engine_helpers import tiny_core, tiny_request, write_tiny_model  # the tiny random model


def prompt_of(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40_000, size=length).tolist()


def computed(core) -> int:
    return core.num_prompt_tokens_computed


def test_a_repeated_prompt_starts_on_its_cached_blocks_and_gives_the_same_tokens(make_core):
    core = make_core()
    prompt = prompt_of(0, 200)
    core.add_request(request("first", prompt, temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2))
    first = run_to_completion(core)["first"][0]
    assert computed(core) == 200
    core.add_request(request("again", prompt, temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2))
    outputs = []
    while core.has_unfinished_requests:
        outputs += core.step()
    assert [t for o in outputs for t in o.new_token_ids] == first
    # the first output already says how many prompt tokens were cached, not only the final one
    assert outputs[0].finish_reason is None and outputs[0].num_cached_tokens == 192
    assert outputs[-1].num_cached_tokens == 192
    assert all(o.num_cached_tokens is None for o in outputs[1:-1])
    # (200 - 1) // 16 = 12 full blocks come from the cache; the last 8 tokens are computed
    assert computed(core) == 200 + 8
    stats = core.stats()
    assert (stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens) == (400, 192)
    # vLLM's prompt token count is of whole prompts, the cached part included
    assert (stats.num_prompt_tokens, stats.num_prompt_tokens_computed) == (400, 208)
    assert_all_blocks_free(core)


def test_prompts_sharing_a_system_prompt_match_an_engine_without_the_cache(make_core):
    system = prompt_of(1, 100)
    prompts = [system + prompt_of(10 + i, 30 + 7 * i) for i in range(4)]
    results = []
    for enable in (True, False):
        core = make_core(enable_prefix_caching=enable)
        tokens = {}
        for i, prompt in enumerate(prompts):  # one after another, so each can find the last
            core.add_request(request(str(i), prompt, temperature=0.0, max_tokens=6, ignore_eos=True))
            tokens.update(run_to_completion(core))
        results.append((tokens, computed(core)))
        assert_all_blocks_free(core)
    (cached_tokens, cached_count), (plain_tokens, plain_count) = results
    assert cached_tokens == plain_tokens
    assert plain_count == sum(len(p) for p in prompts)
    assert cached_count == plain_count - 3 * 96  # requests 2..4 find the system prompt's 6 full blocks


def test_a_request_wanting_prompt_logprobs_computes_its_whole_prompt(make_core):
    prompt = prompt_of(2, 120)
    fresh = make_core()
    fresh.add_request(request("x", prompt, max_tokens=1, prompt_logprobs=1, temperature=0.0))
    expected = [o for o in collect(fresh) if o.prompt_logprobs is not None][0].prompt_logprobs
    core = make_core()
    core.add_request(request("warm", prompt, max_tokens=1, temperature=0.0))
    run_to_completion(core)
    before = computed(core)
    core.add_request(request("x", prompt, max_tokens=1, prompt_logprobs=1, temperature=0.0))
    got = [o for o in collect(core) if o.prompt_logprobs is not None][0].prompt_logprobs
    assert computed(core) - before == 120
    assert [p and p.token_id for p in got] == [p and p.token_id for p in expected]
    np.testing.assert_allclose([p.logprob for p in got[1:]], [p.logprob for p in expected[1:]], atol=1e-5)


def test_n_candidates_and_beams_fork_from_a_cached_prefix(make_core):
    prompt = prompt_of(3, 90)
    runs = []
    for enable in (True, False):
        core = make_core(enable_prefix_caching=enable)
        core.add_request(request("warm", prompt, max_tokens=1, temperature=0.0))
        run_to_completion(core)
        core.add_request(request("n", prompt, n=3, seed=5, max_tokens=10, ignore_eos=True, **TWO_CANDIDATES))
        core.add_request(request("beam", prompt, n=2, use_beam_search=True, temperature=0.0, max_tokens=6,
                                 ignore_eos=True))
        runs.append(run_to_completion(core))
        assert_all_blocks_free(core)
    assert runs[0] == runs[1]


def test_tokens_at_another_position_do_not_match_a_cached_block(tmp_path):
    """A block's name covers everything before it: the same 16 tokens after a different start
    are different keys and values."""
    core = tiny_core(write_tiny_model(tmp_path), num_blocks=32)
    tail = list(range(20, 36))
    core.add_request(tiny_request("a", list(range(40, 56)) + tail + [3], max_tokens=1))
    collect(core)
    core.add_request(tiny_request("b", list(range(60, 76)) + tail + [3], max_tokens=1))
    collect(core)
    assert core.stats().prefix_cache_hit_tokens == 0
    assert block_hash(None, tail) != block_hash(block_hash(None, list(range(40, 56))), tail)


def chain(tokens: list[int], block_size: int = 16) -> list[bytes]:
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        hashes.append(block_hash(hashes[-1] if hashes else None, tokens[start : start + block_size]))
    return hashes


def test_cached_blocks_are_evicted_least_recently_used_first_and_a_prefix_loses_its_tail_first(tmp_path):
    core = tiny_core(write_tiny_model(tmp_path), num_blocks=10)
    pool = core.kv.pool
    a = [1] + list(range(10, 73))  # 64 tokens: 4 full blocks
    b = [2] + list(range(80, 143))
    c = [3] + list(range(150, 181))  # 32 tokens: 2 blocks
    d = [4] + list(range(190, 253))
    for prompt in (a, b):  # one after the other: a's blocks are the least recently used
        core.add_request(tiny_request(str(prompt[0]), prompt, max_tokens=1, ignore_eos=True))
        collect(core)
    assert len(pool.cached_free) == 8 and pool.num_free == 10
    core.add_request(tiny_request("c", c, max_tokens=1, ignore_eos=True))
    assert all(o.error is None for o in collect(core))
    # c took the two blocks that held no prefix; nothing was evicted
    assert [len(pool.lookup(chain(p))) for p in (a, b, c)] == [4, 4, 2]
    hits = core.kv.num_hit_tokens
    core.add_request(tiny_request("a-head", a[:33], max_tokens=1, ignore_eos=True))
    collect(core)
    # a's head was hit (and so used last); its last token needed a block: a's fourth, the oldest
    assert core.kv.num_hit_tokens - hits == 32
    assert [len(pool.lookup(chain(p))) for p in (a, b, c)] == [3, 4, 2]
    core.add_request(tiny_request("d", d, max_tokens=1, ignore_eos=True))
    collect(core)
    # d took the one plain block, then evicted the least recently used: a's third block and
    # b's last two (b was freed before a's head was hit), each prefix's tail before its head
    assert [len(pool.lookup(chain(p))) for p in (a, b, c, d)] == [2, 2, 2, 4]
    hits = core.kv.num_hit_tokens
    core.add_request(tiny_request("b-again", b, max_tokens=1, ignore_eos=True))
    collect(core)
    assert core.kv.num_hit_tokens - hits == 32  # starts on the head that survived
    assert set(pool.block_of.values()) == {x for x in range(10) if pool.hash_of[x] is not None}
    assert pool.num_free == 10 and not any(pool.ref_counts)


def test_the_pool_takes_plain_blocks_before_evicting_and_then_evicts_the_least_recently_used():
    pool = BlockPool(6)
    first = pool.allocate(4)
    assert first == [0, 1, 2, 3]
    for block_id, h in zip(first[:2], [b"x", b"y"]):
        pool.register(block_id, h)
    pool.release(first[::-1])  # 3 and 2 plain free; y, then x cached (tail first)
    assert pool.allocate(2) == [2, 3]  # plain (as one run)
    assert pool.allocate(2) == [4, 5]  # every other plain block goes before a cached one
    assert pool.lookup([b"x", b"y"]) == [0, 1]
    assert pool.allocate(1) == [1]  # the least recently used: y, the prefix's tail
    assert pool.lookup([b"x", b"y"]) == [0]
    assert pool.block_of == {b"x": 0}
    pool.register(1, b"z")
    pool.release([1])  # z is now used later than x
    pool.take_cached([0])  # a hit on x
    pool.release([0])  # ... makes x the most recently used
    assert pool.allocate(1) == [1] and pool.block_of == {b"x": 0}
    assert pool.num_free == 1


def test_three_tenants_taking_turns_keep_their_system_prompts_cached(make_core):
    """Interleaved requests of three tenants, each with its own system prompt, on a fresh server:
    the cache holds all three prefixes, so every turn after a tenant's first starts on it."""
    core = make_core()  # 0.25 GiB: 364 blocks of 16 tokens, ample for three prefixes
    systems = [prompt_of(100 + tenant, 96) for tenant in range(3)]  # 6 full blocks each
    for turn in range(3):
        for tenant, system in enumerate(systems):
            prompt = system + prompt_of(1000 + 10 * turn + tenant, 20)
            core.add_request(request(f"{tenant}-{turn}", prompt, temperature=0.0, max_tokens=4, ignore_eos=True))
            run_to_completion(core)  # one at a time: the pool's free blocks are all free in between
    stats = core.stats()
    assert stats.prefix_cache_hit_tokens == 6 * 96  # turns 2 and 3 of each tenant find the 6 blocks
    assert stats.num_prompt_tokens == 9 * 116
    assert stats.num_prompt_tokens_computed == 9 * 116 - 6 * 96
    assert_all_blocks_free(core)


def test_a_sequence_preempted_and_restarted_resumes_from_its_own_cached_blocks(make_core):
    prompts = [prompt_of(20 + i, 150) for i in range(3)]
    results = []
    for blocks in (None, 30):  # each ends needing 12 blocks: three cannot all run to the end
        core = make_core(kv_cache_gib=0.25 if blocks is None else blocks * 737_280 / 2**30)
        for i, prompt in enumerate(prompts):
            core.add_request(request(str(i), prompt, temperature=0.0, max_tokens=40, ignore_eos=True))
        results.append(run_to_completion(core))
        if blocks is not None:
            assert core.scheduler.num_preemptions > 0
            assert core.kv.num_hit_tokens > 0  # the restart found the head of its prompt cached
        assert_all_blocks_free(core)
    assert results[0] == results[1]


def test_only_requests_with_the_same_cache_salt_share_cached_blocks(tmp_path):
    core = tiny_core(write_tiny_model(tmp_path), num_blocks=32)
    for i in range(3):  # 21 blocks, cached, which the requests below evict first
        core.add_request(tiny_request(f"touch{i}", [5 + i] * 112, max_tokens=1))
    assert all(o.error is None for o in collect(core))
    prompt = list(range(10, 60))  # 3 full blocks can be found
    found = []
    for salt in (None, "tenant-a", "tenant-b", "tenant-a", None):
        before = core.kv.num_hit_tokens
        core.add_request(tiny_request(f"{salt}-{len(found)}", prompt, max_tokens=1, cache_salt=salt))
        collect(core)
        found.append(core.kv.num_hit_tokens - before)
    assert found == [0, 0, 0, 48, 48]
