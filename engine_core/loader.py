"""Read a model artifact (a GGUF file or a Hugging Face directory) into float32 numpy weights.

Both paths produce the same thing: a `ModelConfig` and a dict of weights under canonical
Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...) in HF's [out, in] layout.
Any problem with the artifact raises `ArtifactError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from engine_core.kernels.formats import QuantizedWeight


class ArtifactError(Exception):
    """The model artifact is missing, unreadable or not a model we can run."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    name: str = "model"


SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}


def load_artifact(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return load_hf_directory(path)
    if path.endswith(".gguf"):
        return load_gguf(path)
    raise ArtifactError(f"{path}: not a .gguf file or a Hugging Face model directory")


# ---------------------------------------------------------------------------- Hugging Face


def load_hf_directory(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{config_path}: missing (a Hugging Face model directory needs one)")
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{config_path}: unreadable: {e}") from e
    config = _config_from_hf(raw, config_path, name=os.path.basename(os.path.normpath(path)))
    weights: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}  # weight name -> the file it came from, for error messages
    for shard in _safetensors_files(path):
        tensors = read_safetensors(shard)
        weights.update(tensors)
        origin.update(dict.fromkeys(tensors, shard))
    _check_weights(weights, config, path, origin)
    return config, weights


def _config_from_hf(raw: dict, where: str, name: str) -> ModelConfig:
    _refuse_unsupported_hf(raw, where)
    try:
        hidden = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        rope_scaling = raw.get("rope_scaling")
        rope_theta = raw.get("rope_theta")
        if rope_theta is None and isinstance(raw.get("rope_parameters"), dict):
            rope_theta = raw["rope_parameters"].get("rope_theta")
            if raw["rope_parameters"].get("rope_type", "default") != "default":
                rope_scaling = raw["rope_parameters"]
        max_positions = int(raw.get("max_position_embeddings", 2048))
        # Mistral's sliding window: within it, attention over the full context is the same
        # math, so the context is capped at the window (as vLLM's --disable-sliding-window does).
        if raw.get("sliding_window") is not None:
            max_positions = min(max_positions, int(raw["sliding_window"]))
        config = ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            name=name,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: missing or invalid field {e}") from e
    _refuse_unsupported_rope(config.rope_scaling, where)
    return config


SUPPORTED_HIDDEN_ACTS = {"silu", "swish"}  # the same function; the MLP computes SiLU
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3"}  # what model.rope_inv_freq computes


def _refuse_unsupported_hf(raw: dict, where: str) -> None:
    """Settings that change the model's math and that the Llama forward does not compute are
    refused by name: running without them would give a different model's output, silently."""
    archs = raw.get("architectures") or []
    if archs and not set(archs) & SUPPORTED_ARCHITECTURES:
        raise ArtifactError(f"{where}: architecture {archs} is not supported (Llama family only)")
    if raw.get("mlp_bias"):
        raise ArtifactError(f"{where}: mlp_bias is not supported")
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act not in SUPPORTED_HIDDEN_ACTS:
        raise ArtifactError(f"{where}: hidden_act {hidden_act!r} is not supported (silu only)")
    rope_parameters = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    for source in (raw, rope_parameters):
        factor = source.get("partial_rotary_factor", 1.0)
        if factor is not None and factor != 1:
            raise ArtifactError(f"{where}: partial_rotary_factor {factor} is not supported "
                                "(rotary embedding over the whole head only)")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) else "?"
        raise ArtifactError(f"{where}: quantization_config ({method}) is not supported "
                            "(float checkpoints or GGUF only)")


def _refuse_unsupported_rope(rope_scaling: dict | None, where: str) -> None:
    if not rope_scaling:
        return
    if not isinstance(rope_scaling, dict):
        raise ArtifactError(f"{where}: rope_scaling {rope_scaling!r} is not a JSON object")
    kind = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ArtifactError(f"{where}: rope_scaling type {kind!r} is not supported "
                            f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})")
    if kind in ("linear", "llama3") and not isinstance(rope_scaling.get("factor"), (int, float)):
        raise ArtifactError(f"{where}: rope_scaling type {kind!r} needs a numeric factor")


def check_max_model_len(config: ModelConfig, max_model_len: int | None, *, is_long_allowed: bool,
                        where: str) -> None:
    """A context longer than the model's positions is refused unless explicitly allowed."""
    if max_model_len is None or max_model_len <= config.max_position_embeddings or is_long_allowed:
        return
    raise ArtifactError(
        f"{where}: --max-model-len {max_model_len} is more than the model's context length "
        f"({config.max_position_embeddings}, its max_position_embeddings); positions past it were "
        "never trained and may give wrong output (--allow-long-max-model-len accepts it anyway)"
    )


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ArtifactError(f"{index}: unreadable index: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise ArtifactError(f"{index}: names shard files that are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ArtifactError(f"{path}: no *.safetensors weights found")
    return [os.path.join(path, f) for f in files]


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read F32/F16/BF16 tensors as float32 (numpy has no bfloat16, so BF16 is widened by hand)."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    except (OSError, ValueError, struct.error) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file: {e}") from e
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            what = info.get("dtype") if isinstance(info, dict) else info
            raise ArtifactError(f"{path}: tensor {name} has unsupported dtype {what}")
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: tensor {name} has a malformed header entry: {e!r}") from e
        if end > data.shape[0]:
            raise ArtifactError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        if not 0 <= start <= end or end - start != np.dtype(dtype).itemsize * math.prod(shape):
            raise ArtifactError(f"{path}: tensor {name} has data_offsets {[start, end]} that do not fit shape {shape}")
        raw = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":
            tensors[name] = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            tensors[name] = raw.astype(np.float32)
    return tensors


def _check_weights(weights: dict[str, np.ndarray], config: ModelConfig, where: str,
                   origin: dict[str, str] | None = None) -> None:
    expected = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
    }
    q_out = config.num_heads * config.head_dim
    kv_out = config.num_kv_heads * config.head_dim
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (config.hidden_size,),
            p + "post_attention_layernorm.weight": (config.hidden_size,),
            p + "self_attn.q_proj.weight": (q_out, config.hidden_size),
            p + "self_attn.k_proj.weight": (kv_out, config.hidden_size),
            p + "self_attn.v_proj.weight": (kv_out, config.hidden_size),
            p + "self_attn.o_proj.weight": (config.hidden_size, q_out),
            p + "mlp.gate_proj.weight": (config.intermediate_size, config.hidden_size),
            p + "mlp.up_proj.weight": (config.intermediate_size, config.hidden_size),
            p + "mlp.down_proj.weight": (config.hidden_size, config.intermediate_size),
        })
        if config.attention_bias:
            expected.update({
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
                p + "self_attn.o_proj.bias": (config.hidden_size,),
            })
    if not config.tie_word_embeddings and "lm_head.weight" in weights:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for name, shape in expected.items():
        if name not in weights:
            raise ArtifactError(f"{where}: weight {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise ArtifactError(
                f"{(origin or {}).get(name, where)}: weight {name} has shape {tuple(weights[name].shape)}, expected {shape}"
            )


# ---------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, np.ndarray | QuantizedWeight]]:
    """Block-quantized tensors stay quantized (kernels.QuantizedWeight); F32/F16/BF16 become
    float32 numpy arrays. Any other tensor type is an ArtifactError naming the tensor."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError ...
        raise ArtifactError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e
    config = _config_from_gguf(reader, path)
    weights: dict[str, np.ndarray | QuantizedWeight] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        try:
            weights[name] = _gguf_tensor(tensor, name, config)
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from e
        except Exception as e:
            raise ArtifactError(f"{path}: cannot read tensor {tensor.name}: {e}") from e
    reader = tensor = None  # drops the file mapping: the weights now live in our own arrays
    if "lm_head.weight" not in weights:
        config = _replace(config, tie_word_embeddings=True)
    _check_weights(weights, config, path)
    return config, weights


def _gguf_tensor(tensor, name: str, config: ModelConfig) -> np.ndarray | QuantizedWeight:
    from engine_core import kernels

    kind = int(tensor.tensor_type)
    # llama.cpp's converter permutes Q/K rows for its interleaved RoPE; undo it so the model can
    # use Hugging Face's rotate-half RoPE. Rows are independent in every format: whole rows move.
    heads = (config.num_heads if name.endswith("q_proj.weight")
             else config.num_kv_heads if name.endswith("k_proj.weight") else 0)
    if kind in kernels.BLOCK_FORMATS and tensor.data.ndim == 2:
        qtype = kernels.BLOCK_FORMATS[kind][0]
        rows, cols = (int(n) for n in tensor.shape[::-1])
        if qtype.endswith("_K") and cols % 256:
            raise ArtifactError(f"tensor {tensor.name} ({qtype}) has rows of {cols}, not a multiple of 256")
        parts = kernels.unpack(qtype, np.asarray(tensor.data), cols)
        if heads:
            parts = kernels.permute_rows(parts, _unpermute_order(rows, heads))
        return kernels.pack(qtype, parts, rows, cols)
    if kind in kernels.PLAIN_FORMATS:
        # F16/BF16 are widened to float32 (twice their size); only norms are F32 in the usual files
        import gguf

        # a copy: an F32 tensor comes back as a view of the file mapping, which would keep the
        # whole file resident
        array = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, copy=True)
        if heads:
            array = array[_unpermute_order(array.shape[0], heads)]
        return array
    type_name = getattr(tensor.tensor_type, "name", str(kind))
    supported = ", ".join(sorted(set(kernels.PLAIN_FORMATS.values()) | {v[0] for v in kernels.BLOCK_FORMATS.values()}))
    raise ArtifactError(f"tensor {tensor.name} has type {type_name}, which is not supported (supported: {supported})")


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _gguf_value(reader, key: str, default=None):
    field_ = reader.fields.get(key)
    if field_ is None:
        return default
    return field_.contents()


def _config_from_gguf(reader, path: str) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ArtifactError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")

    def need(key: str):
        value = _gguf_value(reader, f"llama.{key}")
        if value is None:
            raise ArtifactError(f"{path}: GGUF metadata llama.{key} is missing")
        return value

    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    vocab = _gguf_value(reader, "llama.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise ArtifactError(f"{path}: cannot tell the vocabulary size")
    rope_scaling = None
    scaling_type = _gguf_value(reader, "llama.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ArtifactError(f"{path}: GGUF llama.rope.scaling.type {scaling_type!r} is not supported (linear only)")
    num_experts = int(_gguf_value(reader, "llama.expert_count", 0) or 0)
    if num_experts > 0:
        raise ArtifactError(f"{path}: GGUF llama.expert_count {num_experts}: mixture of experts is not supported")
    head_dim = int(_gguf_value(reader, "llama.attention.key_length", hidden // num_heads))
    value_dim = int(_gguf_value(reader, "llama.attention.value_length", head_dim))
    rope_dim = int(_gguf_value(reader, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise ArtifactError(f"{path}: GGUF llama.attention.value_length {value_dim} differs from "
                            f"key_length {head_dim}; not supported")
    if rope_dim != head_dim:
        raise ArtifactError(f"{path}: GGUF llama.rope.dimension_count {rope_dim} is not the head "
                            f"dimension {head_dim}: partial rotary embedding is not supported")
    name = os.path.basename(path)
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_gguf_value(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_gguf_value(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings=False,
        rope_scaling=rope_scaling,
        name=name,
    )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None  # e.g. rope_freqs: recomputed from the config


def _unpermute_order(rows: int, num_heads: int) -> np.ndarray:
    """Row i of the rotate-half layout is row order[i] of llama.cpp's interleaved one."""
    head_dim = rows // num_heads
    return np.arange(rows).reshape(num_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(rows)
