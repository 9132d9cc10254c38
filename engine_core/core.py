"""EngineCore: the engine's logic (add, abort, step) with no sockets, threads or signals.

A step is three calls: the scheduler picks tokens, the model runner computes logits, and
`_postprocess` samples, checks stop conditions and produces per-sequence output deltas.

Beam search requests take another path after their prompt: their live beams' logprobs are
collected until every beam has them, then `BeamSearch.step` picks the next beams, and the
engine forks, keeps or frees the beams' sequences (forks share KV blocks by reference count
and copy a partly filled block on write). Their hypotheses are reported once, at the end.
"""

from __future__ import annotations

import time

import logging

import numpy as np

from engine_core.beam_search import BeamSearch, BeamStep
from engine_core.kv_cache_manager import KVCacheManager
from engine_core.loader import ModelConfig, load_artifact
from engine_core.model import KVCache, resolve_kv_cache_dtype
from engine_core.model_runner import ModelRunner, RunnerOutput
from engine_core.request import Request, Sequence
from engine_core.sampler import Sampler, add_logit_bias, log_softmax, token_logprobs
from engine_core.structured_output import StructuredOutputManager
from engine_core.scheduler import Scheduler, SchedulerOutput
from ipc.config import ServeConfig
from ipc.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineReady,
    FinishReason,
    SchedulerStats,
)
from ipc.shared.structured_output import StructuredOutputError
from ipc.shared.vocabulary import read_vocabulary


logger = logging.getLogger("furiosa_llm.engine")


class EngineCore:
    def __init__(self, config: ServeConfig, model_config: ModelConfig, weights: dict[str, np.ndarray]):
        self.config = config
        self.model_config = model_config
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
            kv_cache_dtype=self.kv_cache_dtype,
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
    def from_config(cls, config: ServeConfig) -> "EngineCore":
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
        request = Request(message)
        # ids outside the vocabulary can never be sampled; keep them out of the logit masks
        request.eos_token_ids = frozenset(i for i in request.eos_token_ids if 0 <= i < self.model_config.vocab_size)
        error = self._check_request(request) or self._attach_grammar(request)
        if error is not None:
            self.pending_outputs.append(
                EngineCoreOutput(request.request_id, 0, [], finish_reason=FinishReason.ERROR, error=error)
            )
            return
        if request.params.use_beam_search:
            max_new_tokens = min(request.params.max_tokens, self.max_model_len - request.num_prompt_tokens)
            request.beam_search = BeamSearch.from_params(request.params, request.eos_token_ids, max(1, max_new_tokens))
        self.requests[request.request_id] = request
        self.scheduler.add(request.sequences[0])

    def _check_request(self, request: Request) -> str | None:
        num_prompt = request.num_prompt_tokens
        if request.request_id in self.requests:
            return f"request id {request.request_id!r} is already in use"
        if num_prompt == 0:
            return "the prompt is empty"
        if num_prompt >= self.max_model_len:
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
            if request.beam_search is not None:  # its beams are not the n choices: end them all
                self._end_beam_search(request, FinishReason.ABORT)
                continue
            only = None if indices is None or indices[k] < 0 else indices[k]
            for seq in list(request.sequences):
                if not seq.is_finished and (only is None or seq.index == only or not request.is_forked):
                    self._finish(seq, FinishReason.ABORT)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[EngineCoreOutput]:
        plan = self.scheduler.schedule()
        for seq in plan.unfittable:
            self._finish(seq, FinishReason.ERROR,
                         error=f"the sequence needs more KV cache than the engine has ({self.capacity_tokens} tokens)")
        if plan.unfittable:  # finishing one can end its siblings (a beam search) too
            plan.entries = [e for e in plan.entries if not e.seq.is_finished]
        if plan.entries:
            prompt_rows = self._prompt_logit_rows(plan)
            result = self.runner.execute(plan, prompt_rows)
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

    def _postprocess(self, plan: SchedulerOutput, result: RunnerOutput) -> None:
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
        seqs: list[Sequence] = []
        rows: list[int] = []
        beam_requests: dict[str, Request] = {}
        for row, entry in enumerate(result.sample_entries):
            request = entry.seq.request
            if entry.seq.is_finished:  # its beam search ended this step (a sibling was unfittable)
                continue
            if request.params.max_tokens == 0:  # prompt scoring only (echo + logprobs)
                self._finish(entry.seq, FinishReason.LENGTH)
                continue
            if request.beam_search is not None:
                request.beam_logprobs[entry.seq.index] = log_softmax(_biased(result.sample_logits[row], request.params))
                beam_requests[request.request_id] = request
                continue
            family = self._fork(entry.seq) if not request.is_forked_or_single else [entry.seq]
            seqs += family
            rows += [row] * len(family)
        for request in beam_requests.values():
            if all(s.index in request.beam_logprobs for s in request.sequences):
                self._step_beams(request)
        if not seqs:
            return
        needs_logprob = [s.request.holds_outputs_until_done for s in seqs]
        sampled = self.sampler.sample(result.sample_logits[rows], seqs, needs_logprob)
        for seq, token in zip(seqs, sampled):
            seq.token_ids.append(token.token_id)
            if token.logprob is not None:
                seq.cumulative_logprob += token.logprob
            if token.logprobs is not None:
                seq.pending_logprobs.append(token.logprobs)
            self._check_stop(seq, token.token_id)
            if seq.grammar is not None and not seq.is_finished:
                self._advance_grammar(seq, token.token_id)
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

    # ------------------------------------------------------------------ beam search

    def _step_beams(self, request: Request) -> None:
        beams = request.sequences
        rows = np.stack([request.beam_logprobs.pop(s.index) for s in beams])
        step = request.beam_search.step(rows, [s.cumulative_logprob for s in beams],
                                        [s.output_token_ids for s in beams])
        num_top = request.params.logprobs
        if num_top is not None:
            for hypothesis in step.new_hypotheses:
                parent = beams[hypothesis.parent]
                hypothesis.logprobs = parent.pending_logprobs + [
                    token_logprobs(rows[hypothesis.parent], hypothesis.token_ids[-1], num_top)]
        if request.beam_search.is_done:
            self._end_beam_search(request)
        else:
            self._reassign_beams(request, step, rows)

    def _reassign_beams(self, request: Request, step: BeamStep, rows: np.ndarray) -> None:
        """The next beams: a parent's first child continues in the parent's sequence, the
        others fork it (sharing its blocks), and parents without children are freed."""
        parents = request.sequences
        children: list[Sequence] = []
        continued: set[int] = set()
        for candidate in step.next_beams:
            parent = parents[candidate.parent]
            if candidate.parent in continued:
                child = parent.fork(request.next_sequence_index())
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
        num_top = request.params.logprobs
        for child, candidate in zip(children, step.next_beams):
            child.token_ids.append(candidate.token_id)
            child.cumulative_logprob = candidate.cumulative_logprob
            if num_top is not None:
                child.pending_logprobs.append(token_logprobs(rows[candidate.parent], candidate.token_id, num_top))
        request.sequences = children

    def _end_beam_search(self, request: Request, reason: FinishReason | None = None, error: str | None = None) -> None:
        """Free the live beams and report: the n best hypotheses, or `reason` on every choice."""
        if request.request_id not in self.requests:
            return  # already ended (two of its beams can be found unfittable in one step)
        for seq in request.sequences:
            if not seq.is_finished:
                self.scheduler.remove(seq)
        request.beam_logprobs.clear()
        self.requests.pop(request.request_id, None)
        search = request.beam_search
        hypotheses = search.best(request.params.n) if reason is None else []
        for index in range(request.params.n):
            output = EngineCoreOutput(request.request_id, index, [], finish_reason=reason, error=error,
                                      num_generated_tokens=search.num_generated_tokens,
                                      num_cached_tokens=self._num_cached_tokens(request))
            if index < len(hypotheses):
                h = hypotheses[index]
                output.new_token_ids = h.token_ids
                output.new_logprobs = h.logprobs
                output.cumulative_logprob = h.cumulative_logprob
                output.finish_reason = FinishReason.LENGTH if h.stop_token_id is None else FinishReason.STOP
                is_eos = h.stop_token_id in request.eos_token_ids and not request.params.ignore_eos
                if h.stop_token_id is not None and not is_eos:
                    output.stop_reason = h.stop_token_id
            self._push(request, output)

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
            if not p.ignore_eos and token in seq.request.eos_token_ids:
                self._finish(seq, FinishReason.STOP)
                return
            if token in p.stop_token_ids:
                self._finish(seq, FinishReason.STOP, stop_reason=token)
                return
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH)

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """A complete grammar ends the sequence (only EOS could follow); so would a token the
        grammar rejects, which the mask rules out."""
        if not seq.grammar.accept(token):
            self._finish(seq, FinishReason.ERROR, error=f"the grammar rejected token {token}: {seq.grammar.error}")
        elif seq.grammar.is_terminated:
            self._finish(seq, FinishReason.STOP)

    # ------------------------------------------------------------------ outputs

    def _finish(self, seq: Sequence, reason: FinishReason, *, stop_reason: int | None = None,
                error: str | None = None) -> None:
        if seq.request.beam_search is not None:
            self._end_beam_search(seq.request, reason, error)
            return
        self.scheduler.remove(seq)
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        request = seq.request
        if not request.is_forked_or_single:
            self._end_unforked(request, reason, error)  # ended before its candidates existed
        elif request.holds_outputs_until_done:
            if request.is_finished:
                self._emit_best(request)
        else:
            self._emit(seq, error=error)
        if all(s.is_finished for s in request.sequences):
            self.requests.pop(request.request_id, None)

    def _end_unforked(self, request: Request, reason: FinishReason, error: str | None) -> None:
        """Every one of the n choices the frontend waits for ends, with no tokens."""
        for index in range(request.params.n):
            output = EngineCoreOutput(request.request_id, index, [], finish_reason=reason,
                                      error=error, num_generated_tokens=0,
                                      num_cached_tokens=self._num_cached_tokens(request))
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
        if not new_tokens and seq.finish_reason is None:
            return
        output = EngineCoreOutput(
            request.request_id,
            seq.index,
            new_tokens,
            new_logprobs=seq.pending_logprobs if request.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            error=error,
        )
        if seq.finish_reason is not None:
            output.cumulative_logprob = seq.cumulative_logprob
            output.num_generated_tokens = request.num_generated_tokens
        if seq.finish_reason is not None or seq.num_sent_tokens == 0:
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


def _biased(logits: np.ndarray, params) -> np.ndarray:
    """A beam's logits with the request's logit_bias added (beams rank by the biased scores)."""
    if not params.logit_bias:
        return logits
    row = logits.copy()
    add_logit_bias(row, params.logit_bias)
    return row


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
