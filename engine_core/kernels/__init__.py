"""Matmuls that read weights at their stored precision (GGUF block formats), compiled with numba.

    matmul(x, w)      x [M, K] float32 @ w.T -> [M, N]; w a QuantizedWeight or float32 [K, N]
    embedding(w, ids) rows of w as float32
    warm_up()         compile (or load from the disk cache) every kernel signature

Few rows (up to GEMV_MAX_ROWS: a single stream, small batches, beams) go to a kernel that reads
the codes directly, several rows sharing one read of the weights. More rows dequantize a chunk
of tiles into a reused float32 buffer and multiply it with BLAS. Compiled kernels are cached in
NUMBA_CACHE_DIR, by default $XDG_CACHE_HOME/furiosa-llm/numba/<digest of the kernel sources>
(~/.cache/...), which a non-root user can write; it must be set before numba is imported, which this module does (and picks
OpenMP threads where the system has them; see below).
"""

from __future__ import annotations

import hashlib
import os
import time


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "furiosa-llm", "numba", sources_digest())


def sources_digest(directory: str | None = None) -> str:
    """A digest of this package's kernel sources, naming the default cache's subdirectory. numba
    checks a cached function against its own file only, while a kernel compiles its callees from
    other files into itself: after a change to _numba.py alone, decode_layer loaded from the cache
    still ran the old GEMV (seen: two streams 1.35x slower than the same source compiled afresh).
    One directory per version of the sources keeps every cached kernel consistent with all of them."""
    digest = hashlib.sha256()
    here = directory or os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


os.environ.setdefault("NUMBA_CACHE_DIR", _default_cache_dir())
# The threads of a parallel kernel: OpenMP (GNU libgomp, where the system has it) with idle
# threads that sleep at once instead of spinning, else numba's own workqueue pool. A parallel
# region cost 10-11 us with two threads on this 2-core machine, idle or with a busy-looping
# process beside it, against 55-160 us with the workqueue pool (which at 7 regions a layer made
# a second thread slower than one). OpenMP's default policy spins: 46-51 us a region here, and
# single-stream decode fell from 44 to 11 tok/s while other processes kept the cores busy.
# With one kernel thread no parallel region runs at all (the serial kernels are called).
# Sleeping at once made each region of a single stream's decode wake a thread (a futex round trip
# through this VM's scheduler), so idle threads first spin briefly: GOMP_SPINCOUNT 10000 (about
# 0.1 ms by libgomp's estimate) keeps the thread awake across a decode layer's back-to-back
# regions yet asleep between steps. SmolLM2 decoding one stream on two threads, every GEMV of the
# fused layer split: 45-55 tok/s sleeping at once, 71-97 with 3000-300000 spins (noisy VM).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp workqueue tbb")

import numpy as np  # noqa: E402

from engine_core.kernels import _numba as nk  # noqa: E402
from engine_core.kernels import int8_gemv as i8  # noqa: E402
from engine_core.kernels.blas_split import split_matmul  # noqa: E402
from engine_core.kernels.formats import (  # noqa: E402
    BLOCK_FORMATS,
    HALF_FORMATS,
    PLAIN_FORMATS,
    TILE_ROWS,
    QuantizedWeight,
    concat_rows,
    fuse,
    pack,
    pack_half,
    permute_rows,
    unpack,
)

__all__ = [
    "ACTIVATION_DTYPES", "BLOCK_FORMATS", "HALF_FORMATS", "PLAIN_FORMATS", "TILE_ROWS", "QuantizedWeight",
    "activation_precision", "concat_rows", "dequantize", "embedding", "fuse", "matmul", "num_threads", "pack",
    "pack_half", "permute_rows", "set_activation_precision", "set_num_threads", "unpack", "warm_up",
]

# Rows up to which the direct kernel beats dequantize + BLAS, per format (scripts/bench_gemv_switch.py:
# one thread, CPU time, 1536x576, 1536x512 and 4096x4096 on a shared AMD EPYC with AVX2): the 4-bit
# kernels win up to 10-15 rows, the byte-coded ones (Q5_0, Q8_0, Q5_K, Q6_K: one byte a weight
# to widen) up to 6-11, the 16-bit ones at every count measured (up to 16: no scales, and BLAS
# first widens all of it). GEMV_MAX_ROWS caps them all (tests set it to 0 for the BLAS path).
GEMV_MAX_ROWS_BY_FORMAT = {"Q4_0": 12, "Q4_1": 12, "Q4_K": 12, "Q5_0": 8, "Q5_1": 8, "Q8_0": 8,
                           "Q5_K": 8, "Q6_K": 8, "F16": 16, "BF16": 16}
GEMV_MAX_ROWS = max(GEMV_MAX_ROWS_BY_FORMAT.values())


def gemv_max_rows(qtype: str) -> int:
    """The most activation rows that format's few-rows kernel takes."""
    return min(GEMV_MAX_ROWS, GEMV_MAX_ROWS_BY_FORMAT.get(qtype, GEMV_MAX_ROWS))

# Float32 bytes dequantized per BLAS call on the many-rows path: large enough that BLAS runs at
# speed, small enough to stay in L2/L3 between the dequantization and the multiply.
DEQUANT_CHUNK_BYTES = 2 << 20


_threads = 1  # threads the kernels use (set_num_threads)

# Multiply-adds below which a matmul runs on the calling thread alone even with more threads: a
# parallel region (waking a sleeping thread) cost 10-11 us in a tight loop here but far more
# within a decode step on this virtual machine. SmolLM2's single-stream decode with two threads:
# every GEMV split, 26 tok/s (served) against 46 with one thread; from 1M multiply-adds (its
# 3072 x 576 gate/up and the lm_head split), 33-42; from 4M (the lm_head only), 53 against 55.
# An 8B model's 4096 x 4096 projections (16.7M) are split.
PARALLEL_MIN_WORK = 1 << 22
# The same for the GEMVs inside decode_layer (one token, every layer in one compiled call): there
# the regions follow one another with no Python between them, and the threads spin across them.
FUSED_PARALLEL_MIN_WORK = 1 << 18


def set_num_threads(n: int) -> None:
    """Threads for the kernels (the engine passes its BLAS thread count)."""
    import numba

    global _threads
    _threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(_threads)


def num_threads() -> int:
    return _threads


# What the GEMVs over 4-bit weights (Q4_0, Q4_1, Q4_K) multiply the codes by: "float32" the
# activations as they are (exact up to summation order), "int8" the activations quantized per 32
# values as llama.cpp does (int8_gemv.py; faster, outputs differ slightly). Other formats and the
# many-rows path always use float32.
ACTIVATION_DTYPES = ("float32", "int8")
_activation_dtype = "float32"


def set_activation_precision(dtype: str) -> None:
    """Switch the 4-bit GEMVs between float32 and int8 activations (see ACTIVATION_DTYPES). Call
    it before warm_up(), which then compiles the kernels of that precision."""
    global _activation_dtype
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation dtype must be one of {ACTIVATION_DTYPES}, not {dtype!r}")
    _activation_dtype = dtype


def activation_precision() -> str:
    return _activation_dtype


def _gemv_nibbles_int8(w: QuantizedWeight, x: np.ndarray, out: np.ndarray, parts: int) -> None:
    args = (w.codes, w.d, w.sc, w.dmin, w.mn, w.groups_per_super, x, out)
    if parts > 1:
        i8.gemv_nibbles_int8_parallel(*args, parts)
    else:
        i8.gemv_nibbles_int8(*args, 0, w.tiles)


def _gemv(w: QuantizedWeight, x: np.ndarray, out: np.ndarray) -> None:
    """out = x @ w.T by the few-rows kernel of w's format; the block formats' float kernels also
    take x's sums per group (the offset term), which the others do not need."""
    parts = min(_threads, w.tiles) if x.shape[0] * w.rows * w.cols >= PARALLEL_MIN_WORK else 1
    if w.nibbles and _activation_dtype == "int8":
        _gemv_nibbles_int8(w, x, out, parts)
    elif w.qtype in HALF_FORMATS:
        if parts > 1:
            nk.gemv_half_parallel(w.codes, w.qtype == "BF16", x, out, parts)
        else:
            nk.gemv_half(w.codes, w.qtype == "BF16", x, out, 0, w.tiles)
    elif w.nibbles:
        args = (w.codes, w.d, w.sc, w.dmin, w.mn, w.groups_per_super, x, _group_sums(x, w.group_size), out)
        if parts > 1:
            nk.gemv_nibbles_parallel(*args, parts)
        else:
            nk.gemv_nibbles(*args, 0, w.tiles)
    else:
        args = (w.codes, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super, x,
                _group_sums(x, w.group_size), out)
        if parts > 1:
            nk.gemv_bytes_parallel(*args, parts)
        else:
            nk.gemv_bytes(*args, 0, w.tiles)


def _dequantize_tiles(w: QuantizedWeight, t0: int, t1: int, out: np.ndarray, threads: int | None = None) -> None:
    parts = min(_threads if threads is None else threads, t1 - t0)
    if w.qtype in HALF_FORMATS:
        if parts > 1:
            nk.dequantize_half_tiles_parallel(w.codes, w.qtype == "BF16", t0, t1, out, parts)
        else:
            nk.dequantize_half_tiles(w.codes, w.qtype == "BF16", t0, t1, t0, out)
        return
    args = (w.codes, w.nibbles, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super, t0, t1)
    if parts > 1:
        nk.dequantize_tiles_parallel(*args, out, parts)
    else:
        nk.dequantize_tiles(*args, t0, out)


def _group_sums(x: np.ndarray, group: int) -> np.ndarray:
    out = np.empty((x.shape[0], x.shape[1] // group), dtype=np.float32)
    nk.group_sums(x, group, out)
    return out


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
    if M <= gemv_max_rows(w.qtype):
        res = np.empty((M, padded), dtype=np.float32)
        _gemv(w, x, res)
        return res[:, : w.rows] if padded != w.rows else res
    res = np.empty((M, padded), dtype=np.float32)
    parts = min(_threads, w.tiles)
    if parts > 1 and M * w.rows * w.cols >= PARALLEL_MIN_WORK and split_matmul(w, x, res, parts, DEQUANT_CHUNK_BYTES):
        return res[:, : w.rows] if padded != w.rows else res
    per_chunk = max(1, DEQUANT_CHUNK_BYTES // (w.cols * TILE_ROWS * 4))
    for t0 in range(0, w.tiles, per_chunk):
        t1 = min(t0 + per_chunk, w.tiles)
        cols = (t1 - t0) * TILE_ROWS
        buf = _buffer(w.cols * cols).reshape(w.cols, cols)
        # on the calling thread: between two BLAS calls a parallel region left its idle thread
        # spinning (GOMP_SPINCOUNT) on a core that BLAS's threads wanted; SmolLM2 batch 64 on two
        # threads (one process, alternating): 1.13x faster than splitting each chunk's dequantization
        # (where blas_split cannot call numpy's BLAS itself)
        _dequantize_tiles(w, t0, t1, buf, threads=1)
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
    if w.qtype in HALF_FORMATS:
        nk.dequantize_half_rows(w.codes, w.qtype == "BF16", np.asarray(ids, dtype=np.int64), out)
        return out
    nk.dequantize_rows(w.codes, w.nibbles, w.d, w.sc, w.dmin, w.mn, w.group_size, w.groups_per_super,
                       np.asarray(ids, dtype=np.int64), out)
    return out


def dequantize(w: QuantizedWeight) -> np.ndarray:
    """The whole weight as float32 [N, K] (tests, and tools that need it dense)."""
    buf = np.empty((w.cols, w.tiles * TILE_ROWS), dtype=np.float32)
    _dequantize_tiles(w, 0, w.tiles, buf)
    return np.ascontiguousarray(buf[:, : w.rows].T)


def _example(qtype: str, rows: int, cols: int) -> QuantizedWeight:
    """A small valid weight of a format, for compiling its kernels' signatures."""
    if qtype in HALF_FORMATS:
        return pack_half(qtype, np.zeros((rows, cols), dtype=np.uint16))
    _, block, size = next(v for v in BLOCK_FORMATS.values() if v[0] == qtype)
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    return pack(qtype, unpack(qtype, raw, cols), rows, cols)


def warm_up(qtypes: set[str] | None = None) -> float:
    """Compile (or load from the cache) each kernel for each format in `qtypes` (default: all),
    at one and several rows, so that no request pays for compilation (the GEMVs of the activation
    precision set now). Returns the seconds taken."""
    global PARALLEL_MIN_WORK
    start = time.perf_counter()
    saved, PARALLEL_MIN_WORK = PARALLEL_MIN_WORK, 0  # the parallel versions too, on small examples
    try:
        _warm_up(qtypes)
    finally:
        PARALLEL_MIN_WORK = saved
    return time.perf_counter() - start


def _warm_up(qtypes: set[str] | None) -> None:
    for name in sorted(qtypes or {v[0] for v in BLOCK_FORMATS.values()} | set(HALF_FORMATS)):
        w = _example(name, 2 * TILE_ROWS, 256)
        for rows in (1, GEMV_MAX_ROWS + 1):
            matmul(np.zeros((rows, 256), dtype=np.float32), w)
        embedding(w, np.zeros(1, dtype=np.int64))
        if _threads > 1:  # the serial versions too: a weight of one tile runs on one thread
            matmul(np.zeros((1, 256), dtype=np.float32), _example(name, TILE_ROWS, 256))
