"""A stand-in for `frontend.engine_client.EngineClient` with no model and no sockets.

Each sequence plays a token script (by default a fixed text, rotated by seed and sequence
index, so equal seeds give equal outputs), one token per step, the sequences of a request
interleaved step by step as the engine does. It finishes sequences the way the engine does
(max_tokens -> LENGTH, an EOS or stop token id -> STOP, an abort -> ABORT; each final output
carries `num_cached_tokens` when set, as the engine's do with prefix caching) and records every
request and abort. Knobs script the failures: hang after k steps (until cancelled), die after
k steps, finish with ERROR.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from frontend.engine_client import EngineDeadError
from ipc.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineReady,
    FinishReason,
    SchedulerStats,
    TokenLogprobs,
)

ALL = -1  # an abort of every sequence of a request
Script = Callable[[EngineCoreRequest, int], list[int]]


class FakeEngineClient:
    def __init__(self, model_info: EngineReady, *, script: Script, ready: bool = True) -> None:
        self._model_info = model_info
        self.script = script
        self.model_info: EngineReady | None = model_info if ready else None
        self.latest_stats: SchedulerStats | None = None
        self.dead_reason: str | None = None
        self.requests: list[EngineCoreRequest] = []
        self.abort_calls: list[tuple[list[str], list[int] | None]] = []
        self.closed_unfinished: list[str] = []  # request ids whose generate() was closed early
        self.hang_after_steps: int | None = None
        self.die_after_steps: int | None = None
        self.error_message: str | None = None  # finish every sequence with ERROR at once
        self.unrequested_abort = False  # the engine aborts sequences on its own
        self.num_generated_tokens: int | None = None  # reported on final outputs
        self.num_cached_tokens: int | None = None  # reported on every final output, ABORT too
        self.reports_cached_tokens_first = False  # num_cached_tokens on each sequence's first output too
        self.num_generation_tokens = 0  # every token yielded, as the real client counts them
        self.num_tokens_after_disconnect = 0
        self.client_gone_ids: list[str] = []
        self._aborted: dict[str, set[int]] = {}
        self._events: dict[str, asyncio.Event] = {}

    # -- the EngineClient API --------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self.model_info is not None and not self.is_dead

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None

    async def start(self) -> None:
        pass

    async def wait_ready(self) -> EngineReady:
        assert self.model_info is not None
        return self.model_info

    async def shutdown(self) -> None:
        pass

    async def abort(self, request_ids: list[str], indices: list[int] | None = None) -> None:
        self.abort_calls.append((list(request_ids), None if indices is None else list(indices)))
        for k, request_id in enumerate(request_ids):
            self._aborted.setdefault(request_id, set()).add(ALL if indices is None else indices[k])
        self._event("aborted").set()

    def mark_client_gone(self, request_ids: list[str]) -> None:
        self.client_gone_ids.extend(request_ids)

    async def generate(self, request: EngineCoreRequest) -> AsyncIterator[EngineCoreOutput]:
        if self.is_dead:
            raise EngineDeadError(self.dead_reason)
        self.requests.append(request)
        self._event("started").set()
        params = request.sampling_params
        scripts = [self.script(request, j) for j in range(params.n)]
        finished: set[int] = set()
        step = 0
        try:
            while len(finished) < params.n:
                if self.hang_after_steps is not None and step >= self.hang_after_steps:
                    self._event("hanging").set()
                    await asyncio.Event().wait()  # until cancelled
                if self.die_after_steps is not None and step >= self.die_after_steps:
                    self.dead_reason = "scripted death"
                    raise EngineDeadError(self.dead_reason)
                await asyncio.sleep(0)  # a scheduling point, as between engine steps
                for j in range(params.n):
                    if j in finished:
                        continue
                    output = self._output(request, j, step, scripts[j])
                    if output.finish_reason is not None:
                        finished.add(j)
                    if output.finish_reason is not None or (step == 0 and self.reports_cached_tokens_first):
                        output.num_cached_tokens = self.num_cached_tokens
                    self.num_generation_tokens += len(output.new_token_ids)
                    yield output
                step += 1
        finally:
            if len(finished) < params.n:
                self.closed_unfinished.append(request.request_id)
                self._event("aborted").set()

    # -- helpers for tests -----------------------------------------------------------------

    def set_ready(self) -> None:
        self.model_info = self._model_info

    async def wait_for(self, name: str) -> None:
        """Await "started", "hanging" or "aborted"."""
        await self._event(name).wait()

    def _event(self, name: str) -> asyncio.Event:
        return self._events.setdefault(name, asyncio.Event())

    def _output(self, request: EngineCoreRequest, index: int, step: int, script: list[int]) -> EngineCoreOutput:
        params = request.sampling_params
        request_id = request.request_id
        if self.error_message is not None:
            return EngineCoreOutput(request_id, index, [], finish_reason=FinishReason.ERROR, error=self.error_message)
        aborted = self._aborted.get(request_id, set())
        if index in aborted or ALL in aborted or (self.unrequested_abort and step > 0):
            return EngineCoreOutput(request_id, index, [], finish_reason=FinishReason.ABORT)
        token_id = script[step % len(script)]
        output = EngineCoreOutput(request_id, index, [token_id])
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(request.eos_token_ids))
        if token_id in stop_ids and step + 1 >= params.min_tokens:
            output.finish_reason, output.stop_reason = FinishReason.STOP, token_id
        elif step + 1 >= params.max_tokens:
            output.finish_reason = FinishReason.LENGTH
        if params.logprobs is not None:
            output.new_logprobs = [fake_logprobs(token_id, step, params.logprobs)]
        if step == 0 and index == 0 and params.prompt_logprobs is not None:
            output.prompt_logprobs = [None] + [
                fake_logprobs(t, k, params.prompt_logprobs) for k, t in enumerate(request.prompt_token_ids[1:])
            ]
        if output.finish_reason is not None and self.num_generated_tokens is not None:
            output.num_generated_tokens = self.num_generated_tokens
        return output


def fake_logprobs(token_id: int, position: int, num_top: int) -> TokenLogprobs:
    """A deterministic entry: the chosen token ranks first, then byte tokens 3, 4, ..."""
    logprob = -0.25 - position / 100
    top_ids = ([token_id] + [3 + k for k in range(num_top)])[:num_top]
    return TokenLogprobs(token_id, logprob, 1, top_ids, [logprob - k for k in range(num_top)])
