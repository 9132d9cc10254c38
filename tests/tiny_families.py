"""Tiny random checkpoints of the model families other than Llama, written with numpy only, in
the Hugging Face layout (config.json + float32 safetensors) and as GGUF files (the gguf package).

`write_hf(path, variant)` and `write_gguf(path, variant, qtype)` write the same weights, from a
fixed seed: the GGUF one as llama.cpp's converter would store them (Q/K rows permuted for the
llama architecture, Gemma's norms as 1 + weight, Phi-3's LongRoPE factors as tensors). The logits
transformers computes for the HF checkpoints are in tests/golden/<family>_tiny_logits.json,
written by scripts/make_family_goldens.py, which imports this module.

Variants (family: what they exercise):

    qwen2             q/k/v biases (none on o_proj), separate lm_head
    qwen2_tied        Qwen2.5-style tied embeddings
    qwen3             per-head q/k RMSNorm before RoPE, tied embeddings
    mistral           every layer a sliding window of 5 positions (HF only: a llama GGUF has no window)
    mistral_full      no window; its GGUF is the llama architecture (Q/K permuted by the converter)
    phi3              fused qkv_proj and gate_up_proj, LongRoPE (short factors below 64 positions),
                      a sliding window of 6
    gemma3            3 layers (local, global, local) with a window of 4, query_pre_attn_scalar 24,
                      linear RoPE scaling on the global layer, the final soft-cap, and an
                      attn_logit_softcapping that transformers' Gemma 3 ignores (as we do) (HF only)
    gemma3_6l         6 layers in Gemma 3's pattern (5 local, 1 global), the query scale of
                      llama.cpp's gemma3 (1/sqrt(head_dim)), the final soft-cap; HF and GGUF
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VOCAB_SIZE = 320
INPUT_IDS = [2, 5, 77, 120, 255, 256, 3, 42, 299, 17, 64, 64, 200, 9, 150, 271, 33, 1, 180, 319]
# the logits the goldens keep: every position, these token ids (the files stay small)
GOLDEN_COLUMNS = list(range(0, VOCAB_SIZE, 5))


@dataclass(frozen=True)
class Variant:
    family: str  # the golden file: tests/golden/<family>_tiny_logits.json
    seed: int
    config: dict
    has_gguf: bool = True
    extra: dict = field(default_factory=dict)


def _base(**changes) -> dict:
    config = {
        "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32",
    }
    config.update(changes)
    return config


_SHORT = [1.0, 1.05, 1.1, 1.3, 1.7, 2.2, 3.0, 4.1]
_LONG = [1.0, 1.2, 1.9, 2.8, 4.5, 7.0, 11.0, 16.0]

VARIANTS = {
    "qwen2": Variant("qwen2", 2001, _base(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                          rope_theta=1000000.0, use_sliding_window=False, sliding_window=128)),
    "qwen2_tied": Variant("qwen2", 2002, _base(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                               tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3": Variant("qwen3", 2003, _base(architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                                          tie_word_embeddings=True, attention_bias=False, head_dim=32)),
    "mistral": Variant("mistral", 2004, _base(architectures=["MistralForCausalLM"], model_type="mistral",
                                              sliding_window=5), has_gguf=False),
    "mistral_full": Variant("mistral", 2005, _base(architectures=["MistralForCausalLM"], model_type="mistral",
                                                   sliding_window=None)),
    "phi3": Variant("phi3", 2006, _base(
        architectures=["Phi3ForCausalLM"], model_type="phi3", max_position_embeddings=256,
        original_max_position_embeddings=64, sliding_window=6, rms_norm_eps=1e-5,
        rope_scaling={"type": "longrope", "short_factor": _SHORT, "long_factor": _LONG})),
    "gemma3": Variant("gemma3", 2007, _base(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=3, hidden_act=None,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
        final_logit_softcapping=30.0, attn_logit_softcapping=20.0), has_gguf=False),
    "gemma3_6l": Variant("gemma3", 2008, _base(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=6, hidden_act=None,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, query_pre_attn_scalar=16,
        sliding_window=4, sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=30.0)),
}

FAMILIES = sorted({v.family for v in VARIANTS.values()})


def variants_of(family: str) -> list[str]:
    return [name for name, v in VARIANTS.items() if v.family == family]


def hf_config(variant: str) -> dict:
    return {k: v for k, v in VARIANTS[variant].config.items() if v is not None or k == "sliding_window"}


# ---------------------------------------------------------------- weights


def random_weights(variant: str) -> dict[str, np.ndarray]:
    """float32 weights under Hugging Face names, scaled so that activations and logits are of
    order one (norms near their identity, projections with std 1/sqrt(fan_in))."""
    v = VARIANTS[variant]
    c = v.config
    rng = np.random.default_rng(v.seed)
    hidden, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_dim, kv_dim = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    gemma = v.family == "gemma3"

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return rng.normal(0.0, in_dim**-0.5, size=(out_dim, in_dim)).astype(np.float32)

    def norm(dim: int = hidden) -> np.ndarray:  # Gemma multiplies by (1 + w): w near 0
        return ((0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    def bias(dim: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(dim)).astype(np.float32)

    w = {"model.embed_tokens.weight": (rng.standard_normal((VOCAB_SIZE, hidden)) * (hidden**-0.5 if gemma else 1.0)).astype(np.float32)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        w[p + "input_layernorm.weight"] = norm()
        if v.family == "phi3":
            w[a + "qkv_proj.weight"] = linear(q_dim + 2 * kv_dim, hidden)
        else:
            w[a + "q_proj.weight"] = linear(q_dim, hidden)
            w[a + "k_proj.weight"] = linear(kv_dim, hidden)
            w[a + "v_proj.weight"] = linear(kv_dim, hidden)
        if v.family == "qwen2":
            w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"] = bias(q_dim), bias(kv_dim), bias(kv_dim)
        if v.family in ("qwen3", "gemma3"):
            w[a + "q_norm.weight"], w[a + "k_norm.weight"] = norm(hd), norm(hd)
        w[a + "o_proj.weight"] = linear(hidden, q_dim)
        w[p + "post_attention_layernorm.weight"] = norm()
        if gemma:
            w[p + "pre_feedforward_layernorm.weight"] = norm()
            w[p + "post_feedforward_layernorm.weight"] = norm()
        if v.family == "phi3":
            w[p + "mlp.gate_up_proj.weight"] = linear(2 * inter, hidden)
        else:
            w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
            w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    w["model.norm.weight"] = norm()
    if not c.get("tie_word_embeddings"):
        w["lm_head.weight"] = linear(VOCAB_SIZE, hidden)
    return w


def write_hf(path: str | Path, variant: str) -> str:
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(variant), indent=2) + "\n")
    save_file(random_weights(variant), str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


# ---------------------------------------------------------------- GGUF

_GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "phi3": "phi3", "gemma3": "gemma3"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order for the llama architecture (interleaved RoPE)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str | Path, variant: str, qtype: str = "F32") -> str:
    """The variant as the GGUF llama.cpp's converter writes; matrices in `qtype` (F32 or Q8_0),
    norms and biases F32."""
    import gguf

    v = VARIANTS[variant]
    assert v.has_gguf, variant
    c = v.config
    arch = _GGUF_ARCH[v.family]
    weights = random_weights(variant)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_freq_base(c["rope_theta"])
    if c.get("sliding_window") and v.family in ("phi3", "gemma3"):
        writer.add_sliding_window(c["sliding_window"])
    scaling = c.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if v.family == "phi3":
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", c["original_max_position_embeddings"])
    if c.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(c["final_logit_softcapping"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(VOCAB_SIZE)])

    def add(name: str, array: np.ndarray) -> None:
        if array.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    gemma = v.family == "gemma3"
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "post_attention_layernorm": "post_attention_norm" if gemma else "ffn_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, array in weights.items():
        if gemma and name.endswith("norm.weight"):
            array = array + np.float32(1.0)  # the converter stores Gemma's norms as 1 + weight
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _permute(array, c["num_attention_heads"])
        if arch == "llama" and name.endswith("k_proj.weight"):
            array = _permute(array, c["num_key_value_heads"])
        if name == "model.embed_tokens.weight":
            add("token_embd.weight", array)
        elif name == "model.norm.weight":
            add("output_norm.weight", array)
        elif name == "lm_head.weight":
            add("output.weight", array)
        else:
            parts = name.split(".")
            layer, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
            add(f"blk.{layer}.{names[rest]}.{kind}", array)
    if v.family == "phi3":
        add("rope_factors_long.weight", np.asarray(scaling["long_factor"], dtype=np.float32))
        add("rope_factors_short.weight", np.asarray(scaling["short_factor"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def expected_phi3_attention_factor(variant: str = "phi3") -> float:
    c = VARIANTS[variant].config
    factor = c["max_position_embeddings"] / c["original_max_position_embeddings"]
    return math.sqrt(1 + math.log(factor) / math.log(c["original_max_position_embeddings"]))
