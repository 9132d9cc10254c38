"""The opt-in int8-activation GEMV (kernels/int8_gemv.py, `--activation-dtype int8`).

Two references: the same int8 math done in numpy (x quantized per 32 values exactly as the kernel
does, then the dequantized weights times the dequantized activations in float64), which the kernel
must match to float rounding; and the float32 path, from which it may differ by at most the
rounding of the activations: |sum_k w[k] e[k]| <= sum_g dx[g] / 2 * sum_(k in g) |w[k]|.
"""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
import pytest

from engine_core import kernels
from engine_core.kernels import TILE_ROWS
from engine_core.kernels import int8_gemv as i8
from engine_helpers import request, run_to_completion

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "smollm2_greedy.json").read_text())
# leading greedy tokens of every golden prompt that int8 activations keep (measured: 8, 8, 17, 62
# and 3 x all 64 of the 7 prompts; the first divergences are at margins of 0.004-0.16)
GOLDEN_PREFIX = 6

NIBBLE_FORMATS = {"Q4_0": (32, 18, (0,)), "Q4_1": (32, 20, (0, 2)), "Q4_K": (256, 144, (0, 2))}


@pytest.fixture(autouse=True)
def float32_afterwards():
    """The switch is process-wide: leave it as the other tests expect it."""
    yield
    kernels.set_activation_precision("float32")


def quantized(qtype: str, rows: int, cols: int, seed: int = 0):
    """Random valid blocks (random codes and small-integer scales, sane float16 scales), tiled, and
    gguf's own dequantization of them."""
    block, size, f16_fields = NIBBLE_FORMATS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in f16_fields:
        scale = (rng.uniform(0.5, 2.0, (rows, cols // block)) * 1e-3).astype(np.float16)
        raw[..., offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    raw = raw.reshape(rows, -1)
    w = kernels.pack(qtype, kernels.unpack(qtype, raw, cols), rows, cols)
    return w, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32)


def quantize_reference(x: np.ndarray):
    """numpy's version of quantize_rows: q in [-127, 127], scale amax / 127 per 32 values."""
    groups = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(groups).max(axis=2)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(groups * inv[..., None]).astype(np.int32)
    dx = amax / np.float32(127)
    return q.reshape(x.shape), dx, dx * q.sum(axis=2).astype(np.float32)


def activations(m: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, cols)).astype(np.float32)
    x[:, :32] *= 50  # groups of very different magnitude, and one of zeros
    if cols >= 96:
        x[:, 64:96] = 0
    return x


def shapes(qtype: str):
    k = 256 if qtype == "Q4_K" else 96  # 96: three groups, not a multiple of 256
    return [(1, k), (TILE_ROWS - 1, k), (TILE_ROWS + 3, 2 * k), (2 * TILE_ROWS, 512)]


def int8_matmul(x: np.ndarray, w) -> np.ndarray:
    kernels.set_activation_precision("int8")
    try:
        return kernels.matmul(x, w)
    finally:
        kernels.set_activation_precision("float32")


def test_quantize_rows_matches_numpy_bit_for_bit():
    x = activations(5, 320, seed=1)
    x[2, 40] = 0.5 * x[2, 40:72].max()  # ties and extremes come out the same way
    xq = np.empty(x.shape, np.int16)
    dx = np.empty((5, 10), np.float32)
    xs = np.empty((5, 10), np.float32)
    i8.quantize_rows(x, xq, dx, xs)
    q, dx_ref, xs_ref = quantize_reference(x)
    np.testing.assert_array_equal(xq, q)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(xs, xs_ref)
    assert np.abs(xq).max() == 127 and not xq[:, 64:96].any()


@pytest.mark.parametrize("qtype", sorted(NIBBLE_FORMATS))
@pytest.mark.parametrize("m", [1, 2, 5, kernels.gemv_max_rows("Q4_0")])
def test_int8_gemv_is_the_same_int8_math_as_numpy(qtype, m):
    for rows, cols in shapes(qtype):
        w, ref = quantized(qtype, rows, cols, seed=rows + m)
        x = activations(m, cols, seed=m)
        q, dx, _ = quantize_reference(x)
        x_dequantized = (q.reshape(m, -1, 32) * dx[..., None].astype(np.float64)).reshape(m, cols)
        expected = x_dequantized @ ref.T.astype(np.float64)
        actual = int8_matmul(x, w)
        assert actual.shape == (m, rows)
        err = np.abs(actual - expected).max() / np.abs(expected).max()
        assert err <= 2e-6, (qtype, rows, cols, err)


@pytest.mark.parametrize("qtype", sorted(NIBBLE_FORMATS))
def test_int8_gemv_differs_from_float32_by_at_most_the_activation_rounding(qtype):
    m = 3
    for rows, cols in shapes(qtype):
        w, ref = quantized(qtype, rows, cols, seed=rows)
        x = activations(m, cols, seed=rows)
        _, dx, _ = quantize_reference(x)
        # per output: sum over groups of (half a step) * (sum of |w| in the group), plus float slack
        bound = (dx[:, None, :] / 2 * np.abs(ref).reshape(rows, -1, 32).sum(axis=2)[None]).sum(axis=2)
        exact = x.astype(np.float64) @ ref.T.astype(np.float64)
        diff = np.abs(int8_matmul(x, w) - exact)
        assert (diff <= bound * 1.0001 + 2e-6 * np.abs(exact).max()).all()
        # and it is a real approximation, not merely bounded: about 1% of the outputs' range here
        assert diff.max() <= 0.03 * np.abs(exact).max()
        np.testing.assert_array_less(0, diff.max())  # int8 really ran: float32 would be exact


@pytest.mark.parametrize("qtype", sorted(NIBBLE_FORMATS))
def test_parallel_kernel_gives_the_serial_bits(qtype):
    w, _ = quantized(qtype, 5 * TILE_ROWS - 7, 512, seed=3)
    for m in (1, 4):
        x = activations(m, 512, seed=m)
        args = (w.codes, w.d, w.sc, w.dmin, w.mn, w.groups_per_super, x)
        serial = np.full((m, w.tiles * TILE_ROWS), np.nan, np.float32)
        i8.gemv_nibbles_int8(*args, serial, 0, w.tiles)
        for parts in (2, 3):
            parallel = np.full_like(serial, np.nan)
            i8.gemv_nibbles_int8_parallel(*args, parallel, parts)
            np.testing.assert_array_equal(parallel, serial)


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_with_threads_gives_the_same_bits(monkeypatch, threads):
    w, _ = quantized("Q4_K", 4 * TILE_ROWS + 1, 1024, seed=9)
    x = activations(2, 1024, seed=9)
    expected = int8_matmul(x, w)  # one thread: the serial kernel
    before = kernels.num_threads()
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)  # split even this small weight
    kernels.set_num_threads(threads)
    try:
        np.testing.assert_array_equal(int8_matmul(x, w), expected)
    finally:
        kernels.set_num_threads(before)


def test_switch_covers_only_the_few_row_4bit_gemv():
    assert kernels.activation_precision() == "float32"
    w4, ref4 = quantized("Q4_1", TILE_ROWS, 96)
    raw8 = np.random.default_rng(0).integers(0, 256, (TILE_ROWS, 3, 34), dtype=np.uint8)
    raw8[..., 0:2] = np.array([1e-3], np.float16).view(np.uint8)
    w8 = kernels.pack("Q8_0", kernels.unpack("Q8_0", raw8.reshape(TILE_ROWS, -1), 96), TILE_ROWS, 96)
    x = activations(1, 96, seed=0)
    many = activations(kernels.gemv_max_rows("Q4_0") + 1, 96, seed=0)
    float_4bit, float_8bit, float_many = kernels.matmul(x, w4), kernels.matmul(x, w8), kernels.matmul(many, w4)
    kernels.set_activation_precision("int8")
    assert kernels.activation_precision() == "int8"
    assert not np.array_equal(kernels.matmul(x, w4), float_4bit)
    np.testing.assert_array_equal(kernels.matmul(x, w8), float_8bit)  # 8-bit codes: float32 still
    np.testing.assert_array_equal(kernels.matmul(many, w4), float_many)  # many rows: dequantize + BLAS
    with pytest.raises(ValueError, match="int8"):
        kernels.set_activation_precision("int4")
    assert kernels.activation_precision() == "int8"


def test_warm_up_compiles_the_int8_kernels():
    kernels.set_activation_precision("int8")
    kernels.warm_up({"Q4_0", "Q4_1", "Q4_K"})
    assert i8.gemv_nibbles_int8.signatures and i8.quantize_rows.signatures


def test_engine_with_int8_activations_gives_sensible_greedy_text(make_core):
    """SmolLM2 (Q4_1 weights, batched decode of the golden prompts) with int8 activations: its
    greedy tokens start as transformers' float32 ones do (see GOLDEN_PREFIX)."""
    core = make_core(activation_dtype="int8")
    assert kernels.activation_precision() == "int8"
    cases = GOLDEN["cases"]
    for i, case in enumerate(cases):
        core.add_request(request(str(i), case["prompt_token_ids"], temperature=0.0, ignore_eos=True,
                                 max_tokens=GOLDEN_PREFIX))
    tokens = run_to_completion(core)
    for i, case in enumerate(cases):
        assert tokens[str(i)][0] == case["greedy_token_ids"][:GOLDEN_PREFIX], case["name"]
