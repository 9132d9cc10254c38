"""Paged KV cache bookkeeping: fixed-size blocks, a free list, reference counts, prefix caching.

The arrays themselves live in the model runner (`engine_core.model.KVCache`); this module only
decides which block ids a sequence owns. Shared blocks (forked candidates) are copied on write:
allocation returns the (src, dst) copies the runner must make before the step runs.

Prefix caching: a full block is named by a hash of its tokens chained with the hash of the
block before it, so a name stands for the whole prefix up to the block's end. A block that
fills up is registered under its name; when its last holder lets go it stays in the pool as a
free but *cached* block, and a later sequence whose tokens begin the same way takes it instead
of computing those tokens again. The cache's memory is all touched at start-up, so every free
block may stay cached at no cost: blocks that hold no prefix are taken first, and cached ones are
evicted least recently used first, a prefix's tail before its head.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from engine_core.request import Sequence
from ipc.shared.prefix_hash import block_hash, salt_root


class BlockPool:
    """Block ids, their reference counts and the free ones, in two kinds.

    A free block either holds no cached prefix (plain) or holds one (cached). Plain blocks are
    always taken first; only when none is left is a cached one evicted, the least recently used
    (last used when freed: a hit holds the block, so its release renews it). A sequence frees
    its tail before its head, so a prefix loses its tail first. The whole cache is allocated and
    touched at start-up (`KVCache`), so keeping every free block cached costs no memory.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # plain free blocks, a stack: the most recently freed is reused first, so a new sequence
        # tends to start in a run a finished one left. A block taken out of turn (see allocate's
        # `after`) leaves a stale entry behind, skipped when popped; is_free_plain says which
        # entries are live.
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self.is_free_plain = bytearray(b"\x01") * num_blocks
        self.num_free_plain = num_blocks
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, least recently used first
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}  # hash -> the block holding that prefix
        self.ref_counts = [0] * num_blocks
        self.peak_num_used = 0  # the most blocks ever in use at once

    @property
    def num_free(self) -> int:
        return self.num_free_plain + len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, count: int, after: int | None = None) -> list[int]:
        """`count` blocks for a sequence whose last block is `after` (None if it has none).

        Each block is preferably the one right after the previous (when that is free and plain),
        so a sequence's blocks tend to lie in one run: the attention's gather reads a run at
        memory speed and scattered 12 KB blocks at about half of it. A new sequence starts at the
        most recently freed block among the top of the stack that begins the longest free run
        (up to `count`)."""
        assert count <= self.num_free, "allocate() without can_allocate()"
        block_ids = []
        if after is None and count > 1:
            after = self._before_free_run(count)
        for _ in range(count):
            following = -1 if after is None else after + 1
            if 0 <= following < self.num_blocks and self.is_free_plain[following]:
                self._mark_taken(following)  # its stack entry goes stale
                block_id = following
            else:
                block_id = self._take_free()
            assert self.ref_counts[block_id] == 0
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
            after = block_id
        self.peak_num_used = max(self.peak_num_used, self.num_used)
        return block_ids

    def _before_free_run(self, count: int, scan: int = 64) -> int | None:
        """The block before the start of the longest run of plain free blocks (up to `count`
        long) that starts at one of the `scan` most recently freed blocks; None when no run is
        longer than one block (the usual choice is as good)."""
        self._drop_stale_top()  # they would otherwise be stepped over on every call
        stack, is_free, end = self.free_block_ids, self.is_free_plain, self.num_blocks
        best, best_len, seen = None, 1, set()
        want = min(count, 32)
        for block_id in itertools.islice(reversed(stack), 4 * scan):  # stale or repeated ones too
            if len(seen) == scan:
                break
            if not is_free[block_id] or block_id in seen:
                continue
            seen.add(block_id)
            run = 1
            while run < want and block_id + run < end and is_free[block_id + run]:
                run += 1
            if run > best_len:
                best, best_len = block_id, run
                if run == want:
                    break
        return None if best is None else best - 1

    def _drop_stale_top(self) -> None:
        """Pop the stack's stale entries (blocks taken out of turn) down to a live one."""
        stack = self.free_block_ids
        while stack and not self.is_free_plain[stack[-1]]:
            stack.pop()

    def _mark_taken(self, block_id: int) -> None:
        self.is_free_plain[block_id] = 0
        self.num_free_plain -= 1

    def _take_free(self) -> int:
        """A plain free block if there is one, else the least recently used cached one (evicted):
        a cached prefix survives until every block that holds none is in use."""
        self._drop_stale_top()
        if self.free_block_ids:
            block_id = self.free_block_ids.pop()
            self._mark_taken(block_id)
            return block_id
        block_id, _ = self.cached_free.popitem(last=False)
        del self.block_of[self.hash_of[block_id]]
        self.hash_of[block_id] = None
        return block_id

    def share(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0
            self.ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Let go of blocks; in the given order, those left free and cached become the most
        recently used (so pass a sequence's tail first)."""
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0, f"block {block_id} released twice"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.hash_of[block_id] is not None:
                    self.cached_free[block_id] = None
                else:
                    self._push_free(block_id)

    def _push_free(self, block_id: int) -> None:
        self.is_free_plain[block_id] = 1
        self.num_free_plain += 1
        self.free_block_ids.append(block_id)
        if len(self.free_block_ids) > 2 * self.num_free_plain + 64:
            # drop stale entries and the older duplicates of blocks freed again, keeping order
            seen: set[int] = set()
            live = []
            for b in reversed(self.free_block_ids):
                if self.is_free_plain[b] and b not in seen:
                    seen.add(b)
                    live.append(b)
            live.reverse()
            self.free_block_ids = live

    # ---------------------------------------------------------------- prefix caching

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks for the longest run of hashes from the start."""
        found = []
        for h in hashes:
            block_id = self.block_of.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def take_cached(self, block_ids: list[int]) -> None:
        """Hold cached blocks for a new sequence (reviving them if they were free)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.cached_free[block_id]
            self.ref_counts[block_id] += 1
        self.peak_num_used = max(self.peak_num_used, self.num_used)

    def register(self, block_id: int, h: bytes) -> None:
        """block_id now holds the prefix named h (unless another block already does)."""
        if h not in self.block_of and self.hash_of[block_id] is None:
            self.block_of[h] = block_id
            self.hash_of[block_id] = h


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache, since start
        self.num_hit_tokens = 0  # of those, found cached

    def _needs_copy(self, seq: Sequence) -> bool:
        """Writing into a partly filled block that a sibling also holds needs a private copy."""
        position = seq.num_computed_tokens
        if position % self.block_size == 0 or position // self.block_size >= len(seq.block_ids):
            return False
        return self.pool.ref_counts[seq.block_ids[position // self.block_size]] > 1

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, needed - len(seq.block_ids)) + int(self._needs_copy(seq))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Room for num_new_tokens more; with `cached` (see cached_prefix) for a sequence about
        to start on those blocks, num_new_tokens counts from their end."""
        if not cached:
            return self.num_new_blocks(seq, num_new_tokens) <= self.pool.num_free
        revived = sum(1 for b in cached if self.pool.ref_counts[b] == 0)  # free now, not after
        needed = -(-(len(cached) * self.block_size + num_new_tokens) // self.block_size) - len(cached)
        return needed + revived <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Give seq room for num_new_tokens more tokens; returns block copies to make first."""
        copies = []
        if self._needs_copy(seq):
            slot = seq.num_computed_tokens // self.block_size
            (private,) = self.pool.allocate(1, seq.block_ids[slot - 1] if slot else None)
            copies.append((seq.block_ids[slot], private))
            self.pool.release([seq.block_ids[slot]])
            seq.block_ids[slot] = private
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        if needed > len(seq.block_ids):
            last = seq.block_ids[-1] if seq.block_ids else None
            seq.block_ids.extend(self.pool.allocate(needed - len(seq.block_ids), last))
        return copies

    def _may_use_cache(self, seq: Sequence) -> bool:
        """Only a sequence starting from nothing, and not one that wants every prompt
        position's logits (prompt logprobs) or hidden state (mean pooling)."""
        return (self.enable_prefix_caching and not seq.num_computed_tokens and not seq.block_ids
                and seq.request.params.prompt_logprobs is None and not seq.request.pools_every_position)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """For a sequence about to start: the cached blocks of its longest cached prefix. The
        last token is always left to compute, since its logits are needed."""
        if not self._may_use_cache(seq):
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        return self.pool.lookup(self._hashes(seq, max_blocks))

    def start_from_cache(self, seq: Sequence, cached: list[int]) -> int:
        """seq begins on the cached blocks: their tokens count as computed. Returns how many
        tokens that is (0 for a sequence that may not use the cache)."""
        if not self._may_use_cache(seq):
            return 0
        num_hit_tokens = len(cached) * self.block_size
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += num_hit_tokens
        self.pool.take_cached(cached)
        seq.block_ids = list(cached)
        seq.num_computed_tokens = num_hit_tokens
        seq.num_registered_blocks = len(cached)
        return num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that seq's computed tokens have filled."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if num_full <= seq.num_registered_blocks:
            return  # most steps: the last block is still filling
        hashes = self._hashes(seq, num_full)
        for index in range(seq.num_registered_blocks, num_full):
            self.pool.register(seq.block_ids[index], hashes[index])
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The names of seq's first `count` full blocks (computed once, kept on the sequence)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < count:
            index = len(hashes)
            parent = hashes[-1] if hashes else salt_root(seq.params.cache_salt)
            hashes.append(block_hash(parent, seq.token_ids[index * bs : (index + 1) * bs]))
        return hashes[:count]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child already holds a copy of the parent's block list; count it as a holder."""
        assert child.block_ids == parent.block_ids
        self.pool.share(child.block_ids)

    def free(self, seq: Sequence) -> None:
        # last block first: eviction takes the oldest, so a prefix loses its tail before its
        # head (without its head, the rest of a chain can never be found)
        self.pool.release(seq.block_ids[::-1])
        seq.block_ids = []
        seq.num_registered_blocks = 0
