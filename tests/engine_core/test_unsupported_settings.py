"""Model settings that change the math and that the Llama forward does not compute are refused
when the artifact is read, by name, instead of running as a different model: `hidden_act`,
`partial_rotary_factor`, unknown RoPE scaling, quantized checkpoints, MoE or partial-rotary
GGUFs. And a `--max-model-len` past the model's positions needs the explicit override."""

from __future__ import annotations

import json
import pathlib
import shutil

import gguf
import pytest

from engine_core.loader import ArtifactError, check_max_model_len, load_artifact
from engine_core.process import startup_error_line
from engine_helpers import write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tied", "tied")


def with_config(tiny_dir: str, tmp_path: pathlib.Path, **changes) -> pathlib.Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = {**json.loads((model / "config.json").read_text()), **changes}
    (model / "config.json").write_text(json.dumps(config))
    return model


def load_error(path) -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(str(path))
    return str(info.value)


@pytest.mark.parametrize(
    ("changes", "fault"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
         "partial_rotary_factor 0.25 is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs a numeric factor"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config (gptq) is not supported"),
    ],
)
def test_a_setting_the_model_does_not_compute_is_refused_by_name(tiny_dir, tmp_path, changes, fault):
    model = with_config(tiny_dir, tmp_path, **changes)
    message = load_error(model)
    assert message.startswith(f"{model / 'config.json'}: ") and fault in message, message


@pytest.mark.parametrize("changes", [{"hidden_act": "silu"}, {"hidden_act": "swish"}, {"partial_rotary_factor": 1.0},
                                     {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_settings_it_computes_are_accepted(tiny_dir, tmp_path, changes):
    load_artifact(str(with_config(tiny_dir, tmp_path, **changes)))


def test_a_mistral_sliding_window_is_computed_not_a_context_cap(tiny_dir, tmp_path):
    """Mistral's window makes every layer local (the forward attends to the last 64 positions);
    the context stays the model's. Llama's config has no window, so one there changes nothing."""
    config, _ = load_artifact(str(with_config(tiny_dir, tmp_path, sliding_window=64, architectures=["MistralForCausalLM"])))
    assert config.family == "mistral" and config.sliding_window == 64 and config.max_position_embeddings == 128
    assert config.is_sliding(0) and config.is_sliding(1)
    config, _ = load_artifact(str(with_config(tiny_dir, tmp_path / "none", sliding_window=None)))
    assert config.sliding_window is None and config.max_position_embeddings == 128
    config, _ = load_artifact(str(with_config(tiny_dir, tmp_path / "llama", sliding_window=64)))
    assert config.sliding_window is None and not config.is_sliding(0)


def test_a_max_model_len_past_the_models_positions_needs_the_override(tiny_dir):
    config, _ = load_artifact(tiny_dir)
    assert config.max_position_embeddings == 128
    for allowed in (None, 1, 128):
        check_max_model_len(config, allowed, is_long_allowed=False, where=tiny_dir)
    with pytest.raises(ArtifactError) as info:
        check_max_model_len(config, 129, is_long_allowed=False, where=tiny_dir)
    message = str(info.value)
    assert message.startswith(f"{tiny_dir}: --max-model-len 129 is more than the model's context length (128")
    assert "--allow-long-max-model-len" in message
    check_max_model_len(config, 100_000, is_long_allowed=True, where=tiny_dir)


def test_the_start_up_line_names_the_file_and_the_cause(tiny_dir, tmp_path):
    model = with_config(tiny_dir, tmp_path, hidden_act="gelu")
    with pytest.raises(ArtifactError) as info:
        load_artifact(str(model))
    line = startup_error_line(str(model), info.value)
    assert line == f"furiosa-llm: cannot load {model / 'config.json'}: hidden_act 'gelu' is not supported (silu only)"
    line = startup_error_line(str(model), RuntimeError("boom"))
    assert line.startswith(f"furiosa-llm: the engine core cannot start with {model}: RuntimeError: boom")


# ------------------------------------------------------------------ GGUF metadata


def write_gguf_metadata(path: pathlib.Path, **extra) -> str:
    """A llama GGUF with the metadata the loader reads first (no tensors needed to refuse it)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(300)
    for key, value in extra.items():
        if isinstance(value, str):
            writer.add_string(f"llama.{key}", value)
        else:
            writer.add_uint32(f"llama.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize(
    ("extra", "fault"),
    [
        ({"rope.scaling.type": "yarn"}, "llama.rope.scaling.type 'yarn' is not supported"),
        ({"expert_count": 8}, "llama.expert_count 8: mixture of experts is not supported"),
        ({"rope.dimension_count": 8}, "llama.rope.dimension_count 8 is not the head dimension 16"),
        ({"attention.value_length": 8}, "llama.attention.value_length 8 differs from key_length 16"),
    ],
)
def test_a_gguf_setting_the_model_does_not_compute_is_refused_by_name(tmp_path, extra, fault):
    path = write_gguf_metadata(tmp_path / "model.gguf", **extra)
    message = load_error(path)
    assert message.startswith(f"{path}: ") and fault in message, message


def test_a_gguf_without_those_settings_gets_past_the_metadata(tmp_path):
    path = write_gguf_metadata(tmp_path / "model.gguf", **{"rope.dimension_count": 16, "rope.scaling.type": "none"})
    assert "weight model.embed_tokens.weight is missing" in load_error(path)
