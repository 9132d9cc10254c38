"""The row-wise kernels between a layer's matmuls (engine_core/kernels/elementwise.py) against
numpy, with one and two kernel threads, and row results that do not depend on the batch."""

import numpy as np
import pytest

from engine_core import kernels
from engine_core.kernels import elementwise as ew


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(ew, "PARALLEL_MIN_ELEMENTS", 0)  # the parallel forms from 8 rows, however short
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(1)


def _norm_ref(x, w, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + eps) * w).astype(np.float32)


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_rms_norm_and_the_fused_residual_add(threads, rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 576), dtype=np.float32) * 3
    delta = rng.standard_normal((rows, 576), dtype=np.float32)
    w = rng.standard_normal(576, dtype=np.float32)
    np.testing.assert_allclose(ew.rms_norm(x, w, 1e-5), _norm_ref(x, w, 1e-5), rtol=2e-5, atol=2e-6)
    summed = x + delta
    h = ew.add_rms_norm(x, delta, w, 1e-6)
    np.testing.assert_array_equal(x, summed)  # the residual stream updated in place
    np.testing.assert_allclose(h, _norm_ref(summed, w, 1e-6), rtol=2e-5, atol=2e-6)


def test_a_rows_norm_does_not_depend_on_the_rest_of_the_batch(threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64), dtype=np.float32)
    w = rng.standard_normal(64, dtype=np.float32)
    whole = ew.rms_norm(x, w, 1e-5)
    for i in (0, 17, 39):
        np.testing.assert_array_equal(ew.rms_norm(x[i : i + 1], w, 1e-5)[0], whole[i])


@pytest.mark.parametrize("rows", [1, 5, 20])
def test_rope_in_place_on_a_view_of_the_qkv_rows(threads, rows):
    rng = np.random.default_rng(rows)
    heads, kv_heads, dim = 9, 3, 64
    qkv = rng.standard_normal((rows, (heads + 2 * kv_heads) * dim), dtype=np.float32)
    positions = rng.integers(0, 100, size=rows)
    angles = np.outer(np.arange(100), 1.0 / 10000 ** (np.arange(0, dim, 2) / dim))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    before = qkv.copy()
    qk = qkv[:, : (heads + kv_heads) * dim].reshape(rows, heads + kv_heads, dim)
    ew.rope_(qk, positions, cos, sin)
    ref = before[:, : (heads + kv_heads) * dim].reshape(rows, heads + kv_heads, dim)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    first, second = ref[..., : dim // 2], ref[..., dim // 2 :]
    expected = np.concatenate([first * c - second * s, second * c + first * s], axis=-1)
    np.testing.assert_allclose(qk, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(qkv[:, (heads + kv_heads) * dim :], before[:, (heads + kv_heads) * dim :])


@pytest.mark.parametrize("rows", [1, 9])
def test_silu_mul_over_the_whole_float32_range(threads, rows):
    rng = np.random.default_rng(rows)
    inter = 1536
    gate_up = rng.standard_normal((rows, 2 * inter), dtype=np.float32) * 6
    gate_up[0, :8] = [0.0, -0.0, 88.0, -88.0, 200.0, -200.0, 1e-30, -1e-30]
    gate, up = gate_up[:, :inter].astype(np.float64), gate_up[:, inter:].astype(np.float64)
    with np.errstate(over="ignore"):
        expected = gate / (1.0 + np.exp(-gate)) * up
    got = ew.silu_mul(gate_up, inter)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=3e-6, atol=1e-6)
