"""A request and its sequences, as the engine core tracks them.

A request starts with one sequence that prefills the prompt. With n > 1 or best_of, that
sequence forks into the request's candidates the moment the prompt is done, so the prompt is
computed once and its KV blocks are shared.
"""

from __future__ import annotations

import enum

import numpy as np

from engine_core.beam_search import BeamSearch
from engine_core.structured_output import GrammarMatcher
from ipc.messages import EngineCoreRequest, FinishReason, SamplingParams, TokenLogprobs


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    def __init__(self, message: EngineCoreRequest):
        self.request_id = message.request_id
        self.prompt_token_ids = message.prompt_token_ids
        self.params: SamplingParams = message.sampling_params
        self.eos_token_ids = frozenset(message.eos_token_ids)
        self.arrival_time = message.arrival_time
        self.sequences: list[Sequence] = [Sequence(self, 0, list(message.prompt_token_ids))]
        self.prompt_logprobs: list[TokenLogprobs | None] = [None]
        self.has_sent_output = False  # its first output carries the prompt logprobs and queue time
        self.is_forked = False
        # beam search (set by the engine): the live beams are `sequences`, best first; each
        # beam's next-token logprobs wait here until every live beam has them
        self.beam_search: BeamSearch | None = None
        self.beam_logprobs: dict[int, np.ndarray] = {}  # sequence index -> [vocab]
        self.num_sequences_created = 1
        # stamped by the scheduler: when it was queued, and at its first start the seconds it
        # waited and the prompt tokens it found in the prefix cache
        self.enqueued_at_s = 0.0
        self.queue_time_s: float | None = None
        self.num_cached_tokens = 0
        self.is_prompt_counted = False  # in the engine's num_prompt_tokens (its prefill finished once)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (
            self.params.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    @property
    def has_started(self) -> bool:
        return self.queue_time_s is not None

    @property
    def holds_outputs_until_done(self) -> bool:
        """best_of > n picks the winners at the end, so nothing streams before then."""
        return self.params.num_candidates > self.params.n

    @property
    def is_finished(self) -> bool:
        return self.is_forked_or_single and all(s.is_finished for s in self.sequences)

    @property
    def is_forked_or_single(self) -> bool:
        return self.is_forked or self.params.num_candidates == 1

    @property
    def num_generated_tokens(self) -> int:
        if self.beam_search is not None:
            return self.beam_search.num_generated_tokens
        return sum(s.num_output_tokens for s in self.sequences)

    def next_sequence_index(self) -> int:
        """Beams come and go; each new one gets an index no other beam of the request had."""
        self.num_sequences_created += 1
        return self.num_sequences_created - 1


class Sequence:
    def __init__(self, request: Request, index: int, token_ids: list[int]):
        self.request = request
        self.index = index
        self.token_ids = token_ids  # prompt + output
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache names of its full blocks of tokens
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | None = None
        self.cumulative_logprob = 0.0
        self.num_sent_tokens = 0  # output tokens already reported to the frontend
        self.pending_logprobs: list[TokenLogprobs] = []
        seed = request.params.seed
        self.generator = None if seed is None else np.random.default_rng(seed + index)
        self.grammar: GrammarMatcher | None = None  # structured output: the output's place in its grammar

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def fork(self, index: int) -> "Sequence":
        """A candidate that shares everything so far; the caller shares the KV blocks."""
        child = Sequence(self.request, index, list(self.token_ids))
        child.num_computed_tokens = self.num_computed_tokens
        child.block_ids = list(self.block_ids)
        child.block_hashes = list(self.block_hashes)
        child.num_registered_blocks = self.num_registered_blocks
        child.status = self.status
        child.grammar = self.grammar.fork() if self.grammar is not None else None
        return child
