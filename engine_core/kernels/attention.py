"""Paged attention for decodes, compiled with numba: each sequence's keys and values are read in
place through its block table (no gather copy), with an online softmax.

    paged_decode_attention(q, rows, keys, values, block_table, context_lens, out, window=0, softcap=0.0)

A task is one sequence and some of its KV heads (all of them on one thread; one each with fewer
than four sequences a thread), run in parallel (prange). It walks the sequence's context in chunks
of CHUNK_TOKENS (whole blocks), and each key and value row is read once, in memory order, for all
the query heads of the task (GQA: the `group` query heads of a KV head share that read). Per
chunk: the scores of its tokens for every query head, four rows at a time sharing each load of
the query (a dot product over head_dim per token: the cache is token-major); then per head the
chunk's maximum, one rescale of the running sums, the exps; then the weighted values (with
head_dim a multiple of 8, in register tiles of the sums through kernels.lanes: each value row
loaded once for a pair of query heads, the sums loaded and stored once per block; otherwise four
rows per update of the sums). Nothing a task computes depends on where its blocks lie or on what
else is in the batch, and it never reads a slot past its context's end, so stale cache contents
(NaN included) cannot leak in. With a window (sliding-window layers), a task starts at the
block holding the first of the last `window` positions and skips the tokens before it; a soft
cap (Gemma 2 style) bends each score to cap * tanh(score / cap).

A sequence's blocks lie anywhere in the cache, so the hardware's prefetchers start cold at each
one: while the scores read a block's keys, the kernel asks (prefetch into L2, a few rows at a
time between the arithmetic) for the same rows of its values and for the next block's keys, and
while the weighted sum reads a chunk's values, for the next chunk's keys. SmolLM2's shapes at
batch 64 (contexts ~266, 30 layers, one process, alternating with the previous kernel): float32
1.1-1.25x, float16 1.3-1.6x faster, the same bits on that machine. What is left: scripts/bench_attention.py
puts the kernel at 3-5x the time of merely reading the same blocks when they are in cache.

The cache may hold float32, float16 or bfloat16 (numba has no 16-bit float type: the kernels
read float16 bits as uint16 and bfloat16 bits as int16, and widen each value in registers as it
is read, see _f32; compiled once per cache type). Softmax's
exponential is a polynomial here (relative error < 2e-7) because without Intel's SVML numba calls
libm's scalar expf.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

import engine_core.kernels as kernels
from engine_core.kernels._numba import to_f32 as _f32
from engine_core.kernels.lanes import prefetch_l2, vbcast, vfma, vload, vstore

_OPTS = dict(cache=True, fastmath=True, nogil=True)


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
# the running maximum before any score: finite, because fastmath lets the compiler assume no inf
_LOWEST = np.float32(-3.0e38)
# tokens per unit of the online softmax (whole blocks): one maximum and rescale per unit
CHUNK_TOKENS = 128


@njit(inline="always", **_OPTS)
def _exp_into(x, n, ibuf, fbuf, out):
    """out[:n] = exp(x[:n]) for x <= 0 (scores minus their maximum); ibuf and fbuf are one
    uint32/float32 buffer (two views) that builds 2^k from its bits. Vectorizes: no libm call."""
    for i in range(n):
        v = max(x[i], np.float32(-87.0))
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - k * _LN2_HI - k * _LN2_LO
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[i] = p * r * r + r + np.float32(1.0)
        ibuf[i] = np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23)
    for i in range(n):
        out[i] *= fbuf[i]


@njit(inline="always", **_OPTS)
def _prefetch_row(C, kb, t):
    """Ask for row t (every KV head) of block kb of C [blocks, bs, kv_heads, D] into L2; nothing
    for kb < 0."""
    if kb >= 0:
        per = C.shape[2] * C.shape[3]
        start = (kb * C.shape[1] + t) * per
        for o in range(0, per, 64 // C.itemsize):
            prefetch_l2(C, start + o)


@njit(inline="always", **_OPTS)
def _scores(qg, nh, G, K, kb, kh0, t0, n, s, stride, col, V, ahead):
    """s[a * stride + col + t - t0] = qg[a] . K[kb, t, kh0 + a // G] for the tokens t0 <= t < n of
    a block and the nh * G query heads a: the block's rows read once, in memory order, four rows
    at a time sharing each load of the query. Meanwhile it asks for the same rows of V[kb] (the
    weighted sum's, soon) and of K[ahead] (the next block's; ahead < 0: none), a few at a time
    between the arithmetic: the hardware's prefetchers start afresh at each scattered block."""
    D = qg.shape[1]
    t = t0
    while t + 4 <= n:
        for r in range(t, t + 4):
            _prefetch_row(V, kb, r)
            _prefetch_row(K, ahead, r)
        i = col + t - t0
        for h in range(nh):
            kh = kh0 + h
            for g in range(G):
                a = h * G + g
                d0 = np.float32(0.0)
                d1 = np.float32(0.0)
                d2 = np.float32(0.0)
                d3 = np.float32(0.0)
                for d in range(D):
                    x = qg[a, d]
                    d0 += x * _f32(K[kb, t, kh, d])
                    d1 += x * _f32(K[kb, t + 1, kh, d])
                    d2 += x * _f32(K[kb, t + 2, kh, d])
                    d3 += x * _f32(K[kb, t + 3, kh, d])
                s[a * stride + i] = d0
                s[a * stride + i + 1] = d1
                s[a * stride + i + 2] = d2
                s[a * stride + i + 3] = d3
        t += 4
    while t < n:
        i = col + t - t0
        for h in range(nh):
            kh = kh0 + h
            for g in range(G):
                a = h * G + g
                d0 = np.float32(0.0)
                for d in range(D):
                    d0 += qg[a, d] * _f32(K[kb, t, kh, d])
                s[a * stride + i] = d0
        t += 1


@njit(inline="always", **_OPTS)
def _load4(acc, o):
    """acc.flat[o : o + 32] as four registers of lanes."""
    return vload(acc, o), vload(acc, o + 8), vload(acc, o + 16), vload(acc, o + 24)


@njit(inline="always", **_OPTS)
def _store4(acc, o, r):
    """acc.flat[o : o + 32] = the four registers r."""
    vstore(acc, o, r[0])
    vstore(acc, o + 8, r[1])
    vstore(acc, o + 16, r[2])
    vstore(acc, o + 24, r[3])


@njit(inline="always", **_OPTS)
def _weigh_lanes(p, nh, G, V, kb, kh0, t0, n, stride, col, acc):
    """_weigh for head_dim a multiple of 8, with a tile of the sums held in registers across the
    block's tokens: per KV head, query heads in pairs (then one), head_dim in tiles of 32 values
    (then 8): each token's value row is loaded once for the pair, and the sums are loaded and
    stored once per block, not once per token. (The weights' order of addition is a token at a
    time, one rounding per product: a decode's result depends on its context alone.)"""
    bs = V.shape[1]
    KVH = V.shape[2]
    D = V.shape[3]
    step = KVH * D  # from one token's row to the next
    for h in range(nh):
        base = (kb * bs * KVH + kh0 + h) * D  # V[kb, 0, kh0 + h, 0]
        g = 0
        while g < G:
            a = h * G + g
            pa = a * stride + col - t0  # p[pa + t]: head a's weight of token t
            if g + 2 <= G:
                pb = pa + stride
                d = 0
                while d + 32 <= D:
                    oa = a * D + d
                    ob = oa + D
                    a0, a1, a2, a3 = _load4(acc, oa)
                    b0, b1, b2, b3 = _load4(acc, ob)
                    for t in range(t0, n):
                        r = base + t * step + d
                        x = vbcast(p[pa + t])
                        y = vbcast(p[pb + t])
                        v = vload(V, r)
                        a0 = vfma(x, v, a0)
                        b0 = vfma(y, v, b0)
                        v = vload(V, r + 8)
                        a1 = vfma(x, v, a1)
                        b1 = vfma(y, v, b1)
                        v = vload(V, r + 16)
                        a2 = vfma(x, v, a2)
                        b2 = vfma(y, v, b2)
                        v = vload(V, r + 24)
                        a3 = vfma(x, v, a3)
                        b3 = vfma(y, v, b3)
                    _store4(acc, oa, (a0, a1, a2, a3))
                    _store4(acc, ob, (b0, b1, b2, b3))
                    d += 32
                while d < D:
                    oa = a * D + d
                    a0 = vload(acc, oa)
                    b0 = vload(acc, oa + D)
                    for t in range(t0, n):
                        v = vload(V, base + t * step + d)
                        a0 = vfma(vbcast(p[pa + t]), v, a0)
                        b0 = vfma(vbcast(p[pb + t]), v, b0)
                    vstore(acc, oa, a0)
                    vstore(acc, oa + D, b0)
                    d += 8
                g += 2
            else:
                d = 0
                while d + 32 <= D:
                    oa = a * D + d
                    a0, a1, a2, a3 = _load4(acc, oa)
                    for t in range(t0, n):
                        r = base + t * step + d
                        x = vbcast(p[pa + t])
                        a0 = vfma(x, vload(V, r), a0)
                        a1 = vfma(x, vload(V, r + 8), a1)
                        a2 = vfma(x, vload(V, r + 16), a2)
                        a3 = vfma(x, vload(V, r + 24), a3)
                    _store4(acc, oa, (a0, a1, a2, a3))
                    d += 32
                while d < D:
                    oa = a * D + d
                    a0 = vload(acc, oa)
                    for t in range(t0, n):
                        a0 = vfma(vbcast(p[pa + t]), vload(V, base + t * step + d), a0)
                    vstore(acc, oa, a0)
                    d += 8
                g += 1


@njit(inline="always", **_OPTS)
def _weigh(p, nh, G, V, kb, kh0, t0, n, stride, col, acc):
    """acc[a] += p[a * stride + col + t - t0] * V[kb, t, kh0 + a // G] for the tokens of a block:
    its rows read once, in memory order, four rows per update of the sums."""
    D = acc.shape[1]
    t = t0
    while t + 4 <= n:
        i = col + t - t0
        for h in range(nh):
            kh = kh0 + h
            for g in range(G):
                a = h * G + g
                p0 = p[a * stride + i]
                p1 = p[a * stride + i + 1]
                p2 = p[a * stride + i + 2]
                p3 = p[a * stride + i + 3]
                for d in range(D):
                    acc[a, d] += ((p0 * _f32(V[kb, t, kh, d]) + p1 * _f32(V[kb, t + 1, kh, d]))
                                  + (p2 * _f32(V[kb, t + 2, kh, d]) + p3 * _f32(V[kb, t + 3, kh, d])))
        t += 4
    while t < n:
        i = col + t - t0
        for h in range(nh):
            kh = kh0 + h
            for g in range(G):
                a = h * G + g
                pt = p[a * stride + i]
                for d in range(D):
                    acc[a, d] += pt * _f32(V[kb, t, kh, d])
        t += 1


@njit(inline="always", **_OPTS)
def _fold(s, w, A, stride, c, softcap, ibuf, fbuf, m, l, acc):
    """The chunk's c scores of each of the A query heads (s[a * stride:][:c]) into weights
    (w, same places): soft cap, the chunk's maximum, one rescale of the head's running sum and
    weighted values, exp."""
    D = acc.shape[1]
    for a in range(A):
        o = a * stride
        x = s[o : o + c]
        if softcap > np.float32(0.0):
            for i in range(c):
                x[i] = softcap * np.tanh(x[i] / softcap)
        top = x[0]
        for i in range(1, c):
            top = max(top, x[i])
        new_m = max(m[a], top)
        for i in range(c):
            x[i] -= new_m
        e = w[o : o + c]
        _exp_into(x, c, ibuf, fbuf, e)
        total = np.float32(0.0)
        for i in range(c):
            total += e[i]
        if new_m > m[a]:
            corr = np.float32(np.exp(m[a] - new_m))
            l[a] *= corr
            for d in range(D):
                acc[a, d] *= corr
            m[a] = new_m
        l[a] += total


@njit(**_OPTS)
def _decode_task(q, rows, keys, values, table, lens, heads_per_task, window, softcap, out, task):
    """One task of _decode: sequence task // per_seq, KV heads h0 .. h0+heads_per_task-1. The
    context is walked in chunks of CHUNK_TOKENS (whole blocks): the chunk's scores for all the
    task's query heads, one maximum and rescale per head, the exps, then the weighted values."""
    H = q.shape[1]
    D = q.shape[2]
    bs = keys.shape[1]
    KVH = keys.shape[2]
    G = H // KVH
    A = heads_per_task * G  # the task's query heads
    per_seq = KVH // heads_per_task
    b = task // per_seq
    h0 = (task % per_seq) * heads_per_task
    row = rows[b]
    length = lens[b]
    chunk_blocks = max(1, CHUNK_TOKENS // bs)
    stride = chunk_blocks * bs
    s = np.empty(A * stride, np.float32)
    w = np.empty(A * stride, np.float32)
    ibuf = np.empty(stride, np.uint32)
    fbuf = ibuf.view(np.float32)
    qg = np.empty((A, D), np.float32)
    m = np.full(A, _LOWEST, np.float32)
    l = np.zeros(A, np.float32)
    acc = np.zeros((A, D), np.float32)
    for a in range(A):
        for d in range(D):
            qg[a, d] = q[row, h0 * G + a, d]
    begin = max(0, length - window) if window > 0 else 0  # the first token attended
    first, end = begin // bs, (length + bs - 1) // bs  # the blocks read
    for j0 in range(first, end, chunk_blocks):
        j1 = min(end, j0 + chunk_blocks)
        col = 0
        for j in range(j0, j1):
            n = min(bs, length - j * bs)
            t0 = max(0, begin - j * bs)
            ahead = np.int64(table[b, j + 1]) if j + 1 < end else np.int64(-1)
            _scores(qg, heads_per_task, G, keys, table[b, j], h0, t0, n, s, stride, col, values, ahead)
            col += n - t0
        _fold(s, w, A, stride, col, softcap, ibuf, fbuf, m, l, acc)
        col = 0
        for j in range(j0, j1):
            n = min(bs, length - j * bs)
            t0 = max(0, begin - j * bs)
            if j + chunk_blocks < end:  # the next chunk's keys, while this one's values are summed
                for r in range(bs):
                    _prefetch_row(keys, np.int64(table[b, j + chunk_blocks]), r)
            if D % 8 == 0:
                _weigh_lanes(w, heads_per_task, G, values, table[b, j], h0, t0, n, stride, col, acc)
            else:
                _weigh(w, heads_per_task, G, values, table[b, j], h0, t0, n, stride, col, acc)
            col += n - t0
    for a in range(A):
        inv = np.float32(1.0) / l[a]
        base = (h0 * G + a) * D
        for d in range(D):
            out[row, base + d] = acc[a, d] * inv


@njit(parallel=True, **_OPTS)
def _decode(q, rows, keys, values, table, lens, heads_per_task, window, softcap, out):
    """q [T, heads, D] scaled queries; rows [B] the batch rows of the decodes; keys/values
    [blocks, bs, kv_heads, D]; table [B, W] block ids; lens [B] context lengths; out [T, heads * D].
    A task is one sequence and heads_per_task of its KV heads (a divisor of kv_heads).
    window > 0: only the last `window` tokens of each context; softcap > 0: capped scores."""
    tasks = rows.shape[0] * (keys.shape[2] // heads_per_task)
    for task in prange(tasks):
        _decode_task(q, rows, keys, values, table, lens, heads_per_task, window, softcap, out, task)


@njit(**_OPTS)
def _decode_serial(q, rows, keys, values, table, lens, heads_per_task, window, softcap, out):
    """_decode on the calling thread alone: with one kernel thread a parallel region still costs
    a round trip through numba's thread pool (55 us with its workqueue layer, ten times the
    attention of a 16-token context)."""
    tasks = rows.shape[0] * (keys.shape[2] // heads_per_task)
    for task in range(tasks):
        _decode_task(q, rows, keys, values, table, lens, heads_per_task, window, softcap, out, task)


def kernel_view(cache: np.ndarray) -> np.ndarray:
    """A cache array as the kernels read it: float32 as is, float16 bits as uint16, bfloat16
    bits (held as uint16) as int16 (see _f32)."""
    if cache.dtype == np.float32:
        return cache
    if cache.dtype == np.float16:
        return cache.view(np.uint16)
    if cache.dtype == np.uint16:
        return cache.view(np.int16)
    raise TypeError(f"no attention kernel for a {cache.dtype} KV cache")


def paged_decode_attention(q: np.ndarray, rows: np.ndarray, keys: np.ndarray, values: np.ndarray,
                           block_table: np.ndarray, context_lens: np.ndarray, out: np.ndarray,
                           window: int = 0, softcap: float = 0.0) -> None:
    """out[rows[b]] = attention of query q[rows[b]] (already scaled) over the first
    context_lens[b] tokens of the blocks block_table[b], for every decode b; with window > 0
    over the last `window` of them only; softcap > 0 caps the scores at +-softcap (tanh).

    q [T, heads, head_dim] float32; keys, values one layer's [blocks, block_size, kv_heads,
    head_dim] (float32, float16, or bfloat16 bits as uint16); out [T, heads * head_dim]."""
    keys, values = kernel_view(keys), kernel_view(values)
    kv_heads = keys.shape[2]
    # one task per sequence reads its blocks whole (13% faster out of cache than per head);
    # with fewer sequences than threads, a task per KV head keeps the threads busy
    # (kernels.num_threads, not numba.get_num_threads: that call alone took 3-6 us, and the
    # context sum below as much, against 20-50 us for a short context's whole attention)
    threads = kernels.num_threads()
    # a parallel region costs more than a few short contexts' attention (see
    # kernels.PARALLEL_MIN_WORK): the work is the keys read times the query heads' width
    if threads > 1 and int(context_lens.sum()) * q.shape[1] * q.shape[2] < kernels.PARALLEL_MIN_WORK:
        threads = 1
    heads_per_task = kv_heads if threads == 1 or len(rows) >= 4 * threads else 1
    kernel = _decode if threads > 1 else _decode_serial
    kernel(np.ascontiguousarray(q), rows, keys, values, block_table, context_lens, heads_per_task,
           int(window or 0), np.float32(softcap or 0.0), out)


def warm_up(cache_dtype: np.dtype) -> float:
    """Compile (or load from the disk cache) the kernel for a cache of this element type, and
    return the seconds taken, so that no request pays for compilation."""
    start = time.perf_counter()
    keys = np.zeros((2, 16, 1, 8), dtype=cache_dtype)
    q = np.zeros((2, 2, 8), dtype=np.float32)
    out = np.empty((2, 16), dtype=np.float32)
    args = (q, np.arange(2), keys, keys, np.zeros((2, 2), np.int32), np.array([1, 20], np.int32), out)
    paged_decode_attention(*args)  # the serial version (a small example)
    saved, kernels.PARALLEL_MIN_WORK = kernels.PARALLEL_MIN_WORK, 0  # and with threads, the parallel one
    try:
        paged_decode_attention(*args)
    finally:
        kernels.PARALLEL_MIN_WORK = saved
    return time.perf_counter() - start


# --kv-cache-dtype -> the cache arrays' element type (numpy has no bfloat16: its bits as uint16)
KV_CACHE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                   "bfloat16": np.dtype(np.uint16)}


def to_cache(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 values as a cache's element type, rounded to nearest even (NaN stays NaN)."""
    if dtype != np.uint16:
        return x.astype(dtype, copy=False)
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def to_float32(x: np.ndarray) -> np.ndarray:
    """Cache contents as float32 (the prefill path, which multiplies with BLAS)."""
    if x.dtype != np.uint16:
        return x.astype(np.float32, copy=False)
    return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
