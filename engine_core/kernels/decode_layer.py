"""One decoder layer for a step of a few decoding tokens in one compiled call.

A step that decodes one sequence's token spends a tenth of its time in Python between the
layer's dozen kernel calls (SmolLM2 at one thread: 1.7 ms of a 15.8 ms step, measured by
replaying the step's 394 kernel calls alone). `decode_layer` runs the same serial kernels in the
same order from inside one compiled function: RMSNorm (with the residual add), the QKV GEMV,
RoPE, the K/V cache write, paged attention, the output GEMV, the second norm, gate/up, SiLU-gated
product and the down GEMV, whose output the next layer adds to the residual stream.

It covers the plain Llama-style layer (no biases, no QK norm, no sandwich norms, SiLU, one
weight per projection in a block or 16-bit format, a float32 KV cache, float32 activations) for
a step whose tokens are all decodes, as many as the layer's GEMVs take (kernels.gemv_max_rows):
the model calls it only then and runs its general path otherwise. Several rows read each weight
once (the GEMVs' many-rows form), and the GEMVs split between threads by the weight's size
(FUSED_PARALLEL_MIN_WORK), not by the rows: at two threads two streams decoded 63 tok/s through
the general path (whose GEMVs split from 4M multiply-adds) against 106 for one stream here.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, types
from numba.extending import overload

from engine_core.kernels import _numba as nk
from engine_core.kernels import attention as att
from engine_core.kernels import elementwise as ew

_OPTS = dict(cache=True, fastmath=True, nogil=True)

# decode_layer holds parallel regions (its GEMVs split on more threads), and compiled code that
# holds them crashes unless numba's thread pool was started from Python first: asking for the
# thread count starts it.
numba.get_num_threads()


@njit(inline="always", **_OPTS)
def _parts(tiles, rows, cols, threads, min_work):
    """Threads for a GEMV of rows x cols (its tiles split between them), as kernels._gemv picks."""
    return min(threads, tiles) if rows * cols >= min_work else 1


def _gemv_any(w, x, out, threads, min_work):
    """out = x @ W.T for a weight given as the tuple of weight_args (compiled per format), its
    tiles split over `threads` threads when the weight has at least min_work elements."""


@overload(_gemv_any)
def _gemv_any_impl(w, x, out, threads, min_work):
    codes = w.types[0]
    if codes.dtype == types.uint16:  # F16 / BF16 bits
        def half(w, x, out, threads, min_work):
            T = w[0].shape[0]
            parts = _parts(T, T * w[0].shape[2], x.shape[1], threads, min_work)
            if parts > 1:
                nk.gemv_half_parallel(w[0], w[7], x, out, parts)
            else:
                nk.gemv_half(w[0], w[7], x, out, 0, T)
        return half
    if codes.dtype == types.uint8:  # 4-bit codes, two to a byte
        def nibbles(w, x, out, threads, min_work):
            xs = np.empty((x.shape[0], x.shape[1] // w[5]), np.float32)
            nk.group_sums(x, w[5], xs)
            T = w[0].shape[0]
            parts = _parts(T, T * w[0].shape[2], x.shape[1], threads, min_work)
            if parts > 1:
                nk.gemv_nibbles_parallel(w[0], w[1], w[2], w[3], w[4], w[6], x, xs, out, parts)
            else:
                nk.gemv_nibbles(w[0], w[1], w[2], w[3], w[4], w[6], x, xs, out, 0, T)
        return nibbles

    def byte_codes(w, x, out, threads, min_work):
        xs = np.empty((x.shape[0], x.shape[1] // w[5]), np.float32)
        nk.group_sums(x, w[5], xs)
        T = w[0].shape[0]
        parts = _parts(T, T * w[0].shape[2], x.shape[1], threads, min_work)
        if parts > 1:
            nk.gemv_bytes_parallel(w[0], w[1], w[2], w[3], w[4], w[5], w[6], x, xs, out, parts)
        else:
            nk.gemv_bytes(w[0], w[1], w[2], w[3], w[4], w[5], w[6], x, xs, out, 0, T)
    return byte_codes


def weight_args(w) -> tuple:
    """A QuantizedWeight as the tuple decode_layer takes."""
    return (w.codes, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super, w.qtype == "BF16")


@njit(**_OPTS)
def decode_layer(x, pending, first, attn_norm, mlp_norm, eps, qkv, o, gate_up, down, num_heads,
                 num_kv_heads, inter, cos, sin, positions, keys, values, slots, rows, table, lens,
                 scale, window, softcap, next_pending, threads, min_work):
    """x [M, hidden] the residual stream of M decoding tokens (updated in place: += pending,
    += attention output); pending [M, hidden] the previous layer's MLP output (ignored when
    `first`); the four weights as weight_args tuples; keys/values this layer's cache [blocks, bs,
    kv_heads, D] (float32); slots [M] the new tokens' cache slots; rows/table/lens as
    paged_decode_attention takes them. Writes this layer's MLP output into next_pending."""
    M = x.shape[0]
    hidden = x.shape[1]
    D = keys.shape[3]
    bs = keys.shape[1]
    nq = num_heads * D
    nkv = num_kv_heads * D
    h = np.empty((M, hidden), np.float32)
    if first:
        ew._rms_norm(x, attn_norm, eps, h, 0, M)
    else:
        ew._add_rms_norm(x, pending, attn_norm, eps, h, 0, M)
    qkv_out = np.empty((M, qkv[0].shape[0] * qkv[0].shape[2]), np.float32)
    _gemv_any(qkv, h, qkv_out, threads, min_work)
    qk = qkv_out[:, : nq + nkv].copy().reshape((M, num_heads + num_kv_heads, D))
    ew._rope(qk, positions, cos, sin, 0, M)
    for m in range(M):
        b, t = slots[m] // bs, slots[m] % bs
        for i in range(num_kv_heads):
            for d in range(D):
                keys[b, t, i, d] = qk[m, num_heads + i, d]
                values[b, t, i, d] = qkv_out[m, nq + nkv + i * D + d]
    q = np.empty((M, num_heads, D), np.float32)
    for m in range(M):
        for i in range(num_heads):
            for d in range(D):
                q[m, i, d] = qk[m, i, d] * scale
    attn = np.empty((M, nq), np.float32)
    att._decode_serial(q, rows, keys, values, table, lens, num_kv_heads, window, softcap, attn)
    o_out = np.empty((M, o[0].shape[0] * o[0].shape[2]), np.float32)
    _gemv_any(o, attn, o_out, threads, min_work)
    h2 = np.empty((M, hidden), np.float32)
    ew._add_rms_norm(x, o_out[:, :hidden].copy(), mlp_norm, eps, h2, 0, M)
    gu = np.empty((M, gate_up[0].shape[0] * gate_up[0].shape[2]), np.float32)
    _gemv_any(gate_up, h2, gu, threads, min_work)
    act = np.empty((M, inter), np.float32)
    ew._silu_mul(gu, inter, act, 0, M)
    out = np.empty((M, down[0].shape[0] * down[0].shape[2]), np.float32)
    _gemv_any(down, act, out, threads, min_work)
    for m in range(M):
        for j in range(hidden):
            next_pending[m, j] = out[m, j]
