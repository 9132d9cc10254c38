"""Sliding-window (local) attention and score soft-capping in the paged cache: the fused decode
kernel and the prefill chunks' BLAS path against a float64 reference in which each query sees
only the last `window` positions (itself included), as transformers' sliding-window mask."""

from __future__ import annotations

import numpy as np
import pytest

from engine_core.kernels.attention import to_cache
from engine_core.model import KVCache
from test_attention import CONFIG, attention_model, build, config


def windowed_reference(q, k, v, num_queries, window, softcap=0.0):
    """q [n, heads, d] (unscaled), k/v [len, kv_heads, d]: causal GQA attention in float64 where
    query at position p sees keys j with p - window < j <= p."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k.astype(np.float64), group, axis=1)
    v = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("nhd,lhd->hnl", q.astype(np.float64), k) / np.sqrt(q.shape[2])
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    length = k.shape[0]
    pos = np.arange(length - num_queries, length)[:, None]
    keys = np.arange(length)[None, :]
    scores = np.where((keys <= pos) & (keys > pos - window), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", p, v).reshape(num_queries, -1)


@pytest.mark.parametrize("window", [1, 3, 4, 5, 17, 64, 500])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_decodes_and_prefill_chunks_see_only_their_window(window, softcap):
    rng = np.random.default_rng(window)
    lengths = rng.integers(1, 120, size=12).tolist() + [4, 5, 16, 17, 150]
    chunks = [1] * 14 + [min(5, lengths[14]), lengths[15], 150]  # prefill chunks too, one past a tile
    cache = KVCache(CONFIG, num_blocks=1024, block_size=4)
    batch, q, truth = build(lengths, chunks, cache, rng)
    out = attention_model()._attention(batch, cache, 0, q, window, softcap)
    for start, n, k, v in truth:
        np.testing.assert_allclose(out[start : start + n], windowed_reference(q[start : start + n], k, v, n, window, softcap),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_window_wider_than_the_context_is_full_attention(dtype):
    c = config(8, 2, head_dim=16)
    wide_cache = KVCache(c, num_blocks=256, block_size=16)
    batch, q, _ = build([1, 15, 16, 17, 90], [1, 1, 1, 1, 40], wide_cache, np.random.default_rng(5), c)
    cache = KVCache(c, num_blocks=256, block_size=16, dtype=dtype)
    cache.keys[...] = to_cache(wide_cache.keys, cache.keys.dtype)
    cache.values[...] = to_cache(wide_cache.values, cache.values.dtype)
    full = attention_model(c)._attention(batch, cache, 0, q)
    wide = attention_model(c)._attention(batch, cache, 0, q, 90, 0.0)
    np.testing.assert_array_equal(wide[:4], full[:4])  # the kernel: the same blocks, same order
    np.testing.assert_allclose(wide, full, rtol=1e-6, atol=1e-7)
    narrow = attention_model(c)._attention(batch, cache, 0, q, 8, 0.0)
    assert np.abs(narrow[3] - full[3]).max() > 1e-3  # a 17-token context with a window of 8 differs
