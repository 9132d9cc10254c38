"""The block pool keeps a sequence's blocks in runs where it can (the attention's gather reads a
run at memory speed and scattered blocks at about half of it) without ever handing a block out
twice or evicting a cached block while a block that holds no prefix is free."""

from __future__ import annotations

import random

from engine_core.kv_cache_manager import BlockPool


def test_a_growing_sequence_takes_the_block_after_its_last_one_when_that_is_free():
    pool = BlockPool(16)
    blocks = pool.allocate(10)  # 0..9
    pool.release([5, 4])
    pool.release([8])  # the stack's top
    assert pool.allocate(1, after=blocks[3]) == [4]  # 0..3 grows into 4, not into 8
    assert pool.allocate(1, after=4) == [5]
    assert pool.allocate(1, after=6) == [8]  # 7 is held: the stack decides


def test_growth_does_not_take_a_cached_block_out_of_turn():
    pool = BlockPool(16)
    blocks = pool.allocate(6)  # 0..5
    pool.register(3, b"prefix")
    pool.release([3])  # cached and free
    pool.release([1])  # plain free
    assert pool.allocate(1, after=2) == [1]  # not 3: that holds a cached prefix
    assert pool.lookup([b"prefix"]) == [3]
    pool.release([1])
    assert pool.allocate(1, after=blocks[-1]) == [6]  # the run goes on: 6 is free and plain


def test_a_new_sequence_starts_where_a_free_run_is_long_enough():
    pool = BlockPool(32)
    blocks = pool.allocate(12)  # 0..11
    pool.release([blocks[2], blocks[1]])  # a hole of two: 1, 2
    pool.release([blocks[9], blocks[8], blocks[7], blocks[6]])  # a hole of four: 6..9
    pool.release([blocks[4]])  # the most recently freed: a hole of one
    assert pool.allocate(4) == [6, 7, 8, 9]
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate(1) == [4]


def test_new_sequences_served_from_runs_leave_no_pile_of_stale_stack_entries():
    pool = BlockPool(4000)
    pool.release(pool.allocate(4000)[::-1])
    for _ in range(100):
        blocks = pool.allocate(32)
        assert blocks == list(range(blocks[0], blocks[0] + 32))
    # each call's blocks left stale entries; the next call clears those on the stack's top
    assert len(pool.free_block_ids) <= pool.num_free_plain + 32


def test_random_churn_never_hands_out_a_block_twice_nor_evicts_while_a_plain_block_is_free():
    rng = random.Random(0)
    pool = BlockPool(200)
    held: list[list[int]] = []
    num_evictions = 0
    for step in range(20_000):
        if held and (rng.random() < 0.45 or pool.num_free < 20):
            seq = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.3:
                pool.register(seq[-1], rng.randbytes(8))  # some blocks stay cached when freed
            pool.release(seq[::-1])
        else:
            count = rng.randint(1, 12)
            num_plain, num_cached = pool.num_free_plain, len(pool.block_of)
            if held and rng.random() < 0.5:
                seq = rng.choice(held)
                seq += pool.allocate(count, after=seq[-1])
            else:
                held.append(pool.allocate(count))
            evicted = num_cached - len(pool.block_of)
            assert evicted == max(0, count - num_plain)  # plain blocks first, then evictions
            num_evictions += evicted
        in_use = [b for seq in held for b in seq]
        assert len(in_use) == len(set(in_use)) == pool.num_used
        assert all(pool.ref_counts[b] == 1 for b in in_use)
        live = {b for b in pool.free_block_ids if pool.is_free_plain[b]}
        assert len(live) == pool.num_free_plain and not live & set(in_use)
        assert len(pool.free_block_ids) <= 2 * pool.num_blocks + 64  # stale entries get dropped
    assert num_evictions > 100  # the cache did fill up and evict
