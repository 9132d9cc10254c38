"""Paged attention against a plain float64 reference: decodes grouped and padded, prefill chunks
with a causal mask, and a cache whose unused slots hold garbage."""

from __future__ import annotations

import numpy as np
import pytest

import engine_core.model as model_module
from engine_core.loader import ModelConfig
from engine_core.model import DECODE_GROUP_SIZE, AttentionSpan, ForwardBatch, KVCache, LlamaModel, group_decodes

BLOCK_SIZE = 4
CONFIG = ModelConfig(vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=1, num_heads=6,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=512, tie_word_embeddings=True)


def attention_model() -> LlamaModel:
    """Only the attention of this model runs; its weights are never read."""
    model = LlamaModel.__new__(LlamaModel)
    model.config = CONFIG
    model.scale = np.float32(1 / np.sqrt(CONFIG.head_dim))
    model._buffers = {}
    return model


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_queries: int) -> np.ndarray:
    """Causal GQA attention in float64 for one sequence: q [n, heads, d], k/v [len, kv_heads, d]."""
    c = CONFIG
    group = c.num_heads // c.num_kv_heads
    k = np.repeat(k.astype(np.float64), group, axis=1)
    v = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("nhd,lhd->hnl", q.astype(np.float64), k) / np.sqrt(c.head_dim)
    length = k.shape[0]
    query_pos = np.arange(length - num_queries, length)[:, None]
    scores = np.where(np.arange(length)[None, :] <= query_pos, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", p, v).reshape(num_queries, -1)


def build(context_lens: list[int], chunk_lens: list[int], cache: KVCache, rng):
    """Sequences whose contexts end with chunks of chunk_lens tokens (1 = a decode), their blocks
    scattered over the cache; returns the batch, the queries and each sequence's keys/values."""
    c = CONFIG
    free = list(rng.permutation(cache.num_blocks))
    rows, spans, decode_rows, decode_blocks, decode_lens, truth = 0, [], [], [], [], []
    slots = []
    for length, n in zip(context_lens, chunk_lens):
        blocks = np.array([free.pop() for _ in range(-(-length // BLOCK_SIZE))], dtype=np.int64)
        k = rng.standard_normal((length, c.num_kv_heads, c.head_dim)).astype(np.float32)
        v = rng.standard_normal((length, c.num_kv_heads, c.head_dim)).astype(np.float32)
        pos = np.arange(length)
        flat = blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        cache.keys[0].reshape(-1, c.num_kv_heads, c.head_dim)[flat] = k
        cache.values[0].reshape(-1, c.num_kv_heads, c.head_dim)[flat] = v
        if n == 1:
            decode_rows.append(rows)
            decode_blocks.append(blocks)
            decode_lens.append(length)
        else:
            spans.append(AttentionSpan(rows, n, blocks, length))
        truth.append((rows, n, k, v))
        slots.append(flat[length - n :])
        rows += n
    q = rng.standard_normal((rows, c.num_heads, c.head_dim)).astype(np.float32)
    batch = ForwardBatch(token_ids=np.zeros(rows, np.int64), positions=np.zeros(rows, np.int64),
                         slot_mapping=np.concatenate(slots), spans=spans,
                         decode_groups=group_decodes(decode_rows, decode_blocks, decode_lens, BLOCK_SIZE),
                         output_rows=np.zeros(0, np.int64))
    return batch, q, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_decodes_and_prefill_chunks_match_a_float64_reference(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 120, size=21).tolist()  # several groups, most rows padded
    chunks = [1] * 19 + [min(5, lengths[19]), lengths[20]]  # and two prefill chunks
    cache = KVCache(CONFIG, num_blocks=1024, block_size=BLOCK_SIZE)
    batch, q, truth = build(lengths, chunks, cache, rng)
    assert len(batch.decode_groups) == -(-19 // DECODE_GROUP_SIZE)
    assert any(g.padding is not None for g in batch.decode_groups)
    out = attention_model()._attention(batch, cache, 0, q)
    for start, n, k, v in truth:
        np.testing.assert_allclose(out[start : start + n], reference(q[start : start + n], k, v, n),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tile", [7, 128])
def test_long_prefill_chunks_attended_in_query_tiles_match_a_float64_reference(tile, monkeypatch):
    """Query tiles see keys up to their own last position only: a chunk after 100 cached tokens,
    a whole prompt, tiles that do not divide the chunk, and a decode beside them."""
    monkeypatch.setattr(model_module, "PREFILL_QUERY_TILE", tile)
    rng = np.random.default_rng(11)
    cache = KVCache(CONFIG, num_blocks=512, block_size=BLOCK_SIZE)
    batch, q, truth = build([400, 300, 9], [300, 300, 1], cache, rng)
    out = attention_model()._attention(batch, cache, 0, q)
    for start, n, k, v in truth:
        np.testing.assert_allclose(out[start : start + n], reference(q[start : start + n], k, v, n),
                                   rtol=1e-4, atol=1e-5)


def test_garbage_in_unused_cache_slots_never_reaches_a_decode():
    """A padded group reads slots past each context's end (a block's unwritten tail, or another
    block entirely). NaN or inf left there by an earlier request must not leak into the result."""
    lengths = [3, 17, 40, 9, 64, 33, 1, 22, 50, 5]
    clean = KVCache(CONFIG, num_blocks=256, block_size=BLOCK_SIZE)
    batch, q, _ = build(lengths, [1] * len(lengths), clean, np.random.default_rng(7))
    dirty = KVCache(CONFIG, num_blocks=256, block_size=BLOCK_SIZE)
    dirty.keys[:] = np.nan
    dirty.values[:] = np.inf
    dirty_batch, dirty_q, _ = build(lengths, [1] * len(lengths), dirty, np.random.default_rng(7))
    expected = attention_model()._attention(batch, clean, 0, q)
    got = attention_model()._attention(dirty_batch, dirty, 0, dirty_q)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, expected)


def test_decodes_are_grouped_by_length_and_unpadded_when_contexts_fill_their_blocks():
    lengths = [8, 100, 12, 4, 96, 16, 8, 100, 12, 4]
    blocks = [np.arange(-(-n // BLOCK_SIZE)) for n in lengths]
    groups = group_decodes(list(range(len(lengths))), blocks, lengths, BLOCK_SIZE)
    assert [len(g.rows) for g in groups] == [8, 2]
    first, second = groups
    assert sorted(lengths[r] for r in first.rows) == sorted(lengths)[:8]
    assert sorted(lengths[r] for r in second.rows) == [100, 100]
    assert second.padding is None  # both fill exactly 25 blocks
    assert first.block_table.shape == (8, 24)  # padded to its longest member, 96 tokens
    assert first.padding.sum(axis=1).tolist() == [96 - lengths[r] for r in first.rows]
