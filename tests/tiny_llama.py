"""Tiny random Llama checkpoints in the Hugging Face layout, written with numpy only.

`write_tiny_llama(path, variant)` fills a directory with config.json, safetensors weights
and a byte-level BPE tokenizer, the same bytes on every run. The files are a few hundred
KB, so tests can load a real checkpoint layout without a model download. The logits that
transformers computes for these checkpoints are in tests/golden/tiny_llama_logits.json
(made by scripts/make_golden.py, which imports this module).

Variants:

    tied               fp32, tie_word_embeddings, no lm_head tensor, default RoPE
    llama3             bf16 weights, separate lm_head, llama3 RoPE scaling, eos ids [1, 3]
    sharded_fp16_bias  fp16 weights in two shards with an index, attention_bias

Vocabulary (300 ids): 0 <s>, 1 </s>, 2 <|im_start|>, 3 <|im_end|>, 4..259 the 256 bytes,
260..299 the merges in TOKEN_MERGES. Encoding with special tokens prepends <s>.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3
NUM_BYTE_TOKENS = 256

# Merges in the byte-level alphabet (Ġ is a space, Ċ a newline). Each part must already
# be a token when its merge is reached; the merged string becomes the next id.
TOKEN_MERGES = [
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e", "a n", "Ġ s",
    "Ġ w", "o u", "e n", "Ġ o", "a t", "i s", "Ġ c", "e s", "n d", "Ġa nd",
    "Ġ h", "Ġ i", "i t", "o r", "Ġ f", "l l", "Ġ b", "in g", "Ġ m", "Ġ p",
    "Ġo f", "Ġt o", "Ġ d", "a r", "Ġi n", "Ġi s", "Ġ l", "Ċ Ċ", "Ġ Ġ", "ĠĠ ĠĠ",
]  # fmt: skip
VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS + len(TOKEN_MERGES)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaSpec:
    seed: int
    dtype: str  # "float32", "bfloat16" or "float16"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_shards: int = 1
    eos_token_id: int | list[int] = EOS_ID
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    rms_norm_eps: float = 1e-5
    extra_config: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


VARIANTS = {
    "tied": TinyLlamaSpec(seed=1001, dtype="float32", tie_word_embeddings=True),
    "llama3": TinyLlamaSpec(
        seed=1002,
        dtype="bfloat16",
        eos_token_id=[EOS_ID, IM_END_ID],
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "sharded_fp16_bias": TinyLlamaSpec(seed=1003, dtype="float16", attention_bias=True, num_shards=2),
}


def write_tiny_llama(path: str | Path, variant: str) -> None:
    """Write the checkpoint `variant` (a key of VARIANTS) into the directory `path`."""
    spec = VARIANTS[variant]
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", _config(spec))
    _write_json(out_dir / "generation_config.json", _generation_config(spec))
    _write_weights(out_dir, spec, _random_weights(spec))
    _write_tokenizer(out_dir)


# ---------------------------------------------------------------- config


def _config(spec: TinyLlamaSpec) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "attention_bias": spec.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": spec.dtype,
        "use_cache": True,
    }
    return {**config, **spec.extra_config}


def _generation_config(spec: TinyLlamaSpec) -> dict:
    return {"bos_token_id": BOS_ID, "eos_token_id": spec.eos_token_id}


# ---------------------------------------------------------------- weights


def _random_weights(spec: TinyLlamaSpec) -> dict[str, np.ndarray]:
    """fp32 weights scaled so that activations and logits are of order one.

    Norm weights sit near 1 and projections have std 1/sqrt(fan_in), so attention is far
    from uniform and the logits differ by whole units: a wrong RoPE, a transposed matrix
    or a missing bias shows up as a large error, not as noise.
    """
    rng = np.random.default_rng(spec.seed)
    hidden, inter, head_dim = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_dim = spec.num_attention_heads * head_dim
    kv_dim = spec.num_key_value_heads * head_dim

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return rng.normal(0.0, in_dim**-0.5, size=(out_dim, in_dim)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    def bias(dim: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(dim)).astype(np.float32)

    weights = {"model.embed_tokens.weight": rng.standard_normal((VOCAB_SIZE, hidden)).astype(np.float32)}
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        shapes = {"q_proj": (q_dim, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden), "o_proj": (hidden, q_dim)}
        weights[prefix + "input_layernorm.weight"] = norm()
        for name, (out_dim, in_dim) in shapes.items():
            weights[f"{prefix}self_attn.{name}.weight"] = linear(out_dim, in_dim)
            if spec.attention_bias:
                weights[f"{prefix}self_attn.{name}.bias"] = bias(out_dim)
        weights[prefix + "post_attention_layernorm.weight"] = norm()
        weights[prefix + "mlp.gate_proj.weight"] = linear(inter, hidden)
        weights[prefix + "mlp.up_proj.weight"] = linear(inter, hidden)
        weights[prefix + "mlp.down_proj.weight"] = linear(hidden, inter)
    weights["model.norm.weight"] = norm()
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = linear(VOCAB_SIZE, hidden)
    return weights


def _write_weights(out_dir: Path, spec: TinyLlamaSpec, weights: dict[str, np.ndarray]) -> None:
    if spec.num_shards == 1:
        _save_safetensors(out_dir / "model.safetensors", weights, spec.dtype)
        return
    # Contiguous runs of tensors, as Hugging Face splits them: embeddings first, head last.
    names = list(weights)
    bounds = np.linspace(0, len(names), spec.num_shards + 1).round().astype(int)
    shards = [names[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    weight_map, total_size = {}, 0
    for index, shard_names in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{spec.num_shards:05d}.safetensors"
        shard = {name: weights[name] for name in sorted(shard_names)}
        total_size += _save_safetensors(out_dir / file_name, shard, spec.dtype)
        weight_map.update({name: file_name for name in shard})
    index_data = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index_data)


def _save_safetensors(file_path: Path, tensors: dict[str, np.ndarray], dtype: str) -> int:
    """Write `tensors` converted to `dtype`; returns the number of tensor data bytes."""
    if dtype == "bfloat16":
        return _save_bf16_safetensors(file_path, tensors)
    converted = {name: array.astype(dtype) for name, array in tensors.items()}
    save_file(converted, str(file_path), metadata={"format": "pt"})
    return sum(array.nbytes for array in converted.values())


def _float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round fp32 to the nearest bf16 (ties to even); returns the uint16 bit patterns."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def _save_bf16_safetensors(file_path: Path, tensors: dict[str, np.ndarray]) -> int:
    """safetensors without ml_dtypes: an 8-byte header length, a JSON header, raw data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name, array in tensors.items():
        data = _float32_to_bf16_bits(array).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(file_path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.writelines(chunks)
    return offset


# ---------------------------------------------------------------- tokenizer


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: a printable character stands for itself, every other
    byte for a character from 256 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, num_shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + num_shifted)
            num_shifted += 1
    return mapping


def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in _byte_to_unicode().items():
        vocab[char] = len(SPECIAL_TOKENS) + byte
    merges = []
    for merge in TOKEN_MERGES:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right not in vocab, merge
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    assert len(vocab) == VOCAB_SIZE
    return vocab, merges


def _build_tokenizer() -> Tokenizer:
    vocab, merges = _bpe_vocab_and_merges()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer


def _write_tokenizer(out_dir: Path) -> None:
    (out_dir / "tokenizer.json").write_text(_build_tokenizer().to_str(pretty=True) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "chat_template": CHATML_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    special_tokens_map = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID]}
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map)


def _write_json(file_path: Path, data: dict) -> None:
    file_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
