"""F16 and BF16 matrices stay 16-bit in memory (GGUF and safetensors) and are widened by the
kernels as they read: the weights equal the file's values exactly, and the model's logits are the
float32 model's up to that rounding."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import tiny_families
from engine_core import kernels
from engine_core.loader import load_artifact
from engine_core.model import AttentionSpan, DecoderModel, ForwardBatch, KVCache

GOLDEN_DIR = pathlib.Path(__file__).parents[1] / "golden"
IDS = np.array(tiny_families.INPUT_IDS, dtype=np.int64)


def logits_of(path: str) -> np.ndarray:
    config, weights = load_artifact(path)
    model = DecoderModel(config, weights, max_len=64)
    cache = KVCache(config, num_blocks=16, block_size=4)
    n = len(IDS)
    batch = ForwardBatch(IDS, np.arange(n), np.arange(n), [AttentionSpan(0, n, np.arange(-(-n // 4)), n)], None,
                         np.arange(n))
    return model.logits(model.forward(batch, cache))


def rounded(array: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "F16":
        return array.astype(np.float16).astype(np.float32)
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
@pytest.mark.parametrize("variant", ["mistral_full", "qwen3", "gemma3_6l"])
def test_16_bit_gguf_matrices_stay_16_bit_and_give_the_float32_logits(tmp_path, variant, qtype):
    path = tiny_families.write_gguf(tmp_path / f"{variant}-{qtype}.gguf", variant, qtype)
    _, weights = load_artifact(path)
    _, f32_weights = load_artifact(tiny_families.write_gguf(tmp_path / f"{variant}-F32.gguf", variant, "F32"))
    matrices = {name: w for name, w in weights.items() if not isinstance(w, np.ndarray)}
    assert matrices and all(w.qtype == qtype for w in matrices.values())
    assert all(w.ndim == 1 for w in weights.values() if isinstance(w, np.ndarray))  # norms, biases
    for name, w in matrices.items():
        assert w.nbytes == w.tiles * kernels.TILE_ROWS * w.cols * 2, name
        # the file's values exactly (Q/K rows un-permuted like any other format)
        np.testing.assert_array_equal(kernels.dequantize(w), rounded(f32_weights[name], qtype), err_msg=name)
    family = tiny_families.VARIANTS[variant].family
    golden = json.loads((GOLDEN_DIR / f"{family}_tiny_logits.json").read_text())["variants"][variant]
    expected = np.array(golden["logits"], dtype=np.float64)
    got = logits_of(path)[:, tiny_families.GOLDEN_COLUMNS]
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < (0.01 if qtype == "F16" else 0.05), error
