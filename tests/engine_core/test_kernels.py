"""The quantized-weight kernels against the reference: gguf's own numpy dequantizer, then numpy.

Blocks are random bytes with sane float16 scales written over the scale fields, which is a valid
block of every format (any code and any small-integer scale is legal). Shapes are odd on purpose:
rows not a multiple of the tile, one row, K not a multiple of 256 where the format allows it.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from numba import njit

from engine_core import kernels
from engine_core.kernels import TILE_ROWS, lanes

# format -> byte offsets of its float16 fields within a block
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
BLOCK = {name: (block, size) for name, block, size in kernels.BLOCK_FORMATS.values()}
FORMATS = sorted(F16_FIELDS)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    block, size = BLOCK[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = (rng.uniform(0.5, 2.0, (rows, cols // block)) * 1e-3).astype(np.float16)
        raw[..., offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def reference(qtype: str, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32)


def quantized(qtype: str, rows: int, cols: int, seed: int = 0):
    raw = random_blocks(qtype, rows, cols, seed)
    w = kernels.pack(qtype, kernels.unpack(qtype, raw, cols), rows, cols)
    return w, reference(qtype, raw)


def shapes(qtype: str):
    k_small = 256 if qtype.endswith("_K") else 96  # 96: three blocks of 32, not a multiple of 256
    return [(1, k_small), (TILE_ROWS - 1, k_small), (TILE_ROWS + 3, 2 * k_small), (2 * TILE_ROWS, 512)]


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 2e-6 * scale + 1e-7, np.abs(actual - expected).max() / scale


@pytest.mark.parametrize("qtype", FORMATS)
def test_dequantize_matches_gguf_exactly(qtype):
    for rows, cols in shapes(qtype):
        w, ref = quantized(qtype, rows, cols)
        np.testing.assert_array_equal(kernels.dequantize(w), ref)
        ids = np.array([0, rows - 1, rows // 2])
        np.testing.assert_array_equal(kernels.embedding(w, ids), ref[ids])


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("m", [1, 3, kernels.GEMV_MAX_ROWS, kernels.GEMV_MAX_ROWS + 1, 40])
def test_matmul_matches_dequantize_then_numpy(qtype, m):
    rng = np.random.default_rng(m)
    for rows, cols in shapes(qtype):
        w, ref = quantized(qtype, rows, cols, seed=rows)
        x = rng.standard_normal((m, cols)).astype(np.float32)
        expected = (x.astype(np.float64) @ ref.T.astype(np.float64)).astype(np.float32)
        close(kernels.matmul(x, w), expected)


@pytest.mark.parametrize("qtype", FORMATS)
def test_a_few_rows_are_each_computed_as_that_row_alone(qtype):
    """The few-rows kernels take the rows two at a time through the one-row kernel's sums in its
    order (each code row read and widened once for both): a row's result does not depend on the
    rows beside it, to the bit."""
    rows, cols = shapes(qtype)[-1]
    w, _ = quantized(qtype, rows, cols, seed=3)
    x = np.random.default_rng(3).standard_normal((5, cols)).astype(np.float32)
    together = kernels.matmul(x, w)
    for i in range(5):
        np.testing.assert_array_equal(together[i : i + 1], kernels.matmul(x[i : i + 1], w))


@pytest.mark.parametrize("qtype", FORMATS)
def test_each_format_switches_to_blas_after_its_own_row_count(qtype, monkeypatch):
    """Up to gemv_max_rows(format) rows the direct kernel runs, one more and dequantize + BLAS
    does; both give the reference's values."""
    limit = kernels.gemv_max_rows(qtype)
    assert 1 <= limit <= kernels.GEMV_MAX_ROWS
    calls = []
    real = kernels._gemv
    monkeypatch.setattr(kernels, "_gemv", lambda *args: calls.append(args[1].shape[0]) or real(*args))
    rows, cols = shapes(qtype)[0]
    w, ref = quantized(qtype, rows, cols, seed=rows)
    for m in (limit, limit + 1):
        x = np.random.default_rng(m).standard_normal((m, cols)).astype(np.float32)
        close(kernels.matmul(x, w), (x.astype(np.float64) @ ref.T.astype(np.float64)).astype(np.float32))
    assert calls == [limit]


def test_many_rows_path_spans_several_dequantized_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "DEQUANT_CHUNK_BYTES", 1)  # one tile per chunk
    w, ref = quantized("Q4_K", 3 * TILE_ROWS + 5, 512)
    x = np.random.default_rng(0).standard_normal((20, 512)).astype(np.float32)
    close(kernels.matmul(x, w), x @ ref.T)


def test_row_permutation_and_concatenation_act_on_whole_rows():
    raw_a, raw_b = random_blocks("Q6_K", 70, 256, 1), random_blocks("Q6_K", 9, 256, 2)
    a, b = kernels.unpack("Q6_K", raw_a, 256), kernels.unpack("Q6_K", raw_b, 256)
    order = np.random.default_rng(0).permutation(70)
    fused = kernels.pack("Q6_K", kernels.concat_rows([kernels.permute_rows(a, order), b]), 79, 256)
    expected = np.concatenate([reference("Q6_K", raw_a)[order], reference("Q6_K", raw_b)])
    np.testing.assert_array_equal(kernels.dequantize(fused), expected)


def test_float32_weights_pass_through_blas():
    w = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    for m in (1, 3, 12):
        x = np.random.default_rng(m).standard_normal((m, 64)).astype(np.float32)
        np.testing.assert_allclose(kernels.matmul(x, w), x @ w, rtol=1e-5, atol=1e-5)


def test_fuse_stacks_tile_aligned_weights_of_one_format_only():
    (q, q_ref), (k, k_ref) = quantized("Q4_K", 2 * TILE_ROWS, 256, 1), quantized("Q4_K", 5, 256, 2)
    v, v_ref = quantized("Q6_K", TILE_ROWS, 256, 3)
    fused = kernels.fuse([q, k, v])
    assert [w.qtype for w in fused] == ["Q4_K", "Q6_K"] and fused[0].rows == 2 * TILE_ROWS + 5
    np.testing.assert_array_equal(kernels.dequantize(fused[0]), np.concatenate([q_ref, k_ref]))
    assert len(kernels.fuse([k, q])) == 2  # k's 5 rows end inside a tile: cannot be followed


@pytest.mark.parametrize("qtype", FORMATS)
def test_scales_are_held_as_the_files_float16(qtype):
    """A file's scales stay 16-bit (what a decode reads per group), and the products are exact."""
    w, ref = quantized(qtype, TILE_ROWS + 3, 512)
    assert w.d.dtype == np.uint16 and (w.dmin is None or w.dmin.dtype == np.uint16)
    np.testing.assert_array_equal(kernels.dequantize(w), ref)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_K"])
def test_scales_float16_cannot_hold_stay_float32_and_do_not_fuse_with_half_ones(qtype):
    raw = random_blocks(qtype, TILE_ROWS, 256, 4)
    parts = kernels.unpack(qtype, raw, 256)
    exact = kernels.pack(qtype, parts, TILE_ROWS, 256)
    parts["d"] = parts["d"] * np.float32(1 + 2**-20)  # between two float16 values
    wide = kernels.pack(qtype, parts, TILE_ROWS, 256)
    assert wide.d.dtype == np.float32 and exact.d.dtype == np.uint16
    expected = kernels.dequantize(exact)
    scaled = (expected - (0 if parts["dmin"] is None else kernels.dequantize(
        kernels.pack(qtype, dict(parts, d=parts["d"] * 0), TILE_ROWS, 256))))
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    # the float32-scaled weight is the exact one with its scale term (not its offset) grown by 2^-20
    close(kernels.matmul(x, wide), x @ (expected + scaled * np.float32(2**-20)).T)
    fused = kernels.fuse([exact, wide])
    assert len(fused) == 2


@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K"])
def test_parallel_kernels_split_the_tiles_without_changing_the_result(qtype, monkeypatch):
    w, ref = quantized(qtype, 3 * TILE_ROWS + 1, 512)
    x = np.random.default_rng(0).standard_normal((20, 512)).astype(np.float32)
    serial = [kernels.matmul(x[:m], w) for m in (1, 5)]
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)  # split even this small weight
    kernels.set_num_threads(2)
    try:
        for m in (1, 5, 20):  # the matrix-vector kernel, and dequantize + BLAS
            close(kernels.matmul(x[:m], w), x[:m] @ ref.T)
        for m, alone in zip((1, 5), serial):  # each tile's rows by the same code either way
            np.testing.assert_array_equal(kernels.matmul(x[:m], w), alone)
    finally:
        kernels.set_num_threads(1)


@pytest.mark.parametrize("qtype", FORMATS + list(kernels.HALF_FORMATS))
def test_many_rows_on_two_threads_multiply_each_threads_tiles_on_that_thread(qtype, monkeypatch):
    """With two threads the many-rows path is one parallel region: each thread dequantizes its
    share of the tiles, a chunk at a time, and calls numpy's OpenBLAS (held to one thread for the
    call, then given back its own count) on it; the values are the reference's."""
    from threadpoolctl import threadpool_limits

    from engine_core.kernels import blas_split

    assert blas_split.available()  # numpy's wheels carry OpenBLAS
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(kernels, "DEQUANT_CHUNK_BYTES", 1)  # a tile per chunk: several per thread
    name = "_split_half" if qtype in kernels.HALF_FORMATS else "_split_blocks"
    calls = []
    real = getattr(blas_split, name)
    monkeypatch.setattr(blas_split, name, lambda *a: calls.append(a[-1]) or real(*a))
    if qtype in kernels.HALF_FORMATS:
        w, ref = half_weight(qtype, 4 * TILE_ROWS + 3, 96)  # five tiles: three and two
    else:
        w, ref = quantized(qtype, 4 * TILE_ROWS + 3, shapes(qtype)[-1][1])
    x = np.random.default_rng(2).standard_normal((20, w.cols)).astype(np.float32)
    kernels.set_num_threads(2)
    try:
        with threadpool_limits(2, user_api="blas"):
            got = kernels.matmul(x, w)
            assert blas_split._openblas().get_threads() == 2
    finally:
        kernels.set_num_threads(1)
    assert calls == [2]
    close(got, (x.astype(np.float64) @ ref.T.astype(np.float64)).astype(np.float32))


def test_a_small_matmul_stays_on_one_thread_below_the_work_threshold(monkeypatch):
    """A parallel region costs about a GEMV of a million weights: below that, one thread."""
    w, _ = quantized("Q4_1", 3 * TILE_ROWS, 512)
    calls = []
    monkeypatch.setattr(kernels.nk, "gemv_nibbles_parallel", lambda *a: calls.append(a))
    kernels.set_num_threads(2)
    try:
        kernels.matmul(np.ones((1, 512), np.float32), w)  # 98k multiply-adds
        assert calls == []
        monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 64 * 512)
        kernels.matmul(np.ones((1, 512), np.float32), w)
        assert len(calls) == 1
    finally:
        kernels.set_num_threads(1)


def half_weight(qtype: str, rows: int, cols: int, seed: int = 0):
    """A 16-bit weight (its bits) and its exact float32 values; float16 with subnormals, zeros
    and negative zero, bfloat16 from random float32 bit patterns truncated."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == "F16":
        w[0, :5] = [6e-8, -6e-8, 3e-5, 0.0, -0.0]  # subnormal float16 values and zeros
        bits = w.astype(np.float16).view(np.uint16)
        return kernels.pack_half(qtype, bits), bits.view(np.float16).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    return kernels.pack_half(qtype, bits), (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("qtype", kernels.HALF_FORMATS)
@pytest.mark.parametrize("m", [1, 3, kernels.GEMV_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_16_bit_float_weights_are_read_at_their_precision(qtype, m, threads, monkeypatch):
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)  # with two threads, the parallel kernels
    w, ref = half_weight(qtype, 2 * TILE_ROWS + 7, 96)
    assert w.nbytes == w.tiles * TILE_ROWS * 96 * 2  # two bytes a weight (rows padded to tiles)
    np.testing.assert_array_equal(kernels.dequantize(w), ref)
    ids = np.array([0, 5, 2 * TILE_ROWS + 6])
    np.testing.assert_array_equal(kernels.embedding(w, ids), ref[ids])
    x = np.random.default_rng(1).standard_normal((m, 96)).astype(np.float32)
    kernels.set_num_threads(threads)
    try:
        close(kernels.matmul(x, w), x @ ref.T)
    finally:
        kernels.set_num_threads(1)


def test_16_bit_weights_fuse_like_the_block_formats():
    (q, q_ref), (k, k_ref) = half_weight("BF16", TILE_ROWS, 64, 1), half_weight("BF16", 9, 64, 2)
    fused = kernels.fuse([q, k])
    assert len(fused) == 1 and fused[0].rows == TILE_ROWS + 9
    np.testing.assert_array_equal(kernels.dequantize(fused[0]), np.concatenate([q_ref, k_ref]))
    assert len(kernels.fuse([q, half_weight("F16", 9, 64)[0]])) == 2  # formats never mix


def test_the_default_kernel_cache_is_one_directory_per_version_of_the_kernel_sources(tmp_path):
    """numba checks a cached function against its own file only, so a kernel compiled with another
    file's callees would keep their old code; the default cache directory is named by a digest
    of every kernel source instead."""
    import os
    import shutil
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    chosen = subprocess.run([sys.executable, "-c", "import os, engine_core.kernels; print(os.environ['NUMBA_CACHE_DIR'])"],
                            env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert chosen == str(tmp_path / "xdg" / "furiosa-llm" / "numba" / kernels.sources_digest())
    copy = tmp_path / "kernels"
    shutil.copytree(os.path.dirname(kernels.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert kernels.sources_digest(str(copy)) == kernels.sources_digest()
    with open(copy / "_numba.py", "a") as f:  # a change to a callee's file alone
        f.write("\n")
    assert kernels.sources_digest(str(copy)) != kernels.sources_digest()


@njit(cache=False)
def _axpy_lanes(a, x, y, out):
    """out[:] = a * x + y eight values at a time through kernels.lanes (x of any cache type),
    asking for every line of x first (a hint: it must change nothing)."""
    for i in range(0, x.size, 16 // x.itemsize):
        lanes.prefetch_l2(x, i)
    for i in range(0, x.size, 8):
        lanes.vstore(out, i, lanes.vfma(lanes.vbcast(a), lanes.vload(x, i), lanes.vload(y, i)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_lanes_widen_each_cache_type_exactly_and_fuse_the_multiply_add(dtype):
    """The eight-lane loads give what attention.to_float32 gives for every stored value of the
    type (infinities and NaN included), and vfma rounds once, as float64 arithmetic rounded to
    float32 does."""
    from engine_core.kernels.attention import KV_CACHE_DTYPES, kernel_view, to_cache, to_float32

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(61).astype(np.float32) * 100,
                             np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 65504.0, 7e-8], np.float32),
                             rng.standard_normal(59).astype(np.float32)])
    stored = to_cache(values, KV_CACHE_DTYPES[dtype])
    widened = to_float32(stored)
    y = rng.standard_normal(values.size).astype(np.float32)
    out = np.empty_like(y)
    _axpy_lanes(np.float32(1.0), kernel_view(stored), np.zeros_like(y), out)
    np.testing.assert_array_equal(out, widened)  # 1 * x + 0: the widened value itself
    a = np.float32(0.7)
    _axpy_lanes(a, kernel_view(stored), y, out)
    expected = (np.float64(a) * widened.astype(np.float64) + y).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
