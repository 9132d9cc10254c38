"""Continuous batching in the vLLM V1 manner: no prefill or decode phase, one token budget.

Each step hands `max_num_batched_tokens` out over running sequences first (a decode costs one
token, an unfinished prompt takes what is left in chunks), then over waiting sequences in
arrival order, with at most `max_num_seqs` running. When the KV cache has no block for a
running sequence, the newest running sequence is preempted: its blocks are freed and it waits
to be recomputed from its tokens (a beam whose logits are already in waits for its siblings
instead). Nothing is dropped: a sequence that cannot fit even alone is finished with an error.

The scheduler also stamps each request's start: the time it spent queued (from `add` to the
first step that runs it) and the prompt tokens it found in the prefix cache then.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine_core.kv_cache_manager import KVCacheManager
from engine_core.request import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens computed for seq this step, from seq.num_computed_tokens on

    @property
    def completes(self) -> bool:
        """Whether this step reaches the end of seq's tokens, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's plan: what to compute for which sequences, and the block copies to make first."""

    entries: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    unfittable: list[Sequence] = field(default_factory=list)  # can never fit the cache

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.entries)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 clock: Callable[[], float] = time.time):
        self.kv = kv
        self.clock = clock  # for the queue-time stamps; tests replace it
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """A new request's first sequence joins the queue; its queue time starts now."""
        seq.request.enqueued_at_s = self.clock()
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A candidate forked from a running sequence runs alongside it."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of the queues and return its blocks; it is finished or aborted."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput()
        step_start_s = self.clock()
        budget = self.max_num_batched_tokens
        preempted_any = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if num_tokens == 0:  # a beam waiting for its siblings' logits
                index += 1
                continue
            while not self.kv.can_allocate(seq, num_tokens):
                victim = self.running[-1]
                if victim is seq and index == 0:
                    # alone and still too big: it can never run
                    self.running.pop()
                    self._drop(seq)
                    plan.unfittable.append(seq)
                    seq = None
                    break
                self._preempt(victim)
                preempted_any = True
                if victim is seq:
                    seq = None
                    break
            if seq is None:
                break
            plan.block_copies += self.kv.allocate(seq, num_tokens)
            plan.entries.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
            index += 1
        while budget > 0 and not preempted_any:
            seq = next((s for s in self.waiting if not _waits_for_sibling_beams(s)), None)
            if seq is None:
                break
            cached = self.kv.cached_prefix(seq)  # blocks it can start on instead of computing
            num_tokens = min(seq.num_uncomputed_tokens - len(cached) * self.kv.block_size, budget)
            if not plan.entries and not self._can_start(seq, num_tokens, cached):
                self._preempt_idle_for(seq, num_tokens, cached)  # frees blocks; names stay, so cached holds
            if self._num_seats_taken() + _num_seats_needed(seq) > self.max_num_seqs:
                break
            if not self.kv.can_allocate(seq, num_tokens, cached):
                if not self.running and not plan.entries:
                    self.waiting.remove(seq)
                    self._drop(seq)
                    plan.unfittable.append(seq)
                    continue
                break
            self._start(seq, cached, step_start_s)
            plan.block_copies += self.kv.allocate(seq, num_tokens)
            plan.entries.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        return plan

    def _start(self, seq: Sequence, cached: list[int], step_start_s: float) -> None:
        """seq leaves the queue and runs, on its cached prefix; a request's first start is stamped."""
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        num_hit_tokens = self.kv.start_from_cache(seq, cached)
        request = seq.request
        if not request.has_started:  # not a preempted sequence (or a sibling) starting again
            request.queue_time_s = max(0.0, step_start_s - request.enqueued_at_s)
            request.num_cached_tokens = num_hit_tokens

    def _can_start(self, seq: Sequence, num_tokens: int, cached: list[int]) -> bool:
        return (self._num_seats_taken() + _num_seats_needed(seq) <= self.max_num_seqs
                and self.kv.can_allocate(seq, num_tokens, cached))

    def _num_seats_taken(self) -> int:
        """Running seats held: each running sequence's, counted as `_num_seats_needed` does."""
        return sum(_num_seats_needed(s) for s in self.running)

    def _preempt_idle_for(self, seq: Sequence, num_tokens: int, cached: list[int]) -> None:
        """Idle running sequences (beams waiting for a sibling's logits) hold blocks and seats
        they do not need before the next beam step. When nothing else runs and the head of the
        queue cannot start, they give them up (newest first) so it can: otherwise a lagging
        beam could wait forever for room its idle siblings hold."""
        idle = [s for s in self.running if s.num_uncomputed_tokens == 0]
        self.waiting.remove(seq)  # preempted sequences go to the front; seq stays ahead of them
        while idle and not self._can_start(seq, num_tokens, cached):
            self._preempt(idle.pop())
        self.waiting.appendleft(seq)

    def _drop(self, seq: Sequence) -> None:
        """seq has left the queues for good; the engine reports it finished."""
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


def _waits_for_sibling_beams(seq: Sequence) -> bool:
    """A beam preempted after its logits for this beam step were recorded: it needs nothing
    computed until its siblings have theirs too, so it waits without a place in line. (Were it
    recomputed, making room for it would preempt a sibling, and a search whose beams cannot all
    fit at once would go round in circles instead of taking them one at a time.)"""
    beams = seq.request.beams
    return beams is not None and beams.has_logprobs(seq.index)


def _num_seats_needed(seq: Sequence) -> int:
    """Running seats (of max_num_seqs) a sequence takes: a prompt that will fork into n
    candidates (or beams) reserves them all, so max_num_seqs bounds the sequences that will
    actually run."""
    request = seq.request
    return request.params.num_candidates if len(request.sequences) == 1 else 1
