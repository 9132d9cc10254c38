"""Read a model artifact (a GGUF file or a Hugging Face directory) into numpy weights: float32
arrays, and matrices at their stored precision (GGUF block formats, F16, BF16) as kernels.QuantizedWeight.

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
    attention_bias: bool = False  # q/k/v projection biases
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    name: str = "model"
    # Switches for the families other than Llama (see FAMILIES). The defaults are Llama's, and
    # a switch that is off costs the forward pass nothing.
    family: str = "llama"
    o_proj_bias: bool = False  # Llama's attention_bias covers o_proj too; Qwen2's does not
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj stored fused
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each query/key head before RoPE
    sandwich_norms: bool = False  # Gemma 3: norms after attention and around the MLP too
    norm_adds_one: bool = False  # Gemma (HF weights): RMSNorm multiplies by (1 + weight)
    hidden_act: str = "silu"  # "silu" or "gelu_tanh" (the gated MLP's activation)
    embedding_multiplier: float | None = None  # Gemma: sqrt(hidden_size)
    query_scale: float | None = None  # attention's score scale; None is head_dim ** -0.5
    sliding_window: int | None = None  # local layers see the last this many tokens
    sliding_layers: tuple[bool, ...] | None = None  # which layers are local; None: all (if a window)
    local_rope_theta: float | None = None  # Gemma 3: local layers' RoPE base (no scaling)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcapping: float | None = None

    def is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        return True if self.sliding_layers is None else self.sliding_layers[layer]


# Hugging Face architecture -> family. Each family's switches are set in _config_from_hf.
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3",
}
SUPPORTED_ARCHITECTURES = set(FAMILIES)
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                "gemma3_text": "gemma3"}
# GGUF general.architecture values (Mistral's GGUFs are "llama")
SUPPORTED_GGUF_ARCHITECTURES = ("gemma3", "llama", "phi3", "qwen2", "qwen3")


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
    family = _refuse_unsupported_hf(raw, where)
    try:
        hidden = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        num_layers = int(raw["num_hidden_layers"])
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        rope_scaling = raw.get("rope_scaling")
        rope_theta = raw.get("rope_theta")
        rope_parameters = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else None
        local_theta = None
        if family == "gemma3":
            # either the old keys (rope_theta, rope_local_base_freq, rope_scaling) or
            # rope_parameters keyed by layer type
            per_type = rope_parameters if rope_parameters and "full_attention" in rope_parameters else None
            if per_type:
                full = per_type.get("full_attention") or {}
                rope_theta = full.get("rope_theta", rope_theta)
                rope_scaling = full if full.get("rope_type", "default") != "default" else None
                local_theta = (per_type.get("sliding_attention") or {}).get("rope_theta")
            rope_theta = rope_theta or 1_000_000.0
            local_theta = float(local_theta or raw.get("rope_local_base_freq") or 10_000.0)
        elif rope_theta is None and rope_parameters:
            rope_theta = rope_parameters.get("rope_theta")
            if rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = rope_parameters
        max_positions = int(raw.get("max_position_embeddings", 2048))
        if family == "phi3" and rope_scaling:
            rope_scaling = _phi3_rope(rope_scaling, raw, head_dim, where)
        sliding_window, sliding_layers = _sliding_window(raw, family, num_layers)
        gemma = family == "gemma3"
        bias = bool(raw.get("attention_bias", False)) or family == "qwen2"
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh" if gemma else "silu"
        config = ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
            attention_bias=bias,
            rope_scaling=rope_scaling,
            name=name,
            family=family,
            o_proj_bias=bias and family in ("llama", "mistral"),
            fused_projections=family == "phi3",
            qk_norm=family in ("qwen3", "gemma3"),
            sandwich_norms=gemma,
            norm_adds_one=gemma,
            hidden_act="gelu_tanh" if gemma and act in ("gelu_pytorch_tanh", "gelu_tanh") else "silu",
            embedding_multiplier=math.sqrt(hidden) if gemma else None,
            query_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            local_rope_theta=local_theta,
            final_logit_softcapping=_positive(raw.get("final_logit_softcapping")) if gemma else None,
            # Gemma 3's config carries attn_logit_softcapping (from Gemma 2), but transformers'
            # Gemma 3 attention does not apply it (nor does llama.cpp's): neither do we
            attn_logit_softcapping=None,
        )
        if gemma and act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ArtifactError(f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh only)")
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: missing or invalid field {e}") from e
    _refuse_unsupported_rope(config.rope_scaling, where)
    return config


def _positive(value) -> float | None:
    return float(value) if value else None


def _sliding_window(raw: dict, family: str, num_layers: int) -> tuple[int | None, tuple[bool, ...] | None]:
    """The window and which layers use it. Mistral and Phi-3 slide on every layer when the
    config sets a window; Qwen2/3 only with use_sliding_window (their configs carry a window
    they do not use); Gemma 3 on the layers its layer_types (or its pattern) makes local."""
    window = raw.get("sliding_window")
    if not window or family == "llama":
        return None, None
    if family in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window"):
            return None, None
        types = raw.get("layer_types")
        if not types:
            first = int(raw.get("max_window_layers", num_layers))
            return int(window), tuple(i >= first for i in range(num_layers))
        return int(window), tuple(t == "sliding_attention" for t in types)
    if family == "gemma3":
        types = raw.get("layer_types")
        if not types:
            pattern = int(raw.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        if len(types) != num_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
        return int(window), tuple(t == "sliding_attention" for t in types)
    return int(window), None


def _phi3_rope(scaling: dict, raw: dict, head_dim: int, where: str) -> dict:
    """Phi-3's LongRoPE ("su", "longrope"): per-frequency short and long factors, and the
    attention factor cos/sin are multiplied by (from the context extension when not given)."""
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("su", "longrope"):
        raise ArtifactError(f"{where}: rope_scaling type {kind!r} is not supported for Phi-3 (longrope, su)")
    original = scaling.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    if not original or not isinstance(short, list) or not isinstance(long, list) or \
            len(short) != head_dim // 2 or len(long) != head_dim // 2:
        raise ArtifactError(f"{where}: rope_scaling longrope needs original_max_position_embeddings and "
                            f"short_factor/long_factor lists of {head_dim // 2} numbers")
    factor = scaling.get("factor") or int(raw.get("max_position_embeddings", original)) / int(original)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(int(original)))
    return {"rope_type": "longrope", "short_factor": [float(x) for x in short],
            "long_factor": [float(x) for x in long], "original_max_position_embeddings": int(original),
            "attention_factor": float(attention_factor)}


SUPPORTED_HIDDEN_ACTS = {"silu", "swish"}  # the same function; the MLP computes SiLU
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "longrope"}  # what model.rope_inv_freq computes


def _refuse_unsupported_hf(raw: dict, where: str) -> str:
    """The family; settings that change the model's math and that the forward does not compute
    are refused by name: running without them would give a different model's output, silently."""
    archs = raw.get("architectures") or []
    known = [FAMILIES[a] for a in archs if a in FAMILIES]
    if archs and not known:
        raise ArtifactError(f"{where}: architecture {', '.join(map(str, archs))} is not supported "
                            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    family = known[0] if known else _MODEL_TYPES.get(raw.get("model_type"), "llama")
    if raw.get("mlp_bias"):
        raise ArtifactError(f"{where}: mlp_bias is not supported")
    if family == "gemma3" and raw.get("use_bidirectional_attention"):
        raise ArtifactError(f"{where}: use_bidirectional_attention is not supported")
    hidden_act = raw.get("hidden_act", "silu")
    if family != "gemma3" and hidden_act not in SUPPORTED_HIDDEN_ACTS:
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
    return family


def _refuse_unsupported_rope(rope_scaling: dict | None, where: str) -> None:
    if not rope_scaling:
        return
    if not isinstance(rope_scaling, dict):
        raise ArtifactError(f"{where}: rope_scaling {rope_scaling!r} is not a JSON object")
    kind = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ArtifactError(f"{where}: rope_scaling type {kind!r} is not supported "
                            f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})")
    if kind == "longrope" and "short_factor" not in rope_scaling:
        raise ArtifactError(f"{where}: rope_scaling type 'longrope' is supported for Phi-3 only")
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


def read_safetensors(path: str) -> dict[str, np.ndarray | QuantizedWeight]:
    """Read F32 tensors as float32 arrays, F16/BF16 matrices at their precision (kernels.pack_half)
    and F16/BF16 vectors as float32 (numpy has no bfloat16, so BF16 is widened by hand)."""
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
        if info["dtype"] in ("F16", "BF16") and raw.ndim == 2:
            from engine_core import kernels

            tensors[name] = kernels.pack_half(info["dtype"], raw.view(np.uint16))
        elif info["dtype"] == "BF16":
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
            p + "self_attn.o_proj.weight": (config.hidden_size, q_out),
            p + "mlp.down_proj.weight": (config.hidden_size, config.intermediate_size),
        })
        if config.fused_projections:
            expected.update({
                p + "self_attn.qkv_proj.weight": (q_out + 2 * kv_out, config.hidden_size),
                p + "mlp.gate_up_proj.weight": (2 * config.intermediate_size, config.hidden_size),
            })
        else:
            expected.update({
                p + "self_attn.q_proj.weight": (q_out, config.hidden_size),
                p + "self_attn.k_proj.weight": (kv_out, config.hidden_size),
                p + "self_attn.v_proj.weight": (kv_out, config.hidden_size),
                p + "mlp.gate_proj.weight": (config.intermediate_size, config.hidden_size),
                p + "mlp.up_proj.weight": (config.intermediate_size, config.hidden_size),
            })
        if config.attention_bias:
            expected.update({
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            })
        if config.o_proj_bias:
            expected[p + "self_attn.o_proj.bias"] = (config.hidden_size,)
        if config.qk_norm:
            expected[p + "self_attn.q_norm.weight"] = (config.head_dim,)
            expected[p + "self_attn.k_norm.weight"] = (config.head_dim,)
        if config.sandwich_norms:
            expected[p + "pre_feedforward_layernorm.weight"] = (config.hidden_size,)
            expected[p + "post_feedforward_layernorm.weight"] = (config.hidden_size,)
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
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# where an architecture's GGUF names mean another Hugging Face tensor than Llama's
_GGUF_ARCH_LAYER_NAMES = {
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # gate and up rows in one tensor, as in HF
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
        name = _hf_name(tensor.name, config.family)
        if name is None:
            continue
        try:
            weights[name] = _gguf_tensor(tensor, name, config, permute_qk=config.family == "llama")
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from e
        except Exception as e:
            raise ArtifactError(f"{path}: cannot read tensor {tensor.name}: {e}") from e
    reader = tensor = None  # drops the file mapping: the weights now live in our own arrays
    if "lm_head.weight" not in weights:
        config = _replace(config, tie_word_embeddings=True)
    _check_weights(weights, config, path)
    return config, weights


def _gguf_tensor(tensor, name: str, config: ModelConfig, permute_qk: bool = True) -> np.ndarray | QuantizedWeight:
    from engine_core import kernels

    kind = int(tensor.tensor_type)
    # llama.cpp's converter permutes Q/K rows for its interleaved RoPE (for the llama
    # architecture only); undo it so the model can use Hugging Face's rotate-half RoPE. Rows are
    # independent in every format: whole rows move.
    heads = 0
    if permute_qk:
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
    if kernels.PLAIN_FORMATS.get(kind) in kernels.HALF_FORMATS and tensor.data.ndim == 2:
        # F16/BF16 matrices stay 16-bit (the kernels widen them as they read)
        rows, cols = (int(n) for n in tensor.shape[::-1])
        bits = np.asarray(tensor.data).view(np.uint16).reshape(rows, cols)
        if heads:
            bits = bits[_unpermute_order(rows, heads)]
        return kernels.pack_half(kernels.PLAIN_FORMATS[kind], bits)
    if kind in kernels.PLAIN_FORMATS:
        # F32 tensors (norms, and any F32 matrix: BLAS reads it) and 16-bit vectors as float32
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
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ArtifactError(f"{path}: GGUF architecture {arch!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")

    def value(key: str, default=None):
        return _gguf_value(reader, f"{arch}.{key}", default)

    def need(key: str):
        found = value(key)
        if found is None:
            raise ArtifactError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return found

    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    num_layers = int(need("block_count"))
    vocab = value("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise ArtifactError(f"{path}: cannot tell the vocabulary size")
    tensor_names = {t.name for t in reader.tensors}
    rope_scaling = None
    scaling_type = value("rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling_type not in (None, "none") and not (arch == "phi3" and scaling_type in ("su", "longrope", "yarn")):
        raise ArtifactError(f"{path}: GGUF {arch}.rope.scaling.type {scaling_type!r} is not supported (linear only)")
    num_experts = int(value("expert_count", 0) or 0)
    if num_experts > 0:
        raise ArtifactError(f"{path}: GGUF {arch}.expert_count {num_experts}: mixture of experts is not supported")
    head_dim = int(value("attention.key_length", hidden // num_heads))
    value_dim = int(value("attention.value_length", head_dim))
    rope_dim = int(value("rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise ArtifactError(f"{path}: GGUF {arch}.attention.value_length {value_dim} differs from "
                            f"key_length {head_dim}; not supported")
    if rope_dim != head_dim:
        raise ArtifactError(f"{path}: GGUF {arch}.rope.dimension_count {rope_dim} is not the head "
                            f"dimension {head_dim}: partial rotary embedding is not supported")
    context = int(need("context_length"))
    gemma = arch == "gemma3"
    switches: dict = {}
    if arch == "phi3" and "rope_factors_short.weight" in tensor_names:
        original = int(value("rope.scaling.original_context_length", context))
        factors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1).tolist() for t in reader.tensors
                   if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
        factor = context / original
        attention_factor = value("rope.scaling.attn_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        rope_scaling = {"rope_type": "longrope", "short_factor": factors["rope_factors_short.weight"],
                        "long_factor": factors.get("rope_factors_long.weight", factors["rope_factors_short.weight"]),
                        "original_max_position_embeddings": original, "attention_factor": float(attention_factor)}
    window = value("attention.sliding_window")
    if gemma:
        # llama.cpp's gemma3: every sixth layer global, local layers' RoPE base 10000, the
        # attention scale 1/sqrt(key_length); its converter stored the norms as (1 + weight)
        pattern = int(value("attention.sliding_window_pattern", 6) or 6)
        switches = dict(qk_norm=True, sandwich_norms=True, hidden_act="gelu_tanh",
                        embedding_multiplier=math.sqrt(hidden), local_rope_theta=10_000.0,
                        sliding_layers=tuple(bool((i + 1) % pattern) for i in range(num_layers)),
                        final_logit_softcapping=_positive(value("final_logit_softcapping")))
    if arch == "qwen3":
        switches["qk_norm"] = True
    if arch in ("gemma3", "phi3") and window:
        switches["sliding_window"] = int(window)
    has_bias = "blk.0.attn_q.bias" in tensor_names
    name = os.path.basename(path)
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(value("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(value("rope.freq_base", 1_000_000.0 if gemma else 10000.0)),
        max_position_embeddings=context,
        tie_word_embeddings=False,
        attention_bias=has_bias,
        o_proj_bias="blk.0.attn_output.bias" in tensor_names,
        rope_scaling=rope_scaling,
        name=name,
        family=arch,
        fused_projections=arch == "phi3",
        **switches,
    )


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        hf = _GGUF_ARCH_LAYER_NAMES.get(arch, {}).get(parts[2]) or _GGUF_LAYER_NAMES.get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}.{parts[3]}"
    return None  # e.g. rope_freqs: recomputed from the config


def _unpermute_order(rows: int, num_heads: int) -> np.ndarray:
    """Row i of the rotate-half layout is row order[i] of llama.cpp's interleaved one."""
    head_dim = rows // num_heads
    return np.arange(rows).reshape(num_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(rows)
