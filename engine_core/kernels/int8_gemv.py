"""GEMV with int8 activations for the 4-bit formats (Q4_0, Q4_1, Q4_K): opt-in, as llama.cpp does.

The activations are quantized per group of 32 inputs to integers q in [-127, 127] with a scale
dx = amax / 127 (quantize_rows), and a group's contribution to output row r becomes
    scale[r] * dx * sum_k code[k, r] * q[k]  +  offset[r] * dx * sum_k q[k]
The code sum is integer math: 16 products of a 4-bit code (0..15) and q add up to at most
16 * 15 * 127 = 30480, which fits int16, so a group keeps int16 sums per output row (over the 16
low nibbles of its bytes, inputs k, and over the 16 high nibbles, inputs k + 16), vectorized over
the tile's rows at 16 lanes an AVX2 register (vpmullw/vpaddw) instead of 8 float32 lanes, and
widens them to float once a group.
The offset term uses the sum of the dequantized inputs (dx * sum q), not of the original ones: the
result is then exactly W @ dequantized(x) up to float rounding, whose error sum_k w[k] e[k] has no
part that grows with the codes' mean (with the original sum, the error is scale * sum_k code[k]
e[k], which for codes centred near 8 carries 7.5 * scale * sum_k e[k]). Measured on SmolLM2's Q4_1
projections (layers 0-1, random activations): 2.0-2.7x smaller mean error than the original sum.

Writing the row loop outermost with the 16 code rows of a group inside keeps the sums in registers
for the whole group (each np.int16(...) truncation tells LLVM 16 bits suffice: numba would widen
small ints to int64). A tile's int16 sums for all groups are made first and scaled into float32
afterwards, in a second loop: with the float math in the same loop LLVM vectorized the integer
part at 8 lanes, and with it in a loop right after each group's sums a 4096 x 4096 Q4_K ran 1.5x
slower (128 groups of int16 sums are 32 KB, in L1).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from engine_core.kernels._numba import to_f32

_OPTS = dict(cache=True, fastmath=True, nogil=True)


@njit(cache=True, nogil=True)
def quantize_rows(x, xq, dx, xs):
    """x float32 [M, K] -> xq int16 [M, K] in [-127, 127] per group of 32, dx float32 [M, K // 32]
    the groups' scales and xs float32 [M, K // 32] their dequantized sums (dx * sum q). No fastmath:
    tests reproduce it bit for bit in numpy (round half to even, 127 / amax in float32)."""
    M, K = x.shape
    for m in range(M):
        for g in range(K // 32):
            amax = np.float32(0.0)
            for k in range(g * 32, g * 32 + 32):
                amax = max(amax, abs(x[m, k]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            total = np.int32(0)
            for k in range(g * 32, g * 32 + 32):
                q = np.int32(np.rint(x[m, k] * inv))
                xq[m, k] = np.int16(q)
                total += q
            dx[m, g] = d
            xs[m, g] = d * np.float32(total)


@njit(inline="always", **_OPTS)
def _word_sums(cw, g, xq, m, lows, highs):
    """lows[r], highs[r] = the int16 sums of group g of a tile times row m of the quantized
    activations, over the low nibbles of its 16 code rows (inputs k) and over the high ones
    (inputs k + 16). The codes are read as 16-bit words (cw [K // 2, 32]: word w holds the bytes
    of rows 2w and 2w + 1), which spares the byte-to-word widening: 8 vector operations per 32
    weights instead of 10 (1.2-1.3x faster on SmolLM2's shapes); the even and odd rows' sums are
    interleaved back into row order as they are stored (an epilogue reading them, the scales and
    the running sums at a stride of two cost 8-20% more). The four sums advance together, one code
    row at a time: written out one whole sum after another, the 16 loaded code rows stayed live
    and spilled (7-10% slower). The 16 code rows are written out: as a loop over them LLVM did not
    vectorize the rows (measured 8x slower). Only 16-bit values here: LLVM picks its vector width
    by the widest type, and a float32 in this loop halved it (8 lanes)."""
    W = cw.shape[1]
    b = g * 16
    k = g * 32
    xl0, xl1, xl2, xl3 = np.int16(xq[m, k + 0]), np.int16(xq[m, k + 1]), np.int16(xq[m, k + 2]), np.int16(xq[m, k + 3])
    xl4, xl5, xl6, xl7 = np.int16(xq[m, k + 4]), np.int16(xq[m, k + 5]), np.int16(xq[m, k + 6]), np.int16(xq[m, k + 7])
    xl8, xl9, xla, xlb = np.int16(xq[m, k + 8]), np.int16(xq[m, k + 9]), np.int16(xq[m, k + 10]), np.int16(xq[m, k + 11])
    xlc, xld, xle, xlf = np.int16(xq[m, k + 12]), np.int16(xq[m, k + 13]), np.int16(xq[m, k + 14]), np.int16(xq[m, k + 15])
    xh0, xh1, xh2, xh3 = np.int16(xq[m, k + 16]), np.int16(xq[m, k + 17]), np.int16(xq[m, k + 18]), np.int16(xq[m, k + 19])
    xh4, xh5, xh6, xh7 = np.int16(xq[m, k + 20]), np.int16(xq[m, k + 21]), np.int16(xq[m, k + 22]), np.int16(xq[m, k + 23])
    xh8, xh9, xha, xhb = np.int16(xq[m, k + 24]), np.int16(xq[m, k + 25]), np.int16(xq[m, k + 26]), np.int16(xq[m, k + 27])
    xhc, xhd, xhe, xhf = np.int16(xq[m, k + 28]), np.int16(xq[m, k + 29]), np.int16(xq[m, k + 30]), np.int16(xq[m, k + 31])
    f, s4, s8, s12 = np.uint16(15), np.uint16(4), np.uint16(8), np.uint16(12)
    for rw in range(W):
        sel = seh = sol = soh = np.int16(0)
        w = cw[b + 0, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl0))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh0))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl0))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh0))
        w = cw[b + 1, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl1))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh1))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl1))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh1))
        w = cw[b + 2, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl2))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh2))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl2))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh2))
        w = cw[b + 3, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl3))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh3))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl3))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh3))
        w = cw[b + 4, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl4))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh4))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl4))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh4))
        w = cw[b + 5, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl5))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh5))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl5))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh5))
        w = cw[b + 6, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl6))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh6))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl6))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh6))
        w = cw[b + 7, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl7))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh7))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl7))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh7))
        w = cw[b + 8, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl8))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh8))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl8))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh8))
        w = cw[b + 9, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xl9))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xh9))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xl9))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xh9))
        w = cw[b + 10, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xla))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xha))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xla))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xha))
        w = cw[b + 11, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xlb))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xhb))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xlb))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xhb))
        w = cw[b + 12, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xlc))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xhc))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xlc))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xhc))
        w = cw[b + 13, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xld))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xhd))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xld))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xhd))
        w = cw[b + 14, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xle))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xhe))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xle))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xhe))
        w = cw[b + 15, rw]
        sel = np.int16(sel + np.int16(np.int16(w & f) * xlf))
        seh = np.int16(seh + np.int16(np.int16((w >> s4) & f) * xhf))
        sol = np.int16(sol + np.int16(np.int16((w >> s8) & f) * xlf))
        soh = np.int16(soh + np.int16(np.int16(w >> s12) * xhf))
        lows[2 * rw] = sel
        lows[2 * rw + 1] = sol
        highs[2 * rw] = seh
        highs[2 * rw + 1] = soh


@njit(inline="always", **_OPTS)
def _word_group(t, g, gps, d, sc, dmin, mn, dx, xs, m, lows, highs, acc):
    """acc[r] += the sums of _word_sums times group g's scales, plus its offset term."""
    R = acc.shape[0]
    s = g // gps
    step = dx[m, g]
    total = xs[m, g]
    for r in range(R):
        dot = np.float32(np.int32(lows[r]) + np.int32(highs[r]))
        if sc is None:
            scale = to_f32(d[t, s, r])
        else:
            scale = to_f32(d[t, s, r]) * np.float32(np.int32(sc[t, g, r]))
        acc[r] += dot * (scale * step)
        if dmin is not None:
            if mn is None:
                acc[r] += to_f32(dmin[t, s, r]) * total
            else:
                acc[r] += to_f32(dmin[t, s, r]) * np.float32(np.int32(mn[t, g, r])) * total


@njit(**_OPTS)
def _gemv_tiles(codes, d, sc, dmin, mn, gps, xq, dx, xs, out, t0, t1):
    """out[:, tiles t0..t1] = dequantized(x) @ W.T for 4-bit codes; x given by quantize_rows."""
    R = codes.shape[2]
    M, K = xq.shape
    G = K // 32
    words = codes.view(np.uint16)
    acc = np.empty(R, np.float32)
    lows = np.empty((G, R), np.int16)
    highs = np.empty((G, R), np.int16)
    for t in range(t0, t1):
        cw = words[t]
        for m in range(M):
            for g in range(G):
                _word_sums(cw, g, xq, m, lows[g], highs[g])
            acc[:] = 0
            for g in range(G):
                _word_group(t, g, gps, d, sc, dmin, mn, dx, xs, m, lows[g], highs[g], acc)
            for r in range(R):
                out[m, t * R + r] = acc[r]


@njit(**_OPTS)
def _quantized(x):
    M, K = x.shape
    xq = np.empty((M, K), np.int16)
    dx = np.empty((M, K // 32), np.float32)
    xs = np.empty((M, K // 32), np.float32)
    quantize_rows(x, xq, dx, xs)
    return xq, dx, xs


# The entry points take float32 x and quantize it themselves: one compiled call a matmul (three
# numpy allocations and a second call cost 3-6 us, 5-10% of SmolLM2's smaller GEMVs).


@njit(**_OPTS)
def gemv_nibbles_int8(codes, d, sc, dmin, mn, gps, x, out, t0, t1):
    """out[:, tiles t0..t1] = x @ W.T for 4-bit codes, with x quantized per 32 values to int8."""
    xq, dx, xs = _quantized(x)
    _gemv_tiles(codes, d, sc, dmin, mn, gps, xq, dx, xs, out, t0, t1)


@njit(parallel=True, **_OPTS)
def gemv_nibbles_int8_parallel(codes, d, sc, dmin, mn, gps, x, out, parts):
    xq, dx, xs = _quantized(x)
    T = codes.shape[0]
    for p in prange(parts):
        _gemv_tiles(codes, d, sc, dmin, mn, gps, xq, dx, xs, out, p * T // parts, (p + 1) * T // parts)
