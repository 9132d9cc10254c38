"""The device seam: turn a scheduled step into arrays, run the model, return logits.

This runner is numpy on the CPU. An accelerator backend replaces this module only: it takes the
same `SchedulerOutput` and returns the same `RunnerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine_core.loader import ModelConfig
from engine_core.model import DecodeGroup, ForwardBatch, KVCache, LlamaModel, PrefillSpan
from engine_core.scheduler import SchedulerOutput, ScheduledSequence

# A decode group is closed when padding it to its longest context would waste more than this
# fraction of the attention work (contexts are sorted, so groups hold similar lengths).
MAX_PADDING_WASTE = 0.25
MIN_GROUP_SIZE = 4


@dataclass
class RunnerOutput:
    sample_logits: np.ndarray  # [len(sample_entries), vocab]: one row per completing sequence
    sample_entries: list[ScheduledSequence]
    prompt_logits: dict[int, np.ndarray]  # scheduled index -> [rows, vocab] for prompt logprobs


class ModelRunner:
    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], *, num_blocks: int,
                 block_size: int, max_model_len: int):
        self.config = config
        self.block_size = block_size
        self.model = LlamaModel(config, weights, max_len=max_model_len)
        self.cache = KVCache(config, num_blocks, block_size)

    def execute(self, out: SchedulerOutput, prompt_logit_rows: dict[int, int]) -> RunnerOutput:
        """prompt_logit_rows: scheduled index -> how many leading rows of its chunk need logits."""
        self.cache.copy_blocks(out.block_copies)
        batch, sample_entries, prompt_slices = self.prepare(out, prompt_logit_rows)
        hidden = self.model.forward(batch, self.cache)
        logits = self.model.logits(hidden) if len(hidden) else np.zeros((0, self.config.vocab_size), np.float32)
        num_samples = len(sample_entries)
        prompt_logits = {i: logits[a:b] for i, (a, b) in prompt_slices.items()}
        return RunnerOutput(logits[:num_samples], sample_entries, prompt_logits)

    def prepare(self, out: SchedulerOutput, prompt_logit_rows: dict[int, int]):
        bs = self.block_size
        decodes = [e for e in out.scheduled if e.num_tokens == 1]
        prefills = [e for e in out.scheduled if e.num_tokens > 1]
        token_ids, positions, slots = [], [], []
        row_of: dict[int, int] = {}  # id(entry) -> first row
        for entry in decodes + prefills:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            row_of[id(entry)] = len(token_ids)
            pos = np.arange(start, start + entry.num_tokens)
            blocks = np.asarray(seq.block_ids, dtype=np.int64)
            token_ids.extend(seq.token_ids[start : start + entry.num_tokens])
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
        positions_arr = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        slots_arr = np.concatenate(slots) if slots else np.zeros(0, np.int64)

        spans = []
        for entry in prefills:
            context_len = entry.seq.num_computed_tokens + entry.num_tokens
            block_ids = np.asarray(entry.seq.block_ids[: -(-context_len // bs)], dtype=np.int64)
            spans.append(PrefillSpan(row_of[id(entry)], entry.num_tokens, block_ids, context_len))

        sample_entries = [e for e in out.scheduled if e.completes]
        output_rows = [row_of[id(e)] + e.num_tokens - 1 for e in sample_entries]
        prompt_slices = {}
        for index, count in prompt_logit_rows.items():
            entry = out.scheduled[index]
            first = row_of[id(entry)]
            prompt_slices[index] = (len(output_rows), len(output_rows) + count)
            output_rows.extend(range(first, first + count))
        batch = ForwardBatch(
            token_ids=np.asarray(token_ids, dtype=np.int64),
            positions=positions_arr,
            slot_mapping=slots_arr,
            decode_groups=self._decode_groups(decodes, row_of),
            prefill_spans=spans,
            output_rows=np.asarray(output_rows, dtype=np.int64),
        )
        return batch, sample_entries, prompt_slices

    def _decode_groups(self, decodes: list[ScheduledSequence], row_of: dict[int, int]) -> list[DecodeGroup]:
        if not decodes:
            return []
        lengths = np.array([e.seq.num_computed_tokens + 1 for e in decodes])
        order = np.argsort(lengths, kind="stable")
        groups, current, total = [], [], 0
        for i in order:
            length = int(lengths[i])
            padded = (len(current) + 1) * length
            if len(current) >= MIN_GROUP_SIZE and padded > (1 + MAX_PADDING_WASTE) * (total + length):
                groups.append(current)
                current, total = [], 0
            current.append(i)
            total += length
        groups.append(current)
        return [self._decode_group([decodes[i] for i in g], row_of) for g in groups]

    def _decode_group(self, entries: list[ScheduledSequence], row_of: dict[int, int]) -> DecodeGroup:
        bs = self.block_size
        lengths = np.array([e.seq.num_computed_tokens + 1 for e in entries])
        num_blocks = -(-int(lengths.max()) // bs)
        table = np.zeros((len(entries), num_blocks), dtype=np.int64)
        for i, e in enumerate(entries):
            used = -(-int(lengths[i]) // bs)
            table[i, :used] = e.seq.block_ids[:used]
        visible = np.arange(num_blocks * bs)[None, :] < lengths[:, None]
        mask = np.where(visible, 0.0, -np.inf).astype(np.float32)
        rows = np.array([row_of[id(e)] for e in entries], dtype=np.int64)
        return DecodeGroup(rows, table, mask)
