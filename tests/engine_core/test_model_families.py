"""Each model family's tiny random checkpoint (tests/tiny_families.py), from its Hugging Face
directory and from GGUF, gives transformers' logits (tests/golden/<family>_tiny_logits.json,
made by scripts/make_family_goldens.py) at every position: in one prefill, and as a short prefill
followed by decodes (the paged decode kernel, sliding windows included)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import tiny_families
from engine_core.loader import ArtifactError, load_artifact
from engine_core.model import AttentionSpan, DecoderModel, ForwardBatch, KVCache, batch_decodes

GOLDEN_DIR = pathlib.Path(__file__).parents[1] / "golden"
BLOCK_SIZE = 4
IDS = np.array(tiny_families.INPUT_IDS, dtype=np.int64)
COLUMNS = tiny_families.GOLDEN_COLUMNS


def golden(variant: str) -> dict:
    family = tiny_families.VARIANTS[variant].family
    return json.loads((GOLDEN_DIR / f"{family}_tiny_logits.json").read_text())["variants"][variant]


def prefill_batch(start: int, stop: int) -> ForwardBatch:
    """Tokens [start, stop) of IDS as one prefill chunk; block i of the sequence is cache block i."""
    positions = np.arange(start, stop)
    blocks = np.arange(-(-stop // BLOCK_SIZE))
    return ForwardBatch(IDS[start:stop], positions, positions, [AttentionSpan(0, stop - start, blocks, stop)], None,
                        np.arange(stop - start))


def decode_batch(position: int) -> ForwardBatch:
    blocks = np.arange(-(-(position + 1) // BLOCK_SIZE))
    pos = np.array([position])
    return ForwardBatch(IDS[position : position + 1], pos, pos, [], batch_decodes([0], [blocks], [position + 1]),
                        np.arange(1))


def run(path: str, prefill: int) -> tuple[np.ndarray, object]:
    """The logits at every position of IDS: the first `prefill` tokens in one step, then one
    decode step per token."""
    config, weights = load_artifact(path)
    model = DecoderModel(config, weights, max_len=64)
    cache = KVCache(config, num_blocks=8, block_size=BLOCK_SIZE)
    rows = [model.logits(model.forward(prefill_batch(0, prefill), cache))]
    rows += [model.logits(model.forward(decode_batch(p), cache)) for p in range(prefill, len(IDS))]
    return np.concatenate(rows), config


def assert_matches_golden(logits: np.ndarray, variant: str, rtol: float = 1e-4) -> None:
    expected = np.array(golden(variant)["logits"], dtype=np.float64)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits[:, COLUMNS], expected, rtol=rtol, atol=rtol * scale)
    assert logits.argmax(axis=1).tolist() == golden(variant)["argmax"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {v: tiny_families.write_hf(root / v, v) for v in tiny_families.VARIANTS}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[tuple[str, str], str]:
    root = tmp_path_factory.mktemp("families_gguf")
    return {(v, q): tiny_families.write_gguf(root / f"{v}-{q}.gguf", v, q)
            for v, spec in tiny_families.VARIANTS.items() if spec.has_gguf for q in ("F32", "Q8_0")}


@pytest.mark.parametrize("variant", list(tiny_families.VARIANTS))
@pytest.mark.parametrize("prefill", [20, 7])
def test_hf_checkpoint_logits_match_transformers(hf_dirs, variant, prefill):
    logits, config = run(hf_dirs[variant], prefill)
    assert config.family == tiny_families.VARIANTS[variant].family
    assert_matches_golden(logits, variant)


GGUF_VARIANTS = [v for v, spec in tiny_families.VARIANTS.items() if spec.has_gguf]


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
@pytest.mark.parametrize("prefill", [20, 7])
def test_f32_gguf_logits_match_transformers(gguf_files, variant, prefill):
    logits, config = run(gguf_files[(variant, "F32")], prefill)
    assert config.family == {"mistral": "llama"}.get(tiny_families.VARIANTS[variant].family,
                                                    tiny_families.VARIANTS[variant].family)
    assert_matches_golden(logits, variant)


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_q8_0_gguf_logits_are_near_transformers(gguf_files, variant):
    """Q8_0 weights (kept quantized, run by the kernels) move the logits by rounding only."""
    logits, _ = run(gguf_files[(variant, "Q8_0")], 7)
    expected = np.array(golden(variant)["logits"], dtype=np.float64)
    error = np.abs(logits[:, COLUMNS] - expected).max() / np.abs(expected).max()
    assert error < 0.03, error


def test_the_configs_carry_each_familys_switches(hf_dirs, gguf_files):
    gemma, _ = load_artifact(hf_dirs["gemma3"])
    assert gemma.sliding_layers == (True, False, True) and gemma.sliding_window == 4
    assert gemma.query_scale == pytest.approx(24**-0.5) and gemma.local_rope_theta == 10000.0
    assert gemma.norm_adds_one and gemma.sandwich_norms and gemma.hidden_act == "gelu_tanh"
    gemma_gguf, weights = load_artifact(gguf_files[("gemma3_6l", "F32")])
    assert gemma_gguf.sliding_layers == (True,) * 5 + (False,) and not gemma_gguf.norm_adds_one
    assert gemma_gguf.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    phi3, _ = load_artifact(hf_dirs["phi3"])
    assert phi3.fused_projections and phi3.rope_scaling["attention_factor"] == pytest.approx(
        tiny_families.expected_phi3_attention_factor())
    phi3_gguf, _ = load_artifact(gguf_files[("phi3", "F32")])
    assert phi3_gguf.rope_scaling["short_factor"] == pytest.approx(phi3.rope_scaling["short_factor"])
    qwen2, _ = load_artifact(hf_dirs["qwen2"])
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.sliding_window is None
    assert not qwen2.tie_word_embeddings and load_artifact(hf_dirs["qwen2_tied"])[0].tie_word_embeddings


def test_a_window_changes_the_output_past_it(hf_dirs, tmp_path):
    """Without its window Mistral's logits differ from transformers' past position 5: the window
    is what the golden agreement rests on, not an accident of short contexts."""
    config = json.loads((pathlib.Path(hf_dirs["mistral"]) / "config.json").read_text())
    unwindowed = tmp_path / "mistral"
    tiny_families.write_hf(unwindowed, "mistral")
    (unwindowed / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    logits, _ = run(str(unwindowed), 20)
    expected = np.array(golden("mistral")["logits"])
    assert np.allclose(logits[:5, COLUMNS], expected[:5], rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(logits[5:, COLUMNS] - expected[5:]).max() > 1e-2


def test_an_unsupported_architecture_is_named_with_the_supported_ones(hf_dirs, tmp_path):
    model = tmp_path / "model"
    tiny_families.write_hf(model, "qwen2")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ArtifactError) as info:
        load_artifact(str(model))
    message = str(info.value)
    assert "\n" not in message and "FalconForCausalLM is not supported" in message
    assert "Gemma3ForCausalLM" in message and "Qwen2ForCausalLM" in message and "Phi3ForCausalLM" in message


def test_an_unsupported_gguf_architecture_is_named_with_the_supported_ones(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ArtifactError) as info:
        load_artifact(str(path))
    assert str(info.value) == (f"{path}: GGUF architecture 'falcon' is not supported "
                               "(supported: gemma3, llama, phi3, qwen2, qwen3)")
