"""The names of prefix-cache blocks, one definition for both processes.

The engine names each full block of a sequence's tokens by SHA-256 of the block's token ids
chained with the previous block's name (so a name stands for the whole prefix up to the block's
end), and a request's `cache_salt` is hashed into the first block's parent, so only requests
with the same salt share blocks. The frontend's data-parallel router names a prompt's leading
blocks the same way, to send a prompt to the engine that most likely holds them.
"""

from __future__ import annotations

import hashlib
import struct


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """A collision-resistant name (SHA-256), so no prompt can be crafted to read another's cache."""
    digest = hashlib.sha256(parent or b"")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


def salt_root(cache_salt: str | None) -> bytes | None:
    """The first block's parent: a salt puts a request's chain apart from every other salt's."""
    return None if cache_salt is None else hashlib.sha256(b"salt:" + cache_salt.encode()).digest()


def prefix_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None,
                        max_blocks: int | None = None) -> list[bytes]:
    """The names of the first full blocks of `token_ids` (at most `max_blocks`)."""
    count = len(token_ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    hashes: list[bytes] = []
    parent = salt_root(cache_salt)
    for index in range(count):
        parent = block_hash(parent, token_ids[index * block_size : (index + 1) * block_size])
        hashes.append(parent)
    return hashes
