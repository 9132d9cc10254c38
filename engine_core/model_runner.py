"""The device seam: turn a scheduled step into arrays, run the model, return logits.

This runner is numpy on the CPU. An accelerator backend replaces this module only: it takes the
same `SchedulerOutput` and returns the same `RunnerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine_core import kernels
from engine_core.kernels import attention
from engine_core.loader import ModelConfig
from engine_core.model import AttentionSpan, ForwardBatch, KVCache, LlamaModel, batch_decodes
from engine_core.scheduler import SchedulerOutput, ScheduledSequence


@dataclass
class RunnerOutput:
    sample_logits: np.ndarray  # [len(sample_entries), vocab]: one row per completing sequence
    sample_entries: list[ScheduledSequence]
    prompt_logits: dict[int, np.ndarray]  # scheduled index -> [rows, vocab] for prompt logprobs
    # scheduled index -> [rows, hidden]: final-normed hidden states of a pooling request's chunk
    pooled_hidden: dict[int, np.ndarray] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], *, num_blocks: int,
                 block_size: int, max_model_len: int, kv_cache_dtype: str = "float32",
                 activation_dtype: str = "float32"):
        kernels.set_activation_precision(activation_dtype)  # first: a bad value fails before any work
        self.config = config
        self.block_size = block_size
        self.model = LlamaModel(config, weights, max_len=max_model_len)
        # the kernels use as many threads as BLAS was given (threadpool_limits at start-up), and
        # are compiled (or loaded from the disk cache) now, before the engine reports ready
        kernels.set_num_threads(_blas_threads())
        formats = {w.qtype for w in weights.values() if isinstance(w, kernels.QuantizedWeight)}
        self.kernel_warm_up_s = kernels.warm_up(formats) if formats else 0.0
        self.cache = KVCache(config, num_blocks, block_size, kv_cache_dtype)
        self.attention_warm_up_s = attention.warm_up(self.cache.keys.dtype)
        self.model_warm_up_s = self.model.warm_up(self.cache)
        _release_free_heap()

    def execute(self, plan: SchedulerOutput, prompt_logit_rows: dict[int, int],
                pooled_rows: dict[int, tuple[int, int]] | None = None) -> RunnerOutput:
        """prompt_logit_rows: scheduled index -> how many leading rows of its chunk need logits.
        pooled_rows: scheduled index of each pooling entry -> (first row in its chunk, count)
        whose hidden states it needs; those entries get no logits and are never sampled."""
        pooled_rows = pooled_rows or {}
        self.cache.copy_blocks(plan.block_copies)
        batch, sample_entries, prompt_slices, pooled_slices = self.prepare(plan, prompt_logit_rows, pooled_rows)
        hidden = self.model.forward(batch, self.cache)
        num_logit_rows = len(hidden) - sum(count for _, count in pooled_rows.values())
        logits = (self.model.logits(hidden[:num_logit_rows]) if num_logit_rows
                  else np.zeros((0, self.config.vocab_size), np.float32))
        num_samples = len(sample_entries)
        prompt_logits = {i: logits[a:b] for i, (a, b) in prompt_slices.items()}
        pooled_hidden = {i: hidden[a:b] for i, (a, b) in pooled_slices.items()}
        return RunnerOutput(logits[:num_samples], sample_entries, prompt_logits, pooled_hidden)

    def prepare(self, plan: SchedulerOutput, prompt_logit_rows: dict[int, int],
                pooled_rows: dict[int, tuple[int, int]] | None = None):
        pooled_rows = pooled_rows or {}
        bs = self.block_size
        token_ids, positions, slots, starts = [], [], [], []
        spans, decode_rows, decode_blocks, decode_lens = [], [], [], []
        for entry in plan.entries:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            context_len = start + entry.num_tokens
            pos = np.arange(start, context_len)
            blocks = np.asarray(seq.block_ids[: -(-context_len // bs)], dtype=np.int64)
            starts.append(len(token_ids))
            if entry.num_tokens == 1:
                decode_rows.append(len(token_ids))
                decode_blocks.append(blocks)
                decode_lens.append(context_len)
            else:
                spans.append(AttentionSpan(len(token_ids), entry.num_tokens, blocks, context_len))
            token_ids.extend(seq.token_ids[start:context_len])
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
        is_sampled = [e.completes and i not in pooled_rows for i, e in enumerate(plan.entries)]
        sample_entries = [e for e, sampled in zip(plan.entries, is_sampled) if sampled]
        output_rows = [start + e.num_tokens - 1 for start, e, sampled in zip(starts, plan.entries, is_sampled) if sampled]
        prompt_slices = {}
        for index, count in prompt_logit_rows.items():
            prompt_slices[index] = (len(output_rows), len(output_rows) + count)
            output_rows.extend(range(starts[index], starts[index] + count))
        pooled_slices = {}  # after every row that needs logits
        for index, (first, count) in pooled_rows.items():
            if count:
                pooled_slices[index] = (len(output_rows), len(output_rows) + count)
                output_rows.extend(range(starts[index] + first, starts[index] + first + count))
        batch = ForwardBatch(
            token_ids=np.asarray(token_ids, dtype=np.int64),
            positions=np.concatenate(positions),
            slot_mapping=np.concatenate(slots),
            spans=spans,
            decodes=batch_decodes(decode_rows, decode_blocks, decode_lens),
            output_rows=np.asarray(output_rows, dtype=np.int64),
        )
        return batch, sample_entries, prompt_slices, pooled_slices


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return min(counts) if counts else 1


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). Loading unpacks
    each tensor through temporaries of a few MB, which glibc serves from the heap once its
    mmap threshold has risen; freed, they stay resident. An 8B Q4_K_M file (4.58 GiB) left the
    engine at 8.29 GiB with a 0.5 GiB cache, 5.80 GiB after this (1.16x the file plus the cache)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
