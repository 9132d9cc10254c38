"""The many-rows matmul of stored-format weights on several threads, with one thread pool.

    split_matmul(w, x, out, parts)   out[:, :tiles * TILE_ROWS] = x @ w.T, or False if unavailable

On one thread the many-rows path dequantizes a chunk of tiles into a float32 buffer and hands it
to numpy's BLAS. With more threads, leaving the split to OpenBLAS made the second thread nearly
worthless inside a decode step: OpenBLAS's own workers sleep between calls (they must: spinning,
they fought the kernels' OpenMP threads, see engine_core/__init__.py) and every call woke one on
this virtual machine, while the kernels' parallel regions (attention, norms) woke the other pool.
SmolLM2 at batch 64, two threads against one (one process, alternating): the matmuls 1.13x
faster. Here one parallel region (the kernels' OpenMP threads) splits a matmul's tiles between
the threads; each dequantizes its share chunk by chunk into its own buffer and calls OpenBLAS's
sgemm itself, from compiled code, with OpenBLAS held to one thread for the call: the matmuls
1.53x, the lm_head 1.7x, the step 1.52x (against 1.16x before, same process and run).

OpenBLAS is reached through the library numpy loaded (threadpoolctl finds it) and its 64-bit
integer CBLAS symbol (numpy's wheels: scipy_cblas_sgemm64_), registered with LLVM under a fixed
name so that the compiled kernels stay cacheable. Where numpy's BLAS is something else, or the
symbol is missing, split_matmul returns False and the caller keeps the other path.
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import njit, prange, types

from engine_core.kernels import _numba as nk
from engine_core.kernels.formats import HALF_FORMATS

_OPTS = dict(cache=True, fastmath=True, nogil=True)

_ROW_MAJOR, _NO_TRANS = 101, 111
_SYMBOL = "furiosa_llm_cblas_sgemm64"
_i32, _i64, _f32 = types.int32, types.int64, types.float32
# cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); the
# pointers as 64-bit integers (the same registers in the calling convention)
_sgemm = types.ExternalFunction(
    _SYMBOL, types.void(_i32, _i32, _i32, _i64, _i64, _i64, _f32, _i64, _i64, _i64, _i64, _f32, _i64, _i64))


class _OpenBLAS:
    def __init__(self, lib: ctypes.CDLL, prefix: str, suffix: str):
        self.set_threads = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}")
        self.set_threads.argtypes, self.set_threads.restype = [ctypes.c_int], None
        self.get_threads = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}")
        self.get_threads.argtypes, self.get_threads.restype = [], ctypes.c_int


_state: list = []  # [] until looked up, then [_OpenBLAS or None]


def _openblas() -> _OpenBLAS | None:
    if not _state:
        _state.append(_find_openblas())
    return _state[0]


def _find_openblas() -> _OpenBLAS | None:
    try:
        import llvmlite.binding as llvm
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("internal_api") != "openblas":
                continue
            lib = ctypes.CDLL(info["filepath"])
            for prefix in ("scipy_", ""):
                sgemm = getattr(lib, f"{prefix}cblas_sgemm64_", None)
                if sgemm is not None:
                    found = _OpenBLAS(lib, prefix, "64_")
                    llvm.add_symbol(_SYMBOL, ctypes.cast(sgemm, ctypes.c_void_p).value)
                    return found
    except (ImportError, OSError, AttributeError):
        pass
    return None


def available() -> bool:
    return _openblas() is not None


@njit(**_OPTS)
def _sgemm_into(x, b, cols, out, col0):
    """out[:, col0 : col0 + cols] = x @ b[:, :cols] (b's rows are `cols` long, contiguous)."""
    M, K = x.shape
    _sgemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, M, cols, K, np.float32(1.0), x.ctypes.data, K, b.ctypes.data,
           cols, np.float32(0.0), out.ctypes.data + col0 * 4, out.shape[1])


@njit(parallel=True, **_OPTS)
def _split_blocks(x, codes, nibbles, d, sc, dmin, mn, gs, gps, per_chunk, bufs, out, parts):
    K = x.shape[1]
    R = codes.shape[2]
    tiles = codes.shape[0]
    for p in prange(parts):
        for c0 in range(tiles * p // parts, tiles * (p + 1) // parts, per_chunk):
            c1 = min(tiles * (p + 1) // parts, c0 + per_chunk)
            b = bufs[p, : K * (c1 - c0) * R].reshape((K, (c1 - c0) * R))
            nk.dequantize_tiles(codes, nibbles, d, sc, dmin, mn, gs, gps, c0, c1, c0, b)
            _sgemm_into(x, b, (c1 - c0) * R, out, c0 * R)


@njit(parallel=True, **_OPTS)
def _split_half(x, codes, is_bf16, per_chunk, bufs, out, parts):
    K = x.shape[1]
    R = codes.shape[2]
    tiles = codes.shape[0]
    for p in prange(parts):
        for c0 in range(tiles * p // parts, tiles * (p + 1) // parts, per_chunk):
            c1 = min(tiles * (p + 1) // parts, c0 + per_chunk)
            b = bufs[p, : K * (c1 - c0) * R].reshape((K, (c1 - c0) * R))
            nk.dequantize_half_tiles(codes, is_bf16, c0, c1, c0, b)
            _sgemm_into(x, b, (c1 - c0) * R, out, c0 * R)


_buffers: dict[int, np.ndarray] = {}


def split_matmul(w, x: np.ndarray, out: np.ndarray, parts: int, chunk_bytes: int) -> bool:
    """out [M, tiles * TILE_ROWS] = x [M, K] (C-contiguous float32) @ w.T on `parts` threads, each
    dequantizing about chunk_bytes of float32 at a time; False (nothing done) where numpy's BLAS is
    not an OpenBLAS this can call."""
    blas = _openblas()
    if blas is None:
        return False
    R = w.codes.shape[2]
    per_chunk = max(1, chunk_bytes // (w.cols * R * 4))
    size = w.cols * per_chunk * R
    bufs = _buffers.get(parts)
    if bufs is None or bufs.shape[1] < size:
        bufs = _buffers[parts] = np.empty((parts, size), dtype=np.float32)
    threads = blas.get_threads()
    blas.set_threads(1)  # each call of sgemm on its own thread alone
    try:
        if w.qtype in HALF_FORMATS:
            _split_half(x, w.codes, w.qtype == "BF16", per_chunk, bufs, out, parts)
        else:
            _split_blocks(x, w.codes, w.nibbles, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super,
                          per_chunk, bufs, out, parts)
    finally:
        blas.set_threads(threads)
    return True
