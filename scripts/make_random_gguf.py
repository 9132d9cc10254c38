"""Write a GGUF with Llama-3.1-8B's shapes and Q4_K_M's tensor types, filled with random weights.

For memory and speed measurements of a large model (it generates nonsense): 32 layers, hidden
4096, FFN 14336, 32 query / 8 KV heads, vocabulary 128,256. Tensor types as llama.cpp's Q4_K_M
picks them: Q4_K everywhere except Q6_K for the output matrix and for attn_v / ffn_down in the
first and last eighth of the layers and every third layer between; norms F32. About 4.9 GB.
The vocabulary is SentencePiece-style filler (byte tokens plus "t<i>"), enough for llama-server
and for token-id benchmarks. The file stays out of the repository:

    python scripts/make_random_gguf.py /tmp/llama8b-q4km-random.gguf
"""

from __future__ import annotations

import argparse
import sys

import gguf
import numpy as np

Q4_K, Q6_K, F32 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.F32


def more_bits(layer: int, layers: int) -> bool:
    """Q4_K_M's layers whose attn_v and ffn_down get Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid blocks: random codes and small-integer scales, float16 scales of a sane size."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.full((rows, cols // block), 2e-5 if qtype == Q6_K else 4e-5, dtype=np.float16).view(np.uint8)
    if qtype == Q4_K:  # d and dmin
        raw[..., 0:2] = scale.reshape(rows, -1, 2)
        raw[..., 2:4] = scale.reshape(rows, -1, 2)
    else:  # Q6_K: d last
        raw[..., 208:210] = scale.reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=8192, help="context_length in the metadata")
    args = parser.parse_args()
    hidden, ffn, heads, kv_heads, vocab, layers = 4096, 14336, 32, 8, 128256, args.layers
    head_dim = hidden // heads

    w = gguf.GGUFWriter(args.path, "llama")
    w.add_name("llama-3.1-8b-shaped-random-q4_k_m")
    w.add_context_length(args.context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    plan = [("token_embd.weight", Q4_K, vocab, hidden), ("output_norm.weight", F32, 1, hidden),
            ("output.weight", Q6_K, vocab, hidden)]
    for i in range(layers):
        big = Q6_K if more_bits(i, layers) else Q4_K
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", F32, 1, hidden), (p + "ffn_norm.weight", F32, 1, hidden),
                 (p + "attn_q.weight", Q4_K, hidden, hidden), (p + "attn_k.weight", Q4_K, kv_heads * head_dim, hidden),
                 (p + "attn_v.weight", big, kv_heads * head_dim, hidden), (p + "attn_output.weight", Q4_K, hidden, hidden),
                 (p + "ffn_gate.weight", Q4_K, ffn, hidden), (p + "ffn_up.weight", Q4_K, ffn, hidden),
                 (p + "ffn_down.weight", big, hidden, ffn)]
    for name, qtype, rows, cols in plan:
        if qtype == F32:
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8),
                              rows * cols // block * size, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, qtype, rows, cols in plan:
        data = np.ones(cols, np.float32) if qtype == F32 else random_blocks(qtype, rows, cols, rng)
        w.write_tensor_data(data)
    w.close()
    print(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
