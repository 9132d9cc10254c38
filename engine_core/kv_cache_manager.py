"""Paged KV cache bookkeeping: fixed-size blocks, a free list and reference counts.

The arrays themselves live in the model runner (`engine_core.model.KVCache`); this module only
decides which block ids a sequence owns. Shared blocks (forked candidates) are copied on write:
allocation returns the (src, dst) copies the runner must make before the step runs.
"""

from __future__ import annotations


from engine_core.request import Sequence


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # a stack: the most recently freed block is reused first, so the cache's memory pages
        # are touched only as far as the load needs (the arrays are mapped lazily)
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self.ref_counts = [0] * num_blocks
        self.peak_num_used = 0  # the most blocks ever in use at once

    @property
    def num_free(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        assert count <= self.num_free, "allocate() without can_allocate()"
        block_ids = [self.free_block_ids.pop() for _ in range(count)]
        for block_id in block_ids:
            assert self.ref_counts[block_id] == 0
            self.ref_counts[block_id] = 1
        self.peak_num_used = max(self.peak_num_used, self.num_used)
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0
            self.ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0, f"block {block_id} released twice"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    def _needs_copy(self, seq: Sequence) -> bool:
        """Writing into a partly filled block that a sibling also holds needs a private copy."""
        position = seq.num_computed_tokens
        if position % self.block_size == 0 or position // self.block_size >= len(seq.block_ids):
            return False
        return self.pool.ref_counts[seq.block_ids[position // self.block_size]] > 1

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, needed - len(seq.block_ids)) + int(self._needs_copy(seq))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Give seq room for num_new_tokens more tokens; returns block copies to make first."""
        copies = []
        if self._needs_copy(seq):
            slot = seq.num_computed_tokens // self.block_size
            (private,) = self.pool.allocate(1)
            copies.append((seq.block_ids[slot], private))
            self.pool.release([seq.block_ids[slot]])
            seq.block_ids[slot] = private
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        if needed > len(seq.block_ids):
            seq.block_ids.extend(self.pool.allocate(needed - len(seq.block_ids)))
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child already holds a copy of the parent's block list; count it as a holder."""
        assert child.block_ids == parent.block_ids
        self.pool.share(child.block_ids)

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []
