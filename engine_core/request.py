"""A request and its sequences, as the engine core tracks them.

A request starts with one sequence that prefills the prompt. With n > 1 or best_of, that
sequence forks into the request's candidates the moment the prompt is done, so the prompt is
computed once and its KV blocks are shared.

`Sequence` is the engine's name for one token sequence (as in vLLM and nano-vllm); no module
here uses `collections.abc.Sequence` or `typing.Sequence`, so the name stands alone.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

from engine_core.structured_output import GrammarMatcher
from ipc.messages import EngineCoreRequest, FinishCause, PoolingParams, SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from engine_core.beam_search import BeamState


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    def __init__(self, message: EngineCoreRequest, vocab_size: int):
        self.request_id = message.request_id
        self.prompt_token_ids = message.prompt_token_ids
        self.params: SamplingParams = message.sampling_params
        # the one place EOS ids are filtered: ids outside the vocabulary can never be sampled,
        # and are kept out of the logit masks (see stopping_eos_token_ids for ignore_eos)
        self.eos_token_ids = frozenset(i for i in message.eos_token_ids if 0 <= i < vocab_size)
        self.arrival_time = message.arrival_time
        self.sequences: list[Sequence] = [Sequence(self, 0, list(message.prompt_token_ids))]
        self.prompt_logprobs: list[TokenLogprobs | None] = [None]
        self.has_sent_output = False  # its first output carries the prompt logprobs and queue time
        self.is_forked = False
        self.beams: BeamState | None = None  # beam search (set by the engine); live beams are `sequences`
        # stamped by the scheduler: when it was queued, and at its first start the seconds it
        # waited and the prompt tokens it found in the prefix cache
        self.enqueued_at_s = 0.0
        self.queue_time_s: float | None = None
        self.num_cached_tokens = 0
        self.is_prompt_counted = False  # in the engine's num_prompt_tokens (its prefill finished once)
        # a pooling request (`--runner pooling`): prefill only; its pooled hidden states so far
        self.pooling: PoolingParams | None = message.pooling
        self.pooled_sum: np.ndarray | None = None
        self.num_pooled_rows = 0
        self.pools_every_position = False  # set by the engine for mean pooling: no cached prefix then

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_pooling(self) -> bool:
        return self.pooling is not None

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (
            self.params.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    @property
    def stopping_eos_token_ids(self) -> frozenset[int]:
        """The EOS ids that end a sequence: none with ignore_eos."""
        return frozenset() if self.params.ignore_eos else self.eos_token_ids

    @property
    def has_started(self) -> bool:
        return self.queue_time_s is not None

    @property
    def holds_outputs_until_done(self) -> bool:
        """best_of > n picks the winners at the end, so nothing streams before then."""
        return self.params.num_candidates > self.params.n

    @property
    def is_finished(self) -> bool:
        return self.has_all_candidates and all(s.is_finished for s in self.sequences)

    @property
    def has_all_candidates(self) -> bool:
        """Whether `sequences` are the request's candidates: the prompt's sequence has forked,
        or it is the only one the request needs."""
        return self.is_forked or self.params.num_candidates == 1

    @property
    def num_generated_tokens(self) -> int:
        if self.beams is not None:
            return self.beams.search.num_generated_tokens
        return sum(s.num_output_tokens for s in self.sequences)


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
        self.finish_cause: FinishCause | None = None
        self.stop_reason: int | None = None  # the stop token id that ended it (not an EOS)
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
