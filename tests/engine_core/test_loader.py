"""Loading artifacts: the tiny Hugging Face checkpoints give transformers' logits at every
position, and every kind of broken artifact is an ArtifactError naming the file and the fault.

Logit tolerance: rtol 1e-4 plus atol 1e-5 x the variant's largest |logit| (59 for `tied`, whose
head is the N(0, 1) embedding matrix; about 4 for the others). The golden values have 6
significant digits; the measured error is about 1e-6 of the logit scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import engine_core.model as model_module
from engine_core.loader import ArtifactError, load_artifact
from engine_core.sampler import log_softmax
from engine_helpers import collect, tiny_core, tiny_request, write_tiny_model
from tiny_llama import VARIANTS

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "tiny_llama_logits.json").read_text())
INPUT_IDS = GOLDEN["input_ids"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {variant: write_tiny_model(root / variant, variant) for variant in VARIANTS}


def fresh_copy(tiny_dirs, tmp_path, variant: str = "tied") -> pathlib.Path:
    target = tmp_path / variant
    shutil.copytree(tiny_dirs[variant], target)
    return target


def golden_logits(variant: str) -> tuple[np.ndarray, float]:
    expected = np.array(GOLDEN["variants"][variant]["logits"], dtype=np.float64)
    return expected, 1e-5 * float(np.abs(expected).max())


# ------------------------------------------------------------------ loading and logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_is_the_one_the_golden_logits_came_from(tiny_dirs, variant):
    for file_name, sha256 in GOLDEN["variants"][variant]["weights_sha256"].items():
        data = (pathlib.Path(tiny_dirs[variant]) / file_name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256, f"tests/tiny_llama.py changed {file_name}"


def test_configs_are_read_from_config_json(tiny_dirs):
    tied, _ = load_artifact(tiny_dirs["tied"])
    llama3, llama3_weights = load_artifact(tiny_dirs["llama3"])
    sharded, sharded_weights = load_artifact(tiny_dirs["sharded_fp16_bias"])
    assert (tied.vocab_size, tied.hidden_size, tied.num_layers, tied.num_heads, tied.num_kv_heads,
            tied.head_dim, tied.intermediate_size) == (300, 64, 2, 4, 2, 16, 128)
    assert tied.tie_word_embeddings and not llama3.tie_word_embeddings
    assert llama3.rope_scaling["rope_type"] == "llama3" and llama3.max_position_embeddings == 256
    assert "lm_head.weight" in llama3_weights
    assert sharded.attention_bias and "model.layers.1.self_attn.o_proj.bias" in sharded_weights
    # a float16 checkpoint's matrices stay 16-bit (the kernels widen them as they read); its
    # vectors (norms, biases) become float32
    for name, w in sharded_weights.items():
        if isinstance(w, np.ndarray):
            assert w.ndim == 1 and w.dtype == np.float32, name
        else:
            assert w.qtype == "F16" and w.codes.dtype == np.uint16, name
    bf16 = load_artifact(tiny_dirs["llama3"])[1]["model.layers.0.mlp.down_proj.weight"]
    assert bf16.qtype == "BF16" and bf16.nbytes < 2.1 * bf16.rows * bf16.cols


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_at_every_position_match_transformers(tiny_dirs, variant):
    core = tiny_core(tiny_dirs[variant])
    core.add_request(tiny_request("golden", INPUT_IDS, max_tokens=1))
    plan = core.scheduler.schedule()
    assert [e.num_tokens for e in plan.entries] == [len(INPUT_IDS)]
    # rows 0..18 as prompt-logit rows, row 19 as the sampled position
    result = core.runner.execute(plan, {0: len(INPUT_IDS) - 1})
    got = np.concatenate([result.prompt_logits[0], result.sample_logits])
    expected, atol = golden_logits(variant)
    assert got.shape == expected.shape == (20, 300)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("length", [2, 3, 6, 7])
def test_logits_of_a_step_of_a_few_tokens_match_transformers(tiny_dirs, variant, length, monkeypatch):
    """Steps of up to GEMV_MAX_ROWS tokens take each weight one row at a time (length 7 does not),
    and the lm_head in vocabulary slices: here three of the 300 columns' (the last one short)."""
    assert model_module.GEMV_MAX_ROWS == 6
    monkeypatch.setattr(model_module, "LM_HEAD_SLICE", 128)
    core = tiny_core(tiny_dirs[variant])
    core.add_request(tiny_request("few", INPUT_IDS[:length], max_tokens=1))
    result = core.runner.execute(core.scheduler.schedule(), {0: length - 1})
    got = np.concatenate([result.prompt_logits[0], result.sample_logits])
    expected, atol = golden_logits(variant)
    np.testing.assert_allclose(got, expected[:length], rtol=1e-4, atol=atol)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_logprobs_of_a_scored_prompt_match_transformers(tiny_dirs, variant):
    """max_tokens=0 scores the prompt: position i's logprobs come from the logits at i - 1."""
    core = tiny_core(tiny_dirs[variant], max_num_batched_tokens=7)  # three prefill chunks
    core.add_request(tiny_request("score", INPUT_IDS, max_tokens=0, prompt_logprobs=3))
    (output,) = collect(core)
    assert output.new_token_ids == [] and output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(INPUT_IDS)
    expected, atol = golden_logits(variant)
    expected_logprobs = log_softmax(expected)
    for position in range(1, len(INPUT_IDS)):
        entry = output.prompt_logprobs[position]
        row = expected_logprobs[position - 1]
        token = INPUT_IDS[position]
        assert entry.token_id == token
        np.testing.assert_allclose(entry.logprob, row[token], rtol=1e-4, atol=atol)
        np.testing.assert_allclose(entry.top_logprobs, np.sort(row)[::-1][:3], rtol=1e-4, atol=atol)
        assert entry.rank == 1 + np.count_nonzero(row > row[token]), position


def test_greedy_continuation_starts_with_the_golden_argmax(tiny_dirs):
    expected, _ = golden_logits("llama3")
    top2 = np.sort(expected[-1])[-2:]
    assert top2[1] - top2[0] > 1e-3  # a clear winner, so the comparison is meaningful
    core = tiny_core(tiny_dirs["llama3"])
    core.add_request(tiny_request("g", INPUT_IDS, temperature=0.0, max_tokens=1, eos_token_ids=[]))
    (output,) = collect(core)
    assert output.new_token_ids == [int(np.argmax(expected[-1]))]


# ------------------------------------------------------------------ broken artifacts


def assert_artifact_error(path, named_file, *faults: str) -> None:
    """Loading path fails with a message that names named_file and, apart from it, the faults."""
    with pytest.raises(ArtifactError) as info:
        load_artifact(str(path))
    message = str(info.value)
    assert str(named_file) in message, message
    rest = message.replace(str(named_file), "")  # test paths can contain any word
    for fault in faults:
        assert fault in rest, message


def test_missing_path(tmp_path):
    assert_artifact_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "no such file")


def test_a_file_that_is_neither_gguf_nor_a_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    assert_artifact_error(tmp_path / "weights.bin", "weights.bin", "not a .gguf file")


def test_directory_without_config_json(tiny_dirs, tmp_path):
    model = fresh_copy(tiny_dirs, tmp_path)
    (model / "config.json").unlink()
    assert_artifact_error(model, str(model / "config.json"), "missing")


def test_unreadable_config_json(tiny_dirs, tmp_path):
    model = fresh_copy(tiny_dirs, tmp_path)
    (model / "config.json").write_text('{"hidden_size": ')
    assert_artifact_error(model, str(model / "config.json"), "unreadable")


def test_config_json_missing_a_required_field(tiny_dirs, tmp_path):
    model = fresh_copy(tiny_dirs, tmp_path)
    config = json.loads((model / "config.json").read_text())
    del config["num_hidden_layers"]
    (model / "config.json").write_text(json.dumps(config))
    assert_artifact_error(model, str(model / "config.json"), "num_hidden_layers")


@pytest.mark.parametrize(
    ("change", "fault"),
    [({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"), ({"mlp_bias": True}, "mlp_bias")],
)
def test_unsupported_model(tiny_dirs, tmp_path, change, fault):
    model = fresh_copy(tiny_dirs, tmp_path)
    config = {**json.loads((model / "config.json").read_text()), **change}
    (model / "config.json").write_text(json.dumps(config))
    assert_artifact_error(model, str(model / "config.json"), fault, "not supported")


def test_directory_without_weights(tiny_dirs, tmp_path):
    model = fresh_copy(tiny_dirs, tmp_path)
    (model / "model.safetensors").unlink()
    assert_artifact_error(model, str(model), "no *.safetensors")


@pytest.mark.parametrize(
    ("keep_bytes", "fault"),
    [
        (5, "not a readable safetensors file"),  # inside the 8-byte header length
        (200, "not a readable safetensors file"),  # inside the JSON header
        (60_000, "runs past the end of the file"),  # inside the tensor data
    ],
)
def test_truncated_safetensors(tiny_dirs, tmp_path, keep_bytes, fault):
    model = fresh_copy(tiny_dirs, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    assert len(data) > keep_bytes
    weights.write_bytes(data[:keep_bytes])
    assert_artifact_error(model, str(weights), fault)


def rewrite_safetensors_header(path: pathlib.Path, edit) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


@pytest.mark.parametrize(
    ("edit", "fault"),
    [
        (lambda h: h["model.norm.weight"].update(shape=[65]), "do not fit shape [65]"),
        (lambda h: h["model.norm.weight"].pop("data_offsets"), "malformed header entry"),
        (lambda h: h["model.norm.weight"].update(dtype="I64"), "unsupported dtype I64"),
    ],
)
def test_corrupt_safetensors_header(tiny_dirs, tmp_path, edit, fault):
    model = fresh_copy(tiny_dirs, tmp_path)
    rewrite_safetensors_header(model / "model.safetensors", edit)
    assert_artifact_error(model, str(model / "model.safetensors"), "model.norm.weight", fault)


def test_shard_index_naming_a_missing_file(tiny_dirs, tmp_path):
    model = fresh_copy(tiny_dirs, tmp_path, "sharded_fp16_bias")
    (model / "model-00002-of-00002.safetensors").unlink()
    assert_artifact_error(model, str(model / "model.safetensors.index.json"), "missing",
                          "model-00002-of-00002.safetensors")


def test_wrong_weight_shape_names_the_shard_file(tiny_dirs, tmp_path):
    model = fresh_copy(tiny_dirs, tmp_path, "sharded_fp16_bias")
    shard = model / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("k_proj.weight"))
    tensors[name] = np.ascontiguousarray(tensors[name].T)  # [in, out] instead of [out, in]
    save_file(tensors, str(shard))
    assert_artifact_error(model, str(shard), name, "has shape (64, 32), expected (32, 64)")


@pytest.mark.parametrize("missing", ["model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.up_proj.weight"])
def test_missing_weight(tiny_dirs, tmp_path, missing):
    model = fresh_copy(tiny_dirs, tmp_path, "sharded_fp16_bias")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][missing]
    tensors = load_file(str(shard))
    del tensors[missing]
    save_file(tensors, str(shard))
    assert_artifact_error(model, str(model), f"weight {missing} is missing")


def test_garbage_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a model \x00\x01\x02")
    assert_artifact_error(path, str(path), "not a readable GGUF file")


def test_empty_gguf(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_artifact_error(path, str(path), "not a readable GGUF file")


@pytest.mark.parametrize("keep_bytes", [24, 100_000, 1_900_000])
def test_truncated_copy_of_the_real_gguf(default_model, tmp_path, keep_bytes):
    """The head of SmolLM2's GGUF: cut in the header, in the tokenizer metadata, and in the
    tensor data (its metadata ends at 1,785,664 bytes): an interrupted download."""
    assert os.path.getsize(default_model) > keep_bytes
    with open(default_model, "rb") as f:
        head = f.read(keep_bytes)
    assert head[:4] == b"GGUF"
    path = tmp_path / "head.gguf"
    path.write_bytes(head)
    assert_artifact_error(path, str(path), "not a readable GGUF file", "truncated")
