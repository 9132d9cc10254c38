"""The decoder forward pass in numpy float32, over a flattened batch and a paged KV cache.

One forward pass for every family (Llama, Mistral, Qwen2/2.5/3, Phi-3, Gemma 3): what differs
between them is data, the switches of ModelConfig (loader.py): biases, q/k norms, Gemma's norms
around attention and MLP, the MLP's activation, embedding and score scales, local (sliding
window) layers and their RoPE base, logit soft-capping. A switch that is off adds no work.

Every weight matmul is one 2-D `[tokens, hidden] @ W` over all tokens of the step (decodes
and prefill chunks together), or one GEMV per token when the step has only a few (see
GEMV_MAX_ROWS). Attention reads keys and values from the paged cache: a prefill
chunk one sequence at a time, in query tiles with a causal mask (BLAS); all decodes in one call
of a numba kernel that reads each sequence's blocks in place (kernels/attention.py).
"""

from __future__ import annotations

import functools
import math
import mmap
import time
from dataclasses import dataclass

import numpy as np

from engine_core import kernels
from engine_core.kernels import QuantizedWeight, elementwise
from engine_core.kernels.decode_layer import decode_layer, weight_args
from engine_core.kernels.attention import KV_CACHE_DTYPES, paged_decode_attention, to_cache, to_float32
from engine_core.loader import ModelConfig


# --kv-cache-dtype auto. float16 and bfloat16 caches both reproduce the golden greedy runs of
# SmolLM2 (7 prompts, 448 tokens) and Gemma 3 270M (batched and one by one; AVX-512 and AVX2
# machines), but move a step's top-2 logit gap by up to 0.01 (float16, median 0.001) or 8.7
# (bfloat16) against float32, which is within 7e-5 of transformers: the smallest golden gap is
# 0.0035 and float16 moved it by 0.0016, and logprobs would no longer match transformers to 1e-3.
# float32 stays the default; a 16-bit cache is a choice: twice the tokens in --kv-cache-gib, and
# float16's decode attention 1.25x faster at batch 64 (the cache read is half the bytes; 1.7x before
# the kernel prefetched its scattered blocks).
KV_CACHE_AUTO = "float32"

# Prefill queries attended at a time (see LlamaModel._attention).
PREFILL_QUERY_TILE = 128

# A step of 2..GEMV_MAX_ROWS tokens multiplies each weight matrix one row at a time (GEMV), as a
# single token does. OpenBLAS packs a GEMM's weight matrix afresh on every call, which for so
# few rows costs more than reading the matrix once per row (the next rows find it in cache).
# Decoding SmolLM2-135M (bench_engine.py), batch 2 went from 24 to 40 tok/s (slower than batch 1
# before), batch 4 from 43 to 55 and batch 6 from 50 to 60; at 7 rows the two ways tie.
GEMV_MAX_ROWS = 6

# The vocabulary columns of the lm_head read per pass when its rows are done one at a time: a
# 576 x 2048 slice (4.7 MB) stays in cache for the next row.
LM_HEAD_SLICE = 2048


@dataclass
class AttentionSpan:
    """A prefill chunk of one sequence: rows [start, start + num_tokens) of the batch."""

    start: int
    num_tokens: int
    block_ids: np.ndarray  # the sequence's blocks covering its context after this chunk
    context_len: int  # tokens visible after this chunk (cached + this chunk)


@dataclass
class DecodeBatch:
    """The sequences decoding one token each in a step, attended in one kernel call."""

    rows: np.ndarray  # [B] int64, the batch rows of their new tokens
    block_table: np.ndarray  # [B, max blocks] int32; a row's entries past its context are unread
    context_lens: np.ndarray  # [B] int32, tokens visible (the new one included)


@dataclass
class ForwardBatch:
    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] block_id * block_size + offset, where each token's K/V goes
    spans: list[AttentionSpan]  # prefill chunks
    decodes: DecodeBatch | None
    output_rows: np.ndarray  # rows whose final hidden state is wanted (for logits)


def batch_decodes(rows: list[int], block_ids: list[np.ndarray], context_lens: list[int]) -> DecodeBatch | None:
    if not rows:
        return None
    table = np.zeros((len(rows), max(len(b) for b in block_ids)), dtype=np.int32)
    for r, blocks in enumerate(block_ids):
        table[r, : len(blocks)] = blocks
    return DecodeBatch(np.asarray(rows, dtype=np.int64), table, np.asarray(context_lens, dtype=np.int32))


class KVCache:
    """Keys and values as [layers, num_blocks, block_size, kv_heads, head_dim].

    Block-major, so gathering a sequence's blocks copies whole 12 KB blocks, and a gathered
    [tokens, kv_heads, head_dim] array viewed per head is a strided matrix BLAS takes as is.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: str = "float32"):
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        storage = KV_CACHE_DTYPES[dtype]  # float16 or bfloat16 halve what decode attention reads
        # every page in memory now, not lazily: the process's memory is fixed and known before the
        # first request (as vLLM reserves its cache), so the block pool keeps every free block's
        # prefix cached at no cost
        start = time.perf_counter()
        self.keys = _resident_zeros(shape, storage)
        self.values = _resident_zeros(shape, storage)
        self.allocation_s = time.perf_counter() - start
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: str = "float32") -> int:
        itemsize = KV_CACHE_DTYPES[dtype].itemsize
        return 2 * config.num_layers * config.num_kv_heads * block_size * config.head_dim * itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block src into block dst in every layer."""
        if copies:
            src = [s for s, _ in copies]
            dst = [d for _, d in copies]
            self.keys[:, dst] = self.keys[:, src]
            self.values[:, dst] = self.values[:, src]


def resolve_kv_cache_dtype(name: str) -> str:
    """--kv-cache-dtype: "auto" is float32 (see KV_CACHE_AUTO)."""
    if name == "auto":
        return KV_CACHE_AUTO
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {name!r} is not one of auto, {', '.join(KV_CACHE_DTYPES)}")
    return name


def _resident_zeros(shape: tuple[int, ...], dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """Zeros whose pages are all mapped now. MAP_POPULATE maps them in one call: 2 GiB
    took 4 s on a busy 2-core VM, where writing to each page of np.zeros (a fault per 4 KiB
    page) took 23 s. Where there is no MAP_POPULATE, a write to every page."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate:
        array = np.zeros(shape, dtype=dtype)
        array.fill(0)
        return array
    buffer = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def rope_tables(config: ModelConfig, max_len: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """cos and sin [max_len, head_dim / 2] for each distinct RoPE of the model, and each layer's
    index into them (Gemma 3's local layers have their own base and no scaling)."""
    positions = np.arange(max_len, dtype=np.float64)
    scaling = config.rope_scaling or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "longrope":
        # Phi-3: positions past the original context use the long factors (per position, as
        # vLLM does; transformers switches every position once the sequence is longer)
        original = int(scaling["original_max_position_embeddings"])
        short = np.outer(positions, rope_inv_freq(config, scaling["short_factor"]))
        long = np.outer(positions, rope_inv_freq(config, scaling["long_factor"]))
        freqs = np.where((positions < original)[:, None], short, long)
        factor = float(scaling["attention_factor"])
        tables = [((np.cos(freqs) * factor).astype(np.float32), (np.sin(freqs) * factor).astype(np.float32))]
        return tables, [0] * config.num_layers
    freqs = np.outer(positions, rope_inv_freq(config))
    tables = [(np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32))]
    if config.local_rope_theta is None:
        return tables, [0] * config.num_layers
    dim = config.head_dim
    local = np.outer(positions, 1.0 / (config.local_rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)))
    tables.append((np.cos(local).astype(np.float32), np.sin(local).astype(np.float32)))
    return tables, [1 if config.is_sliding(i) else 0 for i in range(config.num_layers)]


def rope_inv_freq(config: ModelConfig, ext_factors: list[float] | None = None) -> np.ndarray:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if ext_factors is not None:  # LongRoPE
        return inv_freq / np.asarray(ext_factors, dtype=np.float64)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(is_medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq


class DecoderModel:
    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], max_len: int):
        self.config = config
        c = config
        if c.norm_adds_one:  # Gemma's (1 + weight), added once here: its norms are then plain
            weights = {n: (w + np.float32(1.0) if _is_norm(n) else w) for n, w in weights.items()}
        self.embed = weights["model.embed_tokens.weight"]
        lm_head = weights.get("lm_head.weight", self.embed)
        if c.tie_word_embeddings:
            lm_head = self.embed
        if isinstance(lm_head, QuantizedWeight):  # read by the kernels in its own format
            self.lm_head, self.lm_head_t = lm_head, None
        else:
            # both layouts: OpenBLAS is fastest with [hidden, vocab] for one row (GEMV) and with
            # [vocab, hidden] for several (30-40% faster at 2..64 rows than the other layout)
            self.lm_head = np.ascontiguousarray(lm_head)  # [vocab, hidden]; the embedding itself if tied
            self.lm_head_t = np.ascontiguousarray(lm_head.T)  # [hidden, vocab]
        self.final_norm = weights["model.norm.weight"]
        self.layers = [self._fuse_layer(weights, i) for i in range(c.num_layers)]
        self.rope, self.layer_rope = rope_tables(c, max_len)
        self.cos, self.sin = self.rope[0]  # [max_len, head_dim / 2]
        self.scale = np.float32(c.query_scale if c.query_scale is not None else 1.0 / math.sqrt(c.head_dim))
        # per layer: _attention's window (the positions its queries see; 0: all) and soft cap,
        # as extra arguments only where they are set
        softcap = float(c.attn_logit_softcapping or 0.0)
        self.attention_args = [
            (c.sliding_window if c.is_sliding(i) else 0, softcap) if c.is_sliding(i) or softcap else ()
            for i in range(c.num_layers)]
        self._buffers: dict[str, np.ndarray] = {}
        # the four projections of each layer as decode_layer takes them, where every layer is
        # the plain kind it covers (else None: the general path always runs)
        self.fused_layers = _fused_layers(c, self.layers)
        self.fused_formats = ({layer[n][0].qtype for layer in self.layers for n in ("qkv", "o", "gate_up", "down")}
                              if self.fused_layers else set())  # the GEMVs' row limit for a fused step

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Scratch memory reused across calls. Allocating megabytes afresh each time costs more
        than the work done in them (the allocator maps and faults new pages every call)."""
        size = math.prod(shape)
        flat = self._buffers.get(name)
        if flat is None or flat.size < size:
            flat = self._buffers[name] = np.empty(size, dtype=np.float32)
        return flat[:size].reshape(shape)

    def _fuse_layer(self, w: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if self.config.fused_projections:  # Phi-3: q/k/v and gate/up rows already in one tensor each
            qkv, gate_up = [w[a + "qkv_proj.weight"]], [w[p + "mlp.gate_up_proj.weight"]]
        else:
            qkv = [w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]]
            gate_up = [w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]
        layer = {
            "attn_norm": w[p + "input_layernorm.weight"],
            "mlp_norm": w[p + "post_attention_layernorm.weight"],
            "qkv": _fuse(qkv),
            "o": _fuse([w[a + "o_proj.weight"]]),
            "gate_up": _fuse(gate_up),
            "down": _fuse([w[p + "mlp.down_proj.weight"]]),
        }
        if self.config.qk_norm:
            layer["q_norm"], layer["k_norm"] = w[a + "q_norm.weight"], w[a + "k_norm.weight"]
        if self.config.sandwich_norms:  # Gemma: post_attention_layernorm normalizes attention's output
            layer["post_attn_norm"] = layer["mlp_norm"]
            layer["mlp_norm"] = w[p + "pre_feedforward_layernorm.weight"]
            layer["post_mlp_norm"] = w[p + "post_feedforward_layernorm.weight"]
        if a + "q_proj.bias" in w:
            layer["qkv_bias"] = np.concatenate(
                [w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]]
            )
        if a + "o_proj.bias" in w:  # Llama's attention_bias covers o_proj too
            layer["o_bias"] = w[a + "o_proj.bias"]
        return layer

    @property
    def num_bytes(self) -> int:
        arrays = [self.embed, self.lm_head, self.lm_head_t] + [
            a for l in self.layers for v in l.values() for a in (v if isinstance(v, list) else [v])]
        # a tied lm_head is the embedding
        return sum({id(a): a.nbytes for a in arrays if a is not None}.values())

    def rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return elementwise.rms_norm(x, weight, self.config.rms_norm_eps)

    def forward(self, batch: ForwardBatch, cache: KVCache) -> np.ndarray:
        """Final-normed hidden states at batch.output_rows: [len(output_rows), hidden]."""
        c = self.config
        num_q = c.num_heads * c.head_dim
        num_kv = c.num_kv_heads * c.head_dim
        eps = c.rms_norm_eps
        positions = np.asarray(batch.positions, dtype=np.int64)
        x = kernels.embedding(self.embed, batch.token_ids)  # a new array: the residual stream
        if c.embedding_multiplier is not None:  # Gemma: scaled in the embedding's dtype (float32)
            x = x * np.float32(c.embedding_multiplier)
        x = np.ascontiguousarray(x)
        num_tokens = x.shape[0]
        if (batch.decodes is not None and not batch.spans and self.fused_layers
                and (num_tokens == 1 or num_tokens <= min(map(kernels.gemv_max_rows, self.fused_formats)))
                and kernels.activation_precision() == "float32"
                and cache.keys.dtype == np.float32):
            return self._decode_fused(x, positions, batch, cache)
        qk_norm, sandwich, gelu = c.qk_norm, c.sandwich_norms, c.hidden_act == "gelu_tanh"
        pending = None  # the last layer's MLP output, added to x by the next layer's norm
        for index, layer in enumerate(self.layers):
            if pending is None:
                h = self.rms_norm(x, layer["attn_norm"])
            else:
                h = elementwise.add_rms_norm(x, pending, layer["attn_norm"], eps)
            qkv = _project(h, layer["qkv"])
            if "qkv_bias" in layer:
                qkv += layer["qkv_bias"]
            qk = qkv[:, : num_q + num_kv].reshape(num_tokens, c.num_heads + c.num_kv_heads, c.head_dim)
            if qk_norm:  # RMSNorm over each head's vector, queries and keys with their own weights
                qk = np.concatenate([
                    self.rms_norm(qk[:, : c.num_heads].reshape(-1, c.head_dim), layer["q_norm"]).reshape(num_tokens, c.num_heads, c.head_dim),
                    self.rms_norm(qk[:, c.num_heads :].reshape(-1, c.head_dim), layer["k_norm"]).reshape(num_tokens, c.num_kv_heads, c.head_dim),
                ], axis=1)
            # rotate-half RoPE on queries and keys together, in place
            cos, sin = self.rope[self.layer_rope[index]]
            elementwise.rope_(qk, positions, cos, sin)
            q = qk[:, : c.num_heads]
            k = qk[:, c.num_heads :]
            v = qkv[:, num_q + num_kv :].reshape(num_tokens, c.num_kv_heads, c.head_dim)
            self._write_cache(cache, index, batch.slot_mapping, k, v)
            attn = self._attention(batch, cache, index, q, *self.attention_args[index])
            attn_out = _project(attn, layer["o"])
            if "o_bias" in layer:
                attn_out += layer["o_bias"]
            if sandwich:
                attn_out = self.rms_norm(attn_out, layer["post_attn_norm"])
            h = elementwise.add_rms_norm(x, attn_out, layer["mlp_norm"], eps)
            gate_up = _project(h, layer["gate_up"])
            gate = gate_up[:, : c.intermediate_size]
            up = gate_up[:, c.intermediate_size :]
            if gelu:
                act = _gelu_tanh(gate)
                act *= up
            else:
                act = elementwise.silu_mul(gate_up, c.intermediate_size)
            mlp_out = _project(act, layer["down"])
            if sandwich:
                mlp_out = self.rms_norm(mlp_out, layer["post_mlp_norm"])
            pending = mlp_out
        if pending is not None:
            x += pending
        return self.rms_norm(x[batch.output_rows], self.final_norm)

    def _decode_fused(self, x: np.ndarray, positions: np.ndarray, batch: ForwardBatch, cache: KVCache) -> np.ndarray:
        """forward() for a step of a few decoding tokens (as many as the layers' GEMVs take):
        each layer in one compiled call (kernels.decode_layer: the same kernels in the same order
        as the general path)."""
        c, d = self.config, batch.decodes
        eps = np.float32(c.rms_norm_eps)
        slots = np.asarray(batch.slot_mapping, dtype=np.int64)
        pending, following = np.empty_like(x), np.empty_like(x)
        threads, min_work = kernels.num_threads(), kernels.FUSED_PARALLEL_MIN_WORK
        for index, (layer, weights) in enumerate(zip(self.layers, self.fused_layers)):
            cos, sin = self.rope[self.layer_rope[index]]
            window, softcap = self.attention_args[index] or (0, 0.0)
            decode_layer(x, pending, index == 0, layer["attn_norm"], layer["mlp_norm"], eps, *weights,
                         c.num_heads, c.num_kv_heads, c.intermediate_size, cos, sin, positions,
                         cache.keys[index], cache.values[index], slots, d.rows, d.block_table,
                         d.context_lens, self.scale, int(window), np.float32(softcap), following,
                         threads, min_work)
            pending, following = following, pending
        x += pending
        return self.rms_norm(x[batch.output_rows], self.final_norm)

    def warm_up(self, cache: KVCache) -> float:
        """Run tokens through every layer so that the row-wise kernels compile (or load from the
        disk cache) for the model's own arrays, with more than one thread also in their parallel
        form; returns the seconds taken. Writes K/V into the first blocks, which no sequence
        holds yet (a sequence writes every slot it reads)."""
        start = time.perf_counter()
        # enough rows for the row-wise kernels' parallel form (see elementwise._run)
        many = max(elementwise.PARALLEL_MIN_ROWS, -(-elementwise.PARALLEL_MIN_ELEMENTS // self.config.hidden_size))
        sizes = [1] + ([many] if kernels.num_threads() > 1 else [])
        for n in sizes:
            n = min(n, cache.num_blocks * cache.block_size)
            ids = np.zeros(n, dtype=np.int64)
            span = AttentionSpan(0, n, np.arange(-(-n // cache.block_size), dtype=np.int64), n)
            batch = ForwardBatch(ids, np.arange(n), np.arange(n), [span], None, np.arange(n))
            self.logits(self.forward(batch, cache))
        # and a step of one decoding token (its own path: decode_layer where the layers allow)
        decode = ForwardBatch(np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64), np.ones(1, dtype=np.int64), [],
                              batch_decodes([0], [np.zeros(1, dtype=np.int64)], [2]), np.zeros(1, dtype=np.int64))
        self.logits(self.forward(decode, cache))
        return time.perf_counter() - start

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        logits = self._logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits /= np.float32(cap)
            np.tanh(logits, out=logits)
            logits *= np.float32(cap)
        return logits

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        if isinstance(self.lm_head, QuantizedWeight):
            return kernels.matmul(hidden, self.lm_head)
        if hidden.shape[0] == 1:
            return hidden @ self.lm_head_t
        rows, vocab = hidden.shape[0], self.lm_head.shape[0]
        if rows <= GEMV_MAX_ROWS:
            # one GEMV per row and vocabulary slice, the slice read from memory once
            logits = np.empty((rows, vocab), dtype=np.float32)
            for start in range(0, vocab, LM_HEAD_SLICE):
                weights = self.lm_head_t[:, start : start + LM_HEAD_SLICE]
                for row in range(rows):
                    np.matmul(hidden[row], weights, out=logits[row, start : start + LM_HEAD_SLICE])
            return logits
        # [vocab, hidden] @ hidden.T in vocabulary slices, each transposed into the output while
        # still in cache (one [vocab, rows] result transposed at the end costs ~10% more)
        logits = np.empty((rows, vocab), dtype=np.float32)
        hidden_t = np.ascontiguousarray(hidden.T)
        step = 4096
        part = self._buffer("logits", (step, rows))
        for start in range(0, vocab, step):
            stop = min(start + step, vocab)
            np.matmul(self.lm_head[start:stop], hidden_t, out=part[: stop - start])
            logits[:, start:stop] = part[: stop - start].T
        return logits

    @staticmethod
    def _write_cache(cache: KVCache, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        num_blocks, block_size, num_kv_heads, head_dim = cache.keys.shape[1:]
        flat = (num_blocks * block_size, num_kv_heads, head_dim)
        cache.keys[layer].reshape(flat)[slots] = to_cache(k, cache.keys.dtype)
        cache.values[layer].reshape(flat)[slots] = to_cache(v, cache.values.dtype)

    def _attention(self, batch: ForwardBatch, cache: KVCache, layer: int, q: np.ndarray, window: int = 0,
                   softcap: float = 0.0) -> np.ndarray:
        """window > 0: each query sees only the last `window` positions (itself included);
        softcap > 0: scores become softcap * tanh(scores / softcap) before the mask."""
        c = self.config
        kv_heads, group, head_dim = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        q = q * self.scale  # [T, heads, head_dim]; scaling q, not the scores, is one op per layer
        out = np.empty((q.shape[0], c.num_heads * head_dim), dtype=np.float32)
        keys, values = cache.keys[layer], cache.values[layer]
        d = batch.decodes
        if d is not None:
            paged_decode_attention(q, d.rows, keys, values, d.block_table, d.context_lens, out, window, softcap)
        for span in batch.spans:
            n, length = span.num_tokens, span.context_len
            k = to_float32(keys[span.block_ids]).reshape(-1, kv_heads, head_dim)[:length].transpose(1, 2, 0)
            v = to_float32(values[span.block_ids]).reshape(-1, kv_heads, head_dim)[:length].transpose(1, 0, 2)
            # queries in tiles, each against the keys up to its own last position: the causal
            # triangle above the diagonal tiles is never computed, and only a tile's last
            # `rows` keys need the mask
            for first in range(0, n, PREFILL_QUERY_TILE):
                rows = min(PREFILL_QUERY_TILE, n - first)
                visible = length - n + first + rows
                start = span.start + first
                qs = q[start : start + rows].reshape(rows, kv_heads, group, head_dim)
                qs = qs.transpose(1, 2, 0, 3).reshape(kv_heads, group * rows, head_dim)
                # a window: keys before the tile's first query's window are never computed
                low = max(0, visible - rows - window + 1) if window else 0
                scores = qs @ k[:, :, low:visible]  # [kv_heads, group * rows, visible - low]
                if softcap:
                    scores /= np.float32(softcap)
                    np.tanh(scores, out=scores)
                    scores *= np.float32(softcap)
                if window:
                    scores.reshape(kv_heads, group, rows, visible - low)[...] += _window_mask(
                        visible - rows, rows, low, visible, window)
                elif rows > 1:
                    scores.reshape(kv_heads, group, rows, visible)[..., visible - rows :] += _causal_mask(rows)
                o = (_softmax(scores) @ v[:, low:visible]).reshape(kv_heads, group, rows, head_dim)
                out[start : start + rows] = o.transpose(2, 0, 1, 3).reshape(rows, -1)
        return out


LlamaModel = DecoderModel  # the name it had when Llama was the only family


def _fused_layers(c: ModelConfig, layers: list[dict]) -> list[tuple] | None:
    """Each layer's QKV, O, gate/up and down weights as kernels.decode_layer takes them, if every
    layer is the plain Llama-style kind it covers; else None."""
    if c.qk_norm or c.sandwich_norms or c.hidden_act == "gelu_tanh":
        return None
    names = ("qkv", "o", "gate_up", "down")
    fused = []
    for layer in layers:
        if "qkv_bias" in layer or "o_bias" in layer:
            return None
        weights = [layer[n] for n in names]
        if not all(isinstance(w, list) and len(w) == 1 and isinstance(w[0], QuantizedWeight) for w in weights):
            return None
        fused.append(tuple(weight_args(w[0]) for w in weights))
    return fused


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (PyTorch's approximate="tanh"), float32."""
    inner = x * x
    inner *= np.float32(0.044715)
    inner += np.float32(1.0)
    inner *= x
    inner *= np.float32(math.sqrt(2.0 / math.pi))
    np.tanh(inner, out=inner)
    inner += np.float32(1.0)
    inner *= x
    inner *= np.float32(0.5)
    return inner


def _window_mask(first_pos: int, rows: int, low: int, visible: int, window: int) -> np.ndarray:
    """[rows, visible - low]: 0 where key j (absolute low + column) is within query i's window
    (first_pos + i - window < j <= first_pos + i), -inf elsewhere."""
    queries = np.arange(first_pos, first_pos + rows)[:, None]
    keys = np.arange(low, visible)[None, :]
    return np.where((keys <= queries) & (keys > queries - window), np.float32(0.0), np.float32(-np.inf))


def _fuse(weights: list) -> np.ndarray | list[QuantizedWeight]:
    """Projections over the same input as one: float32 weights concatenated and transposed to
    [in, out] for BLAS; quantized ones stacked where their formats allow (kernels.fuse)."""
    if all(isinstance(w, np.ndarray) for w in weights):
        return np.ascontiguousarray(np.concatenate(weights).T)
    if not all(isinstance(w, QuantizedWeight) for w in weights):  # a mixed file: quantize nothing back
        weights = [kernels.dequantize(w) if isinstance(w, QuantizedWeight) else w for w in weights]
        return np.ascontiguousarray(np.concatenate(weights).T)
    return kernels.fuse(weights)


def _project(x: np.ndarray, weight: np.ndarray | list[QuantizedWeight]) -> np.ndarray:
    """x [rows, in] @ weight [in, out]; see GEMV_MAX_ROWS."""
    if isinstance(weight, list):
        outs = [kernels.matmul(x, w) for w in weight]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
    rows = x.shape[0]
    if not 1 < rows <= GEMV_MAX_ROWS:
        return x @ weight
    out = np.empty((rows, weight.shape[1]), dtype=np.float32)
    for row in range(rows):
        np.matmul(x[row], weight, out=out[row])
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    """In place over the last axis."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


@functools.lru_cache(maxsize=8)
def _causal_mask(size: int) -> np.ndarray:
    """[size, size]: 0 where key j <= query i, -inf above the diagonal (read-only, shared)."""
    mask = np.triu(np.full((size, size), -np.inf, dtype=np.float32), k=1)
    mask.flags.writeable = False
    return mask
