"""The numba kernels over the tiled layout of formats.py. Compiled for the host CPU, cached on disk.

Conventions: x [M, K] float32 activations; xs [M, groups] their sums per group (for the offset
term); out [M, tiles * TILE_ROWS]. A group's contribution to row r is
    scale[r] * sum_k code[k, r] * x[k]  +  offset[r] * sum_k x[k]
so the inner loop is a multiply-add of integer codes (converted to float32) by one input value,
vectorized over the tile's rows. The high nibble is taken as `byte & 0xF0` with its input
pre-divided by 16 (exact: a power of two), which spares a shift the compiler widened to 64 bits.
Integer operations are on int32 values: numba widens small ints to int64, and AVX2 cannot
convert int64 vectors to float.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_OPTS = dict(cache=True, fastmath=True, nogil=True)


def widen_16bit(builder, bits, dtype):
    """LLVM IR: 16-bit stored values (an i16 or a vector of them) as float32 by their numba
    element type: uint16, float16 bits (half-to-float extension); int16, bfloat16 bits (the
    upper half of a float32). Shared by to_f32 (one value) and lanes.vload (eight)."""
    count = bits.type.count if isinstance(bits.type, ir.VectorType) else None

    def shaped(t):
        return ir.VectorType(t, count) if count else t
    if dtype == types.uint16:
        return builder.fpext(builder.bitcast(bits, shaped(ir.HalfType())), shaped(ir.FloatType()))
    i32 = shaped(ir.IntType(32))
    wide = builder.shl(builder.zext(bits, i32), ir.Constant(i32, [16] * count if count else 16))
    return builder.bitcast(wide, shaped(ir.FloatType()))


@intrinsic
def to_f32(typingctx, v):
    """A stored value as float32, by its array's element type: float32 as is; uint16, float16
    bits (LLVM's half-to-float extension: one vcvtph2ps for a vector on x86 with F16C, exact for
    every value, inf and NaN included); int16, bfloat16 bits (the upper half of a float32). A
    kernel is compiled once per element type and converts in registers as it reads (the KV
    cache's 16-bit types; the block formats' float16 scales)."""
    if v == types.float32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if v in (types.uint16, types.int16):
        return types.float32(v), lambda context, builder, sig, args: widen_16bit(builder, args[0], v)
    return None


@njit(inline="always", **_OPTS)
def _group_scales(t, g, gps, d, sc, dmin, mn, scale, offset):
    """scale[r], offset[r] of group g in tile t (see formats.QuantizedWeight)."""
    s = g // gps
    R = scale.shape[0]
    if sc is None:
        for r in range(R):
            scale[r] = to_f32(d[t, s, r])
    else:
        for r in range(R):
            scale[r] = to_f32(d[t, s, r]) * np.float32(sc[t, g, r])
    if dmin is None:
        offset[:] = 0
    elif mn is None:
        for r in range(R):
            offset[r] = to_f32(dmin[t, s, r])
    else:
        for r in range(R):
            offset[r] = to_f32(dmin[t, s, r]) * np.float32(mn[t, g, r])


@njit(inline="always", **_OPTS)
def _add_group(acc, tmp, t, g, gps, d, sc, dmin, mn, s):
    """acc += scale * tmp + offset * s for group g of tile t, the scales widened as they are read
    (one pass; see _group_scales for what they are)."""
    R = acc.shape[0]
    dd = d[t, g // gps]
    if dmin is None:
        if sc is None:
            for r in range(R):
                acc[r] += to_f32(dd[r]) * tmp[r]
        else:
            cs = sc[t, g]
            for r in range(R):
                acc[r] += (to_f32(dd[r]) * np.float32(cs[r])) * tmp[r]
        return
    dm = dmin[t, g // gps]
    if mn is None:
        if sc is None:
            for r in range(R):
                acc[r] += to_f32(dd[r]) * tmp[r] + to_f32(dm[r]) * s
        else:
            cs = sc[t, g]
            for r in range(R):
                acc[r] += (to_f32(dd[r]) * np.float32(cs[r])) * tmp[r] + to_f32(dm[r]) * s
        return
    cs, cm = sc[t, g], mn[t, g]
    for r in range(R):
        acc[r] += (to_f32(dd[r]) * np.float32(cs[r])) * tmp[r] + (to_f32(dm[r]) * np.float32(cm[r])) * s


@njit(inline="always", **_OPTS)
def _gemv_nibbles_row(codes, d, sc, dmin, mn, gps, x, xs, out, t0, t1):
    """out[tiles t0..t1] = W x for one row x [K] (xs [groups] its sums): four code rows a pass,
    the running sums loaded and stored once per four (15-20% faster than one by one), the
    scales widened in the pass that adds a group (a separate pass, as the many-rows form takes
    them, made the whole 25% slower)."""
    R = codes.shape[2]
    G = x.shape[0] // 32
    acc = np.empty(R, np.float32)
    tmp = np.empty(R, np.float32)
    q = np.float32(0.0625)
    lo, hi = np.int32(15), np.int32(240)
    for t in range(t0, t1):
        acc[:] = 0
        for g in range(G):
            tmp[:] = 0
            for j in range(0, 16, 4):
                k = g * 32 + j
                xl0, xh0 = x[k], x[k + 16] * q
                xl1, xh1 = x[k + 1], x[k + 17] * q
                xl2, xh2 = x[k + 2], x[k + 18] * q
                xl3, xh3 = x[k + 3], x[k + 19] * q
                c0, c1 = codes[t, g * 16 + j], codes[t, g * 16 + j + 1]
                c2, c3 = codes[t, g * 16 + j + 2], codes[t, g * 16 + j + 3]
                for r in range(R):
                    v0, v1, v2, v3 = np.int32(c0[r]), np.int32(c1[r]), np.int32(c2[r]), np.int32(c3[r])
                    tmp[r] += (np.float32(v0 & lo) * xl0 + np.float32(v0 & hi) * xh0
                               + np.float32(v1 & lo) * xl1 + np.float32(v1 & hi) * xh1
                               + np.float32(v2 & lo) * xl2 + np.float32(v2 & hi) * xh2
                               + np.float32(v3 & lo) * xl3 + np.float32(v3 & hi) * xh3)
            _add_group(acc, tmp, t, g, gps, d, sc, dmin, mn, xs[g])
        out[t * R : (t + 1) * R] = acc


@njit(inline="always", **_OPTS)
def _gemv_bytes_row(codes, d, sc, dmin, mn, gs, gps, x, xs, out, t0, t1):
    """out[tiles t0..t1] = W x for one row x and 8-bit codes in groups of gs (a multiple of 4),
    four code rows a pass (see _gemv_nibbles_row)."""
    R = codes.shape[2]
    G = x.shape[0] // gs
    acc = np.empty(R, np.float32)
    tmp = np.empty(R, np.float32)
    for t in range(t0, t1):
        acc[:] = 0
        for g in range(G):
            tmp[:] = 0
            for j in range(0, gs, 4):
                k = g * gs + j
                x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
                c0, c1, c2, c3 = codes[t, k], codes[t, k + 1], codes[t, k + 2], codes[t, k + 3]
                for r in range(R):
                    tmp[r] += (np.float32(np.int32(c0[r])) * x0 + np.float32(np.int32(c1[r])) * x1
                               + np.float32(np.int32(c2[r])) * x2 + np.float32(np.int32(c3[r])) * x3)
            _add_group(acc, tmp, t, g, gps, d, sc, dmin, mn, xs[g])
        out[t * R : (t + 1) * R] = acc


@njit(**_OPTS)
def group_sums(x, group, out):
    """out[m, g] = the sum of x[m, g * group : (g + 1) * group] (the offset term's input): one
    compiled call instead of numpy's reshape and reduction (4.5 us a call for one row)."""
    M, K = x.shape
    for m in range(M):
        for g in range(K // group):
            s = np.float32(0.0)
            for k in range(g * group, (g + 1) * group):
                s += x[m, k]
            out[m, g] = s


@njit(inline="always", **_OPTS)
def _gemv_nibbles_pair(codes, d, sc, dmin, mn, gps, x, xs, out, m, t, acc0, acc1, tmp0, tmp1):
    """Tile t of out[m] and out[m + 1]: _gemv_nibbles_row's sums, in its order, for two rows of x
    at a time, each code row read and widened once for both."""
    R = codes.shape[2]
    G = x.shape[1] // 32
    q = np.float32(0.0625)
    lo, hi = np.int32(15), np.int32(240)
    acc0[:] = 0
    acc1[:] = 0
    for g in range(G):
        tmp0[:] = 0
        tmp1[:] = 0
        for j in range(0, 16, 4):
            k = g * 32 + j
            al0, ah0, bl0, bh0 = x[m, k], x[m, k + 16] * q, x[m + 1, k], x[m + 1, k + 16] * q
            al1, ah1, bl1, bh1 = x[m, k + 1], x[m, k + 17] * q, x[m + 1, k + 1], x[m + 1, k + 17] * q
            al2, ah2, bl2, bh2 = x[m, k + 2], x[m, k + 18] * q, x[m + 1, k + 2], x[m + 1, k + 18] * q
            al3, ah3, bl3, bh3 = x[m, k + 3], x[m, k + 19] * q, x[m + 1, k + 3], x[m + 1, k + 19] * q
            c0, c1 = codes[t, g * 16 + j], codes[t, g * 16 + j + 1]
            c2, c3 = codes[t, g * 16 + j + 2], codes[t, g * 16 + j + 3]
            for r in range(R):
                v0, v1, v2, v3 = np.int32(c0[r]), np.int32(c1[r]), np.int32(c2[r]), np.int32(c3[r])
                l0, h0 = np.float32(v0 & lo), np.float32(v0 & hi)
                l1, h1 = np.float32(v1 & lo), np.float32(v1 & hi)
                l2, h2 = np.float32(v2 & lo), np.float32(v2 & hi)
                l3, h3 = np.float32(v3 & lo), np.float32(v3 & hi)
                tmp0[r] += (l0 * al0 + h0 * ah0 + l1 * al1 + h1 * ah1
                            + l2 * al2 + h2 * ah2 + l3 * al3 + h3 * ah3)
                tmp1[r] += (l0 * bl0 + h0 * bh0 + l1 * bl1 + h1 * bh1
                            + l2 * bl2 + h2 * bh2 + l3 * bl3 + h3 * bh3)
        _add_group(acc0, tmp0, t, g, gps, d, sc, dmin, mn, xs[m, g])
        _add_group(acc1, tmp1, t, g, gps, d, sc, dmin, mn, xs[m + 1, g])
    out[m, t * R : (t + 1) * R] = acc0
    out[m + 1, t * R : (t + 1) * R] = acc1


@njit(**_OPTS)
def gemv_nibbles(codes, d, sc, dmin, mn, gps, x, xs, out, t0, t1):
    """out[:, tiles t0..t1] = x @ W.T for 4-bit codes: rows of x two at a time sharing each read
    and widening of the codes (a tile's codes stay in cache for the next pair), an odd last row
    alone. SmolLM2's 3072 x 576 Q4_1 at 2 rows: 270 us when every row's sums were loaded and
    stored per code row, against 114 us for one row."""
    R = codes.shape[2]
    M = x.shape[0]
    if M == 1:
        _gemv_nibbles_row(codes, d, sc, dmin, mn, gps, x[0], xs[0], out[0], t0, t1)
        return
    acc0, acc1 = np.empty(R, np.float32), np.empty(R, np.float32)
    tmp0, tmp1 = np.empty(R, np.float32), np.empty(R, np.float32)
    for t in range(t0, t1):
        for m in range(0, M - 1, 2):
            _gemv_nibbles_pair(codes, d, sc, dmin, mn, gps, x, xs, out, m, t, acc0, acc1, tmp0, tmp1)
        if M % 2:
            _gemv_nibbles_row(codes, d, sc, dmin, mn, gps, x[M - 1], xs[M - 1], out[M - 1], t, t + 1)


@njit(inline="always", **_OPTS)
def _gemv_bytes_pair(codes, d, sc, dmin, mn, gs, gps, x, xs, out, m, t, acc0, acc1, tmp0, tmp1):
    """Tile t of out[m] and out[m + 1] for 8-bit codes: _gemv_bytes_row's sums, in its order, for
    two rows of x at a time (see _gemv_nibbles_pair)."""
    R = codes.shape[2]
    G = x.shape[1] // gs
    acc0[:] = 0
    acc1[:] = 0
    for g in range(G):
        tmp0[:] = 0
        tmp1[:] = 0
        for j in range(0, gs, 4):
            k = g * gs + j
            a0, a1, a2, a3 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3]
            b0, b1, b2, b3 = x[m + 1, k], x[m + 1, k + 1], x[m + 1, k + 2], x[m + 1, k + 3]
            c0, c1, c2, c3 = codes[t, k], codes[t, k + 1], codes[t, k + 2], codes[t, k + 3]
            for r in range(R):
                w0, w1 = np.float32(np.int32(c0[r])), np.float32(np.int32(c1[r]))
                w2, w3 = np.float32(np.int32(c2[r])), np.float32(np.int32(c3[r]))
                tmp0[r] += w0 * a0 + w1 * a1 + w2 * a2 + w3 * a3
                tmp1[r] += w0 * b0 + w1 * b1 + w2 * b2 + w3 * b3
        _add_group(acc0, tmp0, t, g, gps, d, sc, dmin, mn, xs[m, g])
        _add_group(acc1, tmp1, t, g, gps, d, sc, dmin, mn, xs[m + 1, g])
    out[m, t * R : (t + 1) * R] = acc0
    out[m + 1, t * R : (t + 1) * R] = acc1


@njit(**_OPTS)
def gemv_bytes(codes, d, sc, dmin, mn, gs, gps, x, xs, out, t0, t1):
    """out[:, tiles t0..t1] = x @ W.T for 8-bit codes in groups of gs: rows of x two at a time
    (see gemv_nibbles)."""
    R = codes.shape[2]
    M = x.shape[0]
    if M == 1:
        _gemv_bytes_row(codes, d, sc, dmin, mn, gs, gps, x[0], xs[0], out[0], t0, t1)
        return
    acc0, acc1 = np.empty(R, np.float32), np.empty(R, np.float32)
    tmp0, tmp1 = np.empty(R, np.float32), np.empty(R, np.float32)
    for t in range(t0, t1):
        for m in range(0, M - 1, 2):
            _gemv_bytes_pair(codes, d, sc, dmin, mn, gs, gps, x, xs, out, m, t, acc0, acc1, tmp0, tmp1)
        if M % 2:
            _gemv_bytes_row(codes, d, sc, dmin, mn, gs, gps, x[M - 1], xs[M - 1], out[M - 1], t, t + 1)


@njit(**_OPTS)
def dequantize_tiles(codes, nibbles, d, sc, dmin, mn, gs, gps, t0, t1, first, out):
    """Tiles [t0, t1) as float32 into out [K, cols], tile `first` at column 0 (the weight
    transposed: BLAS's B). Vectorized over each tile's rows, like the matrix-vector kernels."""
    R = codes.shape[2]
    K = out.shape[0]
    G = K // gs
    scale = np.empty(R, np.float32)
    scale16 = np.empty(R, np.float32)
    offset = np.empty(R, np.float32)
    for t in range(t0, t1):
        col = (t - first) * R
        for g in range(G):
            _group_scales(t, g, gps, d, sc, dmin, mn, scale, offset)
            if nibbles:
                for r in range(R):
                    scale16[r] = scale[r] * np.float32(0.0625)
                for j in range(16):
                    c = codes[t, g * 16 + j]
                    # slices, not out[k, col + r]: a sum of two indices may be negative for all
                    # numba knows, and its wraparound check stops the vectorization
                    a = out[g * 32 + j, col : col + R]
                    b = out[g * 32 + j + 16, col : col + R]
                    for r in range(R):
                        v = np.int32(c[r])
                        a[r] = scale[r] * np.float32(v & np.int32(15)) + offset[r]
                        b[r] = scale16[r] * np.float32(v & np.int32(240)) + offset[r]
            else:
                for j in range(gs):
                    c = codes[t, g * gs + j]
                    a = out[g * gs + j, col : col + R]
                    for r in range(R):
                        a[r] = scale[r] * np.float32(np.int32(c[r])) + offset[r]


@njit(**_OPTS)
def dequantize_rows(codes, nibbles, d, sc, dmin, mn, gs, gps, ids, out):
    """Rows `ids` as float32 into out [len(ids), K] (embedding lookups)."""
    R = codes.shape[2]
    K = out.shape[1]
    for i in range(ids.shape[0]):
        t, r = ids[i] // R, ids[i] % R
        for k in range(K):
            g = k // gs
            s = g // gps
            scale = to_f32(d[t, s, r])
            if sc is not None:
                scale *= np.float32(sc[t, g, r])
            offset = np.float32(0)
            if dmin is not None:
                offset = to_f32(dmin[t, s, r])
                if mn is not None:
                    offset *= np.float32(mn[t, g, r])
            if nibbles:
                v = np.int32(codes[t, g * 16 + k % 16, r])
                code = (v >> np.int32(4)) if k % 32 >= 16 else (v & np.int32(15))
            else:
                code = np.int32(codes[t, k, r])
            out[i, k] = scale * np.float32(code) + offset


# Parallel versions: the tiles split into one contiguous run per thread. With one thread the
# serial functions are called directly: a parallel region costs a thread-pool round trip even
# then, and under a busy machine its waits cost far more (measured: 27 ms a call instead of 0.1).


@njit(parallel=True, **_OPTS)
def gemv_nibbles_parallel(codes, d, sc, dmin, mn, gps, x, xs, out, parts):
    T = codes.shape[0]
    for p in prange(parts):
        gemv_nibbles(codes, d, sc, dmin, mn, gps, x, xs, out, p * T // parts, (p + 1) * T // parts)


@njit(parallel=True, **_OPTS)
def gemv_bytes_parallel(codes, d, sc, dmin, mn, gs, gps, x, xs, out, parts):
    T = codes.shape[0]
    for p in prange(parts):
        gemv_bytes(codes, d, sc, dmin, mn, gs, gps, x, xs, out, p * T // parts, (p + 1) * T // parts)


@njit(parallel=True, **_OPTS)
def dequantize_tiles_parallel(codes, nibbles, d, sc, dmin, mn, gs, gps, t0, t1, out, parts):
    T = t1 - t0
    for p in prange(parts):
        dequantize_tiles(codes, nibbles, d, sc, dmin, mn, gs, gps,
                         t0 + p * T // parts, t0 + (p + 1) * T // parts, t0, out)


# 16-bit float weights (F16, BF16), read at their stored precision: codes uint16 [tiles, K,
# TILE_ROWS] of the values' bits, no scales. numba has no float16, so a row of 16-bit values is
# widened into float32 bits through a uint32 scratch viewed as float32: bfloat16 by a shift;
# float16 by moving its exponent and mantissa into float32's places (a value 2^112 too small,
# exactly, subnormals included), scaling, and restoring the sign. Inf and NaN weights are not
# kept as such (no model file has them).

_TWO_112 = np.float32(2.0**112)


@njit(inline="always", **_OPTS)
def _widen_half(c, is_bf16, u, f):
    """f[:R] = the 16-bit values c[:R] as float32 (u: the same memory as uint32)."""
    R = c.shape[0]
    if is_bf16:
        for r in range(R):
            u[r] = np.uint32(c[r]) << np.uint32(16)
        return
    for r in range(R):
        u[r] = (np.uint32(c[r]) & np.uint32(0x7FFF)) << np.uint32(13)
    for r in range(R):
        f[r] *= _TWO_112
    for r in range(R):
        u[r] |= (np.uint32(c[r]) & np.uint32(0x8000)) << np.uint32(16)


@njit(**_OPTS)
def gemv_half(codes, is_bf16, x, out, t0, t1):
    """out[:, tiles t0..t1] = x @ W.T for 16-bit float weights. Four inputs a pass: their rows
    widened into four scratch rows, then one multiply-add loop over the tile's rows (2.5x faster
    than widening and adding one input at a time)."""
    R = codes.shape[2]
    M, K = x.shape
    K4 = K - K % 4
    u = np.empty((4, R), np.uint32)
    f = u.view(np.float32)
    acc = np.empty((M, R), np.float32)
    for t in range(t0, t1):
        acc[:] = 0
        for k in range(0, K4, 4):
            for i in range(4):
                _widen_half(codes[t, k + i], is_bf16, u[i], f[i])
            f0, f1, f2, f3 = f[0], f[1], f[2], f[3]
            for m in range(M):
                x0, x1, x2, x3 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3]
                for r in range(R):
                    acc[m, r] += f0[r] * x0 + f1[r] * x1 + f2[r] * x2 + f3[r] * x3
        for k in range(K4, K):
            _widen_half(codes[t, k], is_bf16, u[0], f[0])
            f0 = f[0]
            for m in range(M):
                xk = x[m, k]
                for r in range(R):
                    acc[m, r] += f0[r] * xk
        for m in range(M):
            for r in range(R):
                out[m, t * R + r] = acc[m, r]


@njit(parallel=True, **_OPTS)
def gemv_half_parallel(codes, is_bf16, x, out, parts):
    T = codes.shape[0]
    for p in prange(parts):
        gemv_half(codes, is_bf16, x, out, p * T // parts, (p + 1) * T // parts)


@njit(**_OPTS)
def dequantize_half_tiles(codes, is_bf16, t0, t1, first, out):
    """Tiles [t0, t1) of 16-bit weights as float32 into out [K, cols], tile `first` at column 0."""
    R = codes.shape[2]
    K = out.shape[0]
    u = np.empty(R, np.uint32)
    f = u.view(np.float32)
    for t in range(t0, t1):
        col = (t - first) * R
        for k in range(K):
            _widen_half(codes[t, k], is_bf16, u, f)
            a = out[k, col : col + R]
            for r in range(R):
                a[r] = f[r]


@njit(parallel=True, **_OPTS)
def dequantize_half_tiles_parallel(codes, is_bf16, t0, t1, out, parts):
    T = t1 - t0
    for p in prange(parts):
        dequantize_half_tiles(codes, is_bf16, t0 + p * T // parts, t0 + (p + 1) * T // parts, t0, out)


@njit(**_OPTS)
def dequantize_half_rows(codes, is_bf16, ids, out):
    """Rows `ids` of 16-bit weights as float32 into out [len(ids), K] (embedding lookups)."""
    R = codes.shape[2]
    K = out.shape[1]
    u = np.empty(K, np.uint32)
    f = u.view(np.float32)
    c = np.empty(K, np.uint16)
    for i in range(ids.shape[0]):
        t, r = ids[i] // R, ids[i] % R
        for k in range(K):
            c[k] = codes[t, k, r]
        _widen_half(c, is_bf16, u, f)
        for k in range(K):
            out[i, k] = f[k]
