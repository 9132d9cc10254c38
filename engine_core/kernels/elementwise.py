"""The row-wise steps of a layer between its matmuls, compiled with numba: RMSNorm (with the
residual add before it fused in), rotate-half RoPE in place, and the SiLU-gated product.

In numpy each of these is five to eight calls with a temporary array each (about 1.5 us a call
for a single token, so about 40 us a layer); here each is one call, and with more than one kernel
thread and enough rows the rows are split over the threads. Each row is computed by the same code
whatever the batch, so a sequence's results do not depend on what else is in it.

    rms_norm(x, weight, eps)              -> new array
    add_rms_norm(x, delta, weight, eps)   x += delta in place; -> rms_norm(x)
    rope_(qk, positions, cos, sin)        rotate-half RoPE of every head of qk [T, heads, D] in place
    silu_mul(gate_up, inter)              -> SiLU(gate) * up, gate_up [T, 2 * inter]
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import engine_core.kernels as kernels
from engine_core.kernels.attention import _exp_into

_OPTS = dict(cache=True, fastmath=True, nogil=True)

# Rows from which a step's row-wise kernels split over the threads, and the elements a call must
# touch: below them a parallel region (10-50 us) costs more than the rows.
PARALLEL_MIN_ROWS = 8
PARALLEL_MIN_ELEMENTS = 1 << 16


@njit(inline="always", **_OPTS)
def _norm_row(x, w, eps, out, i):
    H = x.shape[1]
    ss = np.float32(0.0)
    for j in range(H):
        ss += x[i, j] * x[i, j]
    scale = np.float32(1.0) / np.sqrt(ss / np.float32(H) + eps)
    for j in range(H):
        out[i, j] = x[i, j] * scale * w[j]


@njit(**_OPTS)
def _rms_norm(x, w, eps, out, r0, r1):
    for i in range(r0, r1):
        _norm_row(x, w, eps, out, i)


@njit(parallel=True, **_OPTS)
def _rms_norm_parallel(x, w, eps, out, parts):
    T = x.shape[0]
    for p in prange(parts):
        _rms_norm(x, w, eps, out, p * T // parts, (p + 1) * T // parts)


@njit(inline="always", **_OPTS)
def _add_norm_row(x, delta, w, eps, out, i):
    for j in range(x.shape[1]):
        x[i, j] += delta[i, j]
    _norm_row(x, w, eps, out, i)


@njit(**_OPTS)
def _add_rms_norm(x, delta, w, eps, out, r0, r1):
    for i in range(r0, r1):
        _add_norm_row(x, delta, w, eps, out, i)


@njit(parallel=True, **_OPTS)
def _add_rms_norm_parallel(x, delta, w, eps, out, parts):
    T = x.shape[0]
    for p in prange(parts):
        _add_rms_norm(x, delta, w, eps, out, p * T // parts, (p + 1) * T // parts)


@njit(inline="always", **_OPTS)
def _rope_row(qk, positions, cos, sin, t):
    half = cos.shape[1]
    p = positions[t]
    for h in range(qk.shape[1]):
        for d in range(half):
            a = qk[t, h, d]
            b = qk[t, h, d + half]
            c = cos[p, d]
            s = sin[p, d]
            qk[t, h, d] = a * c - b * s
            qk[t, h, d + half] = b * c + a * s


@njit(**_OPTS)
def _rope(qk, positions, cos, sin, r0, r1):
    for t in range(r0, r1):
        _rope_row(qk, positions, cos, sin, t)


@njit(parallel=True, **_OPTS)
def _rope_parallel(qk, positions, cos, sin, parts):
    T = qk.shape[0]
    for p in prange(parts):
        _rope(qk, positions, cos, sin, p * T // parts, (p + 1) * T // parts)


@njit(**_OPTS)
def _silu_mul(gate_up, inter, out, r0, r1):
    """out[t] = SiLU(gate) * up for rows [r0, r1). sigmoid(g) from e = exp(-|g|) <= 1 (the
    attention's polynomial exp: numba has no vector exp): 1 / (1 + e) for g >= 0, e / (1 + e)
    below."""
    neg = np.empty(inter, np.float32)
    e = np.empty(inter, np.float32)
    ibuf = np.empty(inter, np.uint32)
    fbuf = ibuf.view(np.float32)
    for t in range(r0, r1):
        for i in range(inter):
            neg[i] = -abs(gate_up[t, i])
        _exp_into(neg, inter, ibuf, fbuf, e)
        for i in range(inter):
            g = gate_up[t, i]
            sig = (np.float32(1.0) if g >= np.float32(0.0) else e[i]) / (np.float32(1.0) + e[i])
            out[t, i] = g * sig * gate_up[t, inter + i]


@njit(parallel=True, **_OPTS)
def _silu_mul_parallel(gate_up, inter, out, parts):
    T = gate_up.shape[0]
    for p in prange(parts):
        _silu_mul(gate_up, inter, out, p * T // parts, (p + 1) * T // parts)


# Each kernel comes as a serial function over a range of rows and a parallel one that gives each
# thread a run of rows of that same serial function: a row's result is the same bits whichever
# runs it (a loop compiled inside a prange is vectorized differently, and rows differed in the
# last bit between a batch and a single sequence).


def _run(serial, parallel, rows: int, *args) -> None:
    threads = kernels.num_threads()  # numba.get_num_threads() costs ~2 us a call
    if rows >= PARALLEL_MIN_ROWS and threads > 1 and args[0].size >= PARALLEL_MIN_ELEMENTS:
        parallel(*args, threads)
    else:
        serial(*args, 0, rows)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, H] float32 normalized by its root mean square per row, times weight [H]."""
    out = np.empty_like(x)
    _run(_rms_norm, _rms_norm_parallel, len(x), np.ascontiguousarray(x), weight, np.float32(eps), out)
    return out


def add_rms_norm(x: np.ndarray, delta: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x += delta (the residual stream, in place; x contiguous), then rms_norm(x)."""
    out = np.empty_like(x)
    _run(_add_rms_norm, _add_rms_norm_parallel, len(x), x, np.ascontiguousarray(delta), weight,
         np.float32(eps), out)
    return out


def rope_(qk: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate-half RoPE in place on qk [T, heads, D] (a view is fine: its last axis contiguous),
    token t at positions[t] of the [max_len, D / 2] tables."""
    _run(_rope, _rope_parallel, len(qk), qk, positions, cos, sin)


def silu_mul(gate_up: np.ndarray, inter: int) -> np.ndarray:
    """SiLU(gate_up[:, :inter]) * gate_up[:, inter:] as a new [T, inter] array."""
    out = np.empty((gate_up.shape[0], inter), dtype=np.float32)
    _run(_silu_mul, _silu_mul_parallel, len(gate_up), gate_up, inter, out)
    return out


def warm_up() -> None:
    """Compile (or load from the disk cache) each kernel for the layouts the model passes."""
    x = np.ones((2, 8), dtype=np.float32)
    w = np.ones(8, dtype=np.float32)
    rms_norm(x, w, 1e-5)
    add_rms_norm(x, x.copy(), w, 1e-5)
    qkv = np.ones((2, 3 * 8), dtype=np.float32)
    table = np.ones((4, 2), dtype=np.float32)
    rope_(qkv[:, :16].reshape(2, 4, 4), np.zeros(2, dtype=np.int64), table, table)
    silu_mul(np.ones((2, 8), dtype=np.float32), 4)
