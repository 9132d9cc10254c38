"""EngineCore: the engine's logic (add, abort, step) with no sockets, threads or signals.

A step is three calls: the scheduler plans which tokens to compute, the model runner computes
logits, and `_postprocess` turns them into outputs, in stages: record what was computed; route
each logit row (a finished prompt forks into its candidates, a beam's row goes to its beam
search); sample; append the tokens and check the stop conditions; emit each sequence's news.
Every final output says why the sequence ended (`FinishCause`, with OpenAI's `FinishReason`).

Beam search requests take another path after their prompt: their live beams' logprobs are
collected (`BeamState`) until every beam has them, then the search picks the next beams, and the
engine forks, keeps or frees the beams' sequences (forks share KV blocks by reference count
and copy a partly filled block on write). Their hypotheses are reported once, at the end.
"""

from __future__ import annotations

import time

import logging

import numpy as np

from engine_core.beam_search import BeamState, BeamStep
from engine_core.kv_cache_manager import KVCacheManager
from engine_core.loader import ModelConfig, load_artifact
from engine_core.model import KVCache, resolve_kv_cache_dtype
from engine_core.model_runner import ModelRunner, RunnerOutput
from engine_core.pooler import Pooler
from engine_core.request import Request, Sequence
from engine_core.sampler import SampledToken, Sampler, log_softmax, token_logprobs
from engine_core.structured_output import StructuredOutputManager
from engine_core.scheduler import Scheduler, SchedulerOutput
from ipc.config import POOLER_TYPES, RUNNERS, EngineConfig
from ipc.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineReady,
    FinishCause,
    SchedulerStats,
)
from ipc.shared.structured_output import StructuredOutputError
from ipc.shared.vocabulary import read_vocabulary


logger = logging.getLogger("furiosa_llm.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: dict[str, np.ndarray]):
        if config.runner not in RUNNERS:
            raise ValueError(f"runner {config.runner!r} is not one of {', '.join(RUNNERS)}")
        if config.pooler_type not in POOLER_TYPES:
            raise ValueError(f"pooler type {config.pooler_type!r} is not one of {', '.join(POOLER_TYPES)}")
        self.config = config
        self.model_config = model_config
        self.is_pooling_runner = config.runner == "pooling"
        self.pooler = Pooler(config.pooler_type)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype)
        block_bytes = KVCache.bytes_per_block(model_config, config.block_size, self.kv_cache_dtype)
        self.num_blocks = max(1, int(config.kv_cache_gib * 2**30) // block_bytes)
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        if self.max_model_len > self.capacity_tokens:
            # a sequence longer than the whole cache could never finish: promise only what fits
            logger.warning("max_model_len %d exceeds the KV cache (%d tokens); using %d",
                           self.max_model_len, self.capacity_tokens, self.capacity_tokens)
            self.max_model_len = self.capacity_tokens
        self.runner = ModelRunner(
            model_config, weights, num_blocks=self.num_blocks,
            block_size=config.block_size, max_model_len=self.max_model_len,
            kv_cache_dtype=self.kv_cache_dtype, activation_dtype=config.activation_dtype,
        )
        self.kv = KVCacheManager(self.num_blocks, config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching)
        logger.info("KV cache: %d blocks of %d tokens (%s, %.2f GiB) allocated and touched in %.1f s; engine RSS %.2f GiB",
                    self.num_blocks, config.block_size, self.kv_cache_dtype, self.num_blocks * block_bytes / 2**30,
                    self.runner.cache.allocation_s, _rss_bytes() / 2**30)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.structured_output = StructuredOutputManager(
            lambda: read_vocabulary(config.model), model_config.vocab_size
        )
        self.requests: dict[str, Request] = {}
        self.pending_outputs: list[EngineCoreOutput] = []
        self.num_prompt_tokens = 0  # whole prompts of requests whose prefill finished, as vLLM counts
        self.num_prompt_tokens_computed = 0  # prefill tokens computed (not from the cache; recomputation included)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "EngineCore":
        model_config, weights = load_artifact(config.model)
        return cls(config, model_config, weights)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.config.block_size

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self.pending_outputs)

    def ready_message(self) -> EngineReady:
        return EngineReady(
            model_name=self.config.served_model_name,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            num_kv_blocks=self.num_blocks,
            block_size=self.config.block_size,
            hidden_size=self.model_config.hidden_size,
        )

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens_computed=self.num_prompt_tokens_computed,
            prefix_cache_queried_tokens=self.kv.num_queried_tokens,
            prefix_cache_hit_tokens=self.kv.num_hit_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
        )

    # ------------------------------------------------------------------ requests in

    def add_request(self, message: EngineCoreRequest) -> None:
        request = Request(message, self.model_config.vocab_size)
        request.pools_every_position = request.is_pooling and self.pooler.needs_every_position
        error = self._check_request(request) or self._attach_grammar(request)
        if error is not None:
            output = EngineCoreOutput(request.request_id, 0, [])
            _set_finish(output, FinishCause.ERROR, error=error)
            self.pending_outputs.append(output)
            return
        if request.params.use_beam_search:
            max_new_tokens = min(request.params.max_tokens, self.max_model_len - request.num_prompt_tokens)
            request.beams = BeamState.from_params(request.params, request.stopping_eos_token_ids, max(1, max_new_tokens))
        self.requests[request.request_id] = request
        self.scheduler.add(request.sequences[0])

    def _check_request(self, request: Request) -> str | None:
        num_prompt = request.num_prompt_tokens
        if request.request_id in self.requests:
            return f"request id {request.request_id!r} is already in use"
        if num_prompt == 0:
            return "the prompt is empty"
        if request.is_pooling != self.is_pooling_runner:
            return ("this model runs as a pooling runner: it serves embeddings, not generation" if self.is_pooling_runner
                    else "this model runs as a generate runner: start it with --runner pooling for embeddings")
        # a pooled prompt may fill the context; a generated one needs room for a token
        if num_prompt > self.max_model_len or (num_prompt == self.max_model_len and not request.is_pooling):
            return f"the prompt has {num_prompt} tokens; this model's context is {self.max_model_len}"
        if max(request.prompt_token_ids) >= self.model_config.vocab_size or min(request.prompt_token_ids) < 0:
            return f"prompt token ids must be in [0, {self.model_config.vocab_size})"
        if num_prompt + 1 > self.capacity_tokens:
            return f"the prompt has {num_prompt} tokens; the KV cache holds {self.capacity_tokens}"
        return None

    def _attach_grammar(self, request: Request) -> str | None:
        spec = request.params.structured_output
        if spec is None:
            return None
        if request.params.use_beam_search:
            return "structured output does not work with beam search"
        try:
            request.sequences[0].grammar = self.structured_output.matcher_for(spec)
        except StructuredOutputError as exc:
            return f"the structured output spec does not compile: {exc}"
        except Exception as exc:  # e.g. a vocabulary the grammar library cannot read: this request only
            logger.exception("structured output unavailable")
            return f"structured output is unavailable for this model: {type(exc).__name__}: {exc}"
        return None

    def abort_requests(self, request_ids: list[str], indices: list[int] | None = None) -> None:
        for k, request_id in enumerate(request_ids):
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.beams is not None:  # its beams are not the n choices: end them all
                self._end_beam_search(request, FinishCause.ABORT)
                continue
            only = None if indices is None or indices[k] < 0 else indices[k]
            for seq in list(request.sequences):
                if not seq.is_finished and (only is None or seq.index == only or not request.is_forked):
                    self._finish(seq, FinishCause.ABORT)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[EngineCoreOutput]:
        plan = self.scheduler.schedule()
        for seq in plan.unfittable:
            self._finish(seq, FinishCause.ERROR,
                         error=f"the sequence needs more KV cache than the engine has ({self.capacity_tokens} tokens)")
        if plan.unfittable:  # finishing one can end its siblings (a beam search) too
            plan.entries = [e for e in plan.entries if not e.seq.is_finished]
        if plan.entries:
            prompt_rows = self._prompt_logit_rows(plan)
            result = self.runner.execute(plan, prompt_rows, self._pooled_rows(plan))
            self._postprocess(plan, result)
        outputs, self.pending_outputs = self.pending_outputs, []
        return outputs

    def _prompt_logit_rows(self, plan: SchedulerOutput) -> dict[int, int]:
        rows = {}
        for index, entry in enumerate(plan.entries):
            request = entry.seq.request
            if request.needs_prompt_logprobs:
                start = entry.seq.num_computed_tokens
                count = min(entry.num_tokens, request.num_prompt_tokens - 1 - start)
                if count > 0:
                    rows[index] = count
        return rows

    def _pooled_rows(self, plan: SchedulerOutput) -> dict[int, tuple[int, int]]:
        """Each pooling entry's rows whose hidden states the pooler needs: (first, count)."""
        rows = {}
        for index, entry in enumerate(plan.entries):
            request = entry.seq.request
            if request.is_pooling:
                rows[index] = self.pooler.rows_of(entry.seq.num_computed_tokens, entry.num_tokens,
                                                  request.num_prompt_tokens)
        return rows

    def _postprocess(self, plan: SchedulerOutput, result: RunnerOutput) -> None:
        for index, hidden in result.pooled_hidden.items():  # before the chunk counts as computed
            seq = plan.entries[index].seq
            self.pooler.accumulate(seq.request, seq.num_computed_tokens, hidden)
        self._record_computed(plan, result)
        self._finish_pooled(plan)
        seqs, rows, beam_requests = self._route_logit_rows(result)
        self._step_ready_beam_searches(beam_requests)
        if seqs:
            needs_logprob = [s.request.holds_outputs_until_done for s in seqs]
            sampled = self.sampler.sample(result.sample_logits[rows], seqs, needs_logprob)
            self._append_and_check_stops(seqs, sampled)
            self._emit_news(seqs)

    def _record_computed(self, plan: SchedulerOutput, result: RunnerOutput) -> None:
        """The planned tokens are computed: prompt logprobs, the prompt-token counts, and the
        blocks they filled registered in the prefix cache."""
        for index, entry in enumerate(plan.entries):
            if index in result.prompt_logits:
                self._record_prompt_logprobs(entry.seq, result.prompt_logits[index])
            request = entry.seq.request
            if entry.seq.num_computed_tokens < request.num_prompt_tokens:
                self.num_prompt_tokens_computed += entry.num_tokens
            entry.seq.num_computed_tokens += entry.num_tokens
            if not request.is_prompt_counted and entry.seq.num_computed_tokens >= request.num_prompt_tokens:
                request.is_prompt_counted = True  # once, however often a preempted prompt is recomputed
                self.num_prompt_tokens += request.num_prompt_tokens
            self.kv.cache_full_blocks(entry.seq)

    def _finish_pooled(self, plan: SchedulerOutput) -> None:
        """A pooling request whose prompt is computed is done: no token is sampled."""
        for entry in plan.entries:
            seq = entry.seq
            if seq.request.is_pooling and not seq.is_finished and seq.num_uncomputed_tokens == 0:
                self._finish(seq, FinishCause.POOLED)

    def _route_logit_rows(self, result: RunnerOutput) -> tuple[list[Sequence], list[int], list[Request]]:
        """Where each sampled position's logits go: the sequences to sample and their rows (a
        prompt that is done forks into its candidates, which share its row), and the beam
        searches that recorded a beam's row. Prompt scoring (max_tokens 0) ends here."""
        seqs: list[Sequence] = []
        rows: list[int] = []
        beam_requests: dict[str, Request] = {}
        for row, entry in enumerate(result.sample_entries):
            seq, request = entry.seq, entry.seq.request
            if seq.is_finished:  # its beam search ended this step (a sibling was unfittable)
                continue
            if request.params.max_tokens == 0:  # prompt scoring only (echo + logprobs)
                self._finish(seq, FinishCause.LENGTH)
                continue
            if request.beams is not None:
                request.beams.record(seq.index, result.sample_logits[row])
                beam_requests[request.request_id] = request
                continue
            family = [seq] if request.has_all_candidates else self._fork(seq)
            seqs += family
            rows += [row] * len(family)
        return seqs, rows, list(beam_requests.values())

    def _append_and_check_stops(self, seqs: list[Sequence], sampled: list[SampledToken]) -> None:
        for seq, token in zip(seqs, sampled):
            seq.token_ids.append(token.token_id)
            if token.logprob is not None:
                seq.cumulative_logprob += token.logprob
            if token.logprobs is not None:
                seq.pending_logprobs.append(token.logprobs)
            self._check_stop(seq, token.token_id)
            if seq.grammar is not None and not seq.is_finished:
                self._advance_grammar(seq, token.token_id)

    def _emit_news(self, seqs: list[Sequence]) -> None:
        """Each live sequence's new tokens (finished ones were emitted by `_finish`)."""
        for seq in seqs:
            if not seq.is_finished and not seq.request.holds_outputs_until_done:
                self._emit(seq)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The prompt is done: the single prefill sequence becomes the request's candidates."""
        request = parent.request
        request.is_forked = True
        for index in range(1, request.params.num_candidates):
            child = parent.fork(index)
            self.kv.fork(parent, child)
            request.sequences.append(child)
            self.scheduler.add_running(child)
        return list(request.sequences)

    def _record_prompt_logprobs(self, seq: Sequence, logits: np.ndarray) -> None:
        request = seq.request
        start = seq.num_computed_tokens
        logprobs = log_softmax(logits)
        for offset in range(logits.shape[0]):
            position = start + offset + 1  # the prompt token these logits predict
            if position == len(request.prompt_logprobs):
                token = request.prompt_token_ids[position]
                request.prompt_logprobs.append(
                    token_logprobs(logprobs[offset], token, request.params.prompt_logprobs or 0)
                )

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if token in seq.request.stopping_eos_token_ids:
                self._finish(seq, FinishCause.EOS)
                return
            if token in p.stop_token_ids:
                self._finish(seq, FinishCause.STOP_TOKEN, stop_reason=token)
                return
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishCause.LENGTH)

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """A complete grammar ends the sequence (only EOS could follow); so would a token the
        grammar rejects, which the mask rules out."""
        if not seq.grammar.accept(token):
            self._finish(seq, FinishCause.ERROR, error=f"the grammar rejected token {token}: {seq.grammar.error}")
        elif seq.grammar.is_terminated:
            self._finish(seq, FinishCause.GRAMMAR_END)

    # ------------------------------------------------------------------ beam search

    def _step_ready_beam_searches(self, requests: list[Request]) -> None:
        """A search steps once every live beam has its logits (they may come in several steps)."""
        for request in requests:
            if request.beams.is_ready(request.sequences):
                self._step_beams(request)

    def _step_beams(self, request: Request) -> None:
        step = request.beams.step(request.sequences)
        if request.beams.search.is_done:
            self._end_beam_search(request)
        else:
            self._reassign_beams(request, step)

    def _reassign_beams(self, request: Request, step: BeamStep) -> None:
        """The next beams: a parent's first child continues in the parent's sequence, the
        others fork it (sharing its blocks), and parents without children are freed."""
        parents = request.sequences
        children: list[Sequence] = []
        continued: set[int] = set()
        for candidate in step.next_beams:
            parent = parents[candidate.parent]
            if candidate.parent in continued:
                child = parent.fork(request.beams.new_beam_index())
                child.pending_logprobs = list(parent.pending_logprobs)
                self.kv.fork(parent, child)
                self.scheduler.add_running(child)
            else:
                continued.add(candidate.parent)
                child = parent
            children.append(child)
        for row, parent in enumerate(parents):
            if row not in continued:
                self.scheduler.remove(parent)
        for child, candidate in zip(children, step.next_beams):
            child.token_ids.append(candidate.token_id)
            child.cumulative_logprob = candidate.cumulative_logprob
            if candidate.logprobs is not None:
                child.pending_logprobs.append(candidate.logprobs)
        request.sequences = children

    def _end_beam_search(self, request: Request, cause: FinishCause | None = None, error: str | None = None) -> None:
        """Free the live beams and report: the n best hypotheses, or `cause` on every choice."""
        if request.request_id not in self.requests:
            return  # already ended (two of its beams can be found unfittable in one step)
        for seq in request.sequences:
            if not seq.is_finished:
                self.scheduler.remove(seq)
        request.beams.forget_logprobs()
        self.requests.pop(request.request_id, None)
        search = request.beams.search
        hypotheses = search.best(request.params.n) if cause is None else []
        for index in range(request.params.n):
            output = EngineCoreOutput(request.request_id, index, [],
                                      num_generated_tokens=search.num_generated_tokens,
                                      num_cached_tokens=self._num_cached_tokens(request))
            if index < len(hypotheses):
                h = hypotheses[index]
                output.new_token_ids = h.token_ids
                output.new_logprobs = h.logprobs
                output.cumulative_logprob = h.cumulative_logprob
                if h.stop_token_id is None:
                    _set_finish(output, FinishCause.LENGTH)
                elif h.stop_token_id in request.stopping_eos_token_ids:
                    _set_finish(output, FinishCause.EOS)
                else:
                    _set_finish(output, FinishCause.STOP_TOKEN, stop_reason=h.stop_token_id)
            elif cause is not None:
                _set_finish(output, cause, error=error)
            self._push(request, output)

    # ------------------------------------------------------------------ outputs

    def _finish(self, seq: Sequence, cause: FinishCause, *, stop_reason: int | None = None,
                error: str | None = None) -> None:
        if seq.request.beams is not None:
            self._end_beam_search(seq.request, cause, error)
            return
        self.scheduler.remove(seq)
        seq.finish_cause = cause
        seq.stop_reason = stop_reason
        request = seq.request
        if not request.has_all_candidates:
            self._end_unforked(request, cause, error)  # ended before its candidates existed
        elif request.holds_outputs_until_done:
            if request.is_finished:
                self._emit_best(request)
        else:
            self._emit(seq, error=error)
        if all(s.is_finished for s in request.sequences):
            self.requests.pop(request.request_id, None)

    def _end_unforked(self, request: Request, cause: FinishCause, error: str | None) -> None:
        """Every one of the n choices the frontend waits for ends, with no tokens."""
        for index in range(request.params.n):
            output = EngineCoreOutput(request.request_id, index, [], num_generated_tokens=0,
                                      num_cached_tokens=self._num_cached_tokens(request))
            _set_finish(output, cause, error=error)
            self._push(request, output)

    def _push(self, request: Request, output: EngineCoreOutput) -> None:
        """Queue an output; the request's first one carries its prompt logprobs and, if it ran,
        its queue time (a chunked prompt has no output before its last chunk)."""
        if not request.has_sent_output:
            request.has_sent_output = True
            if request.params.prompt_logprobs is not None:
                output.prompt_logprobs = request.prompt_logprobs
            output.queue_time_s = request.queue_time_s
        self.pending_outputs.append(output)

    def _emit(self, seq: Sequence, *, error: str | None = None) -> None:
        request = seq.request
        new_tokens = seq.output_token_ids[seq.num_sent_tokens :]
        if not new_tokens and seq.finish_cause is None:
            return
        output = EngineCoreOutput(
            request.request_id,
            seq.index,
            new_tokens,
            new_logprobs=seq.pending_logprobs if request.params.logprobs is not None else None,
        )
        if seq.finish_cause is not None:
            _set_finish(output, seq.finish_cause, stop_reason=seq.stop_reason, error=error)
            output.cumulative_logprob = seq.cumulative_logprob
            output.num_generated_tokens = request.num_generated_tokens
        if seq.finish_cause is FinishCause.POOLED:
            output.pooled = self.pooler.result(request).astype("<f4").tobytes()
        if seq.finish_cause is not None or seq.num_sent_tokens == 0:
            # known once the request has started: the frontend need not wait for the end (a
            # choice it stops on a stop string never sees its final output)
            output.num_cached_tokens = self._num_cached_tokens(request)
        seq.num_sent_tokens = seq.num_output_tokens
        seq.pending_logprobs = []
        self._push(request, output)

    def _num_cached_tokens(self, request: Request) -> int | None:
        return request.num_cached_tokens if self.kv.enable_prefix_caching else None

    def _emit_best(self, request: Request) -> None:
        """best_of > n: the n candidates with the highest cumulative logprob, renumbered."""
        ranked = sorted(request.sequences, key=lambda s: -s.cumulative_logprob)[: request.params.n]
        for index, seq in enumerate(ranked):
            seq.index = index
            self._emit(seq)


def _set_finish(output: EngineCoreOutput, cause: FinishCause, *, stop_reason: int | None = None,
                error: str | None = None) -> None:
    """A final output says why, twice: OpenAI's coarse reason and the engine's exact cause."""
    output.finish_cause = cause
    output.finish_reason = cause.finish_reason
    output.stop_reason = stop_reason
    output.error = error


def _rss_bytes() -> int:
    """This process's resident memory (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
