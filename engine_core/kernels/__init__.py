"""Matmuls that read weights at their stored precision (GGUF block formats), compiled with numba.

    matmul(x, w)      x [M, K] float32 @ w.T -> [M, N]; w a QuantizedWeight or float32 [K, N]
    embedding(w, ids) rows of w as float32
    warm_up()         compile (or load from the disk cache) every kernel signature

Few rows (up to GEMV_MAX_ROWS: a single stream, small batches, beams) go to a kernel that reads
the codes directly, several rows sharing one read of the weights. More rows dequantize a chunk
of tiles into a reused float32 buffer and multiply it with BLAS. Compiled kernels are cached in
NUMBA_CACHE_DIR, by default $XDG_CACHE_HOME/furiosa-llm/numba (~/.cache/...), which a non-root
user can write; it must be set before numba is imported, which this module does.
"""

from __future__ import annotations

import os
import time


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "furiosa-llm", "numba")


os.environ.setdefault("NUMBA_CACHE_DIR", _default_cache_dir())

import numpy as np  # noqa: E402

from engine_core.kernels import _numba as nk  # noqa: E402
from engine_core.kernels.formats import (  # noqa: E402
    BLOCK_FORMATS,
    PLAIN_FORMATS,
    TILE_ROWS,
    QuantizedWeight,
    concat_rows,
    pack,
    permute_rows,
    unpack,
)

__all__ = [
    "BLOCK_FORMATS", "PLAIN_FORMATS", "TILE_ROWS", "QuantizedWeight", "concat_rows", "dequantize",
    "embedding", "matmul", "pack", "permute_rows", "set_num_threads", "unpack", "warm_up",
]

# Rows up to which the direct kernel beats dequantize + BLAS (bench: scripts/bench_kernels.py).
GEMV_MAX_ROWS = 8

# Float32 bytes dequantized per BLAS call on the many-rows path: large enough that BLAS runs at
# speed, small enough to stay in L2/L3 between the dequantization and the multiply.
DEQUANT_CHUNK_BYTES = 2 << 20


def set_num_threads(n: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _group_sums(x: np.ndarray, group: int) -> np.ndarray:
    return x.reshape(x.shape[0], -1, group).sum(axis=2, dtype=np.float32)


_scratch: dict[int, np.ndarray] = {}


def _buffer(size: int) -> np.ndarray:
    buf = _scratch.get(0)
    if buf is None or buf.size < size:
        buf = _scratch[0] = np.empty(size, dtype=np.float32)
    return buf[:size]


def matmul(x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
    """x [M, K] float32 times the weight: [M, N]. A float32 weight is given as [K, N]."""
    if isinstance(w, np.ndarray):
        return _dense(x, w)
    M = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    padded = w.tiles * TILE_ROWS
    if M <= GEMV_MAX_ROWS:
        res = np.empty((M, padded), dtype=np.float32)
        xs = _group_sums(x, w.group_size)
        if w.nibbles:
            nk.gemv_nibbles(w.codes, w.d, w.sc, w.dmin, w.mn, w.groups_per_super, x, xs, res)
        else:
            nk.gemv_bytes(w.codes, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super, x, xs, res)
        return res[:, : w.rows] if padded != w.rows else res
    res = np.empty((M, padded), dtype=np.float32)
    per_chunk = max(1, DEQUANT_CHUNK_BYTES // (w.cols * TILE_ROWS * 4))
    for t0 in range(0, w.tiles, per_chunk):
        t1 = min(t0 + per_chunk, w.tiles)
        cols = (t1 - t0) * TILE_ROWS
        buf = _buffer(w.cols * cols).reshape(w.cols, cols)
        nk.dequantize_tiles(w.codes, w.nibbles, w.d, w.sc, w.dmin, w.mn, w.group_size,
                            w.groups_per_super, t0, t1, buf)
        np.matmul(x, buf, out=res[:, t0 * TILE_ROWS : t1 * TILE_ROWS])
    return res[:, : w.rows] if padded != w.rows else res


def _dense(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [rows, in] @ weight [in, out] in float32. 2..GEMV_MAX_ROWS rows run as one GEMV per row:
    OpenBLAS packs a GEMM's weights on every call, which costs more than that for so few rows."""
    rows = x.shape[0]
    if not 1 < rows <= 6:
        return x @ weight
    out = np.empty((rows, weight.shape[1]), dtype=np.float32)
    for row in range(rows):
        np.matmul(x[row], weight, out=out[row])
    return out


def embedding(w, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a [N, K] weight as float32 [len(ids), K]."""
    if isinstance(w, np.ndarray):
        return w[ids]
    out = np.empty((len(ids), w.cols), dtype=np.float32)
    nk.dequantize_rows(w.codes, w.nibbles, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super,
                       np.asarray(ids, dtype=np.int64), out)
    return out


def dequantize(w: QuantizedWeight) -> np.ndarray:
    """The whole weight as float32 [N, K] (tests, and tools that need it dense)."""
    buf = np.empty((w.cols, w.tiles * TILE_ROWS), dtype=np.float32)
    nk.dequantize_tiles(w.codes, w.nibbles, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super,
                        0, w.tiles, buf)
    return np.ascontiguousarray(buf[:, : w.rows].T)


def _example(qtype: str, rows: int, cols: int) -> QuantizedWeight:
    """A small valid weight of a format, for compiling its kernels' signatures."""
    _, block, size = next(v for v in BLOCK_FORMATS.values() if v[0] == qtype)
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    return pack(qtype, unpack(qtype, raw, cols), rows, cols)


def warm_up(qtypes: set[str] | None = None) -> float:
    """Compile (or load from the cache) each kernel for each format in `qtypes` (default: all),
    at one and several rows, so that no request pays for compilation. Returns the seconds taken."""
    start = time.perf_counter()
    for name in sorted(qtypes or {v[0] for v in BLOCK_FORMATS.values()}):
        w = _example(name, TILE_ROWS, 256)
        for rows in (1, 2, GEMV_MAX_ROWS + 1):
            matmul(np.zeros((rows, 256), dtype=np.float32), w)
        embedding(w, np.zeros(1, dtype=np.int64))
    return time.perf_counter() - start
