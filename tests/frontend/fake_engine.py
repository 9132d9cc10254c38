"""A stand-in for `frontend.engine_client.EngineClient` with no model and no sockets.

Each sequence plays a token script (by default a fixed text, rotated by seed and sequence
index, so equal seeds give equal outputs), one token per step, the sequences of a request's
prompts interleaved step by step in one stream as the engine and the client deliver them. It
finishes sequences the way the engine does (max_tokens -> LENGTH, an EOS or stop token id ->
STOP; each choice's first and final outputs carry `num_cached_tokens` when set, as the engine's
do with prefix caching), ends a stream once each sequence has finished or was aborted by the
consumer, as the client does, and records every request and abort. Knobs script the failures:
hang after k steps (until cancelled or released), die after k steps, finish with ERROR, abort unasked.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator, Callable

from frontend.engine_client import EngineDeadError
from ipc.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineReady,
    FinishCause,
    SchedulerStats,
    TokenLogprobs,
)

Script = Callable[[EngineCoreRequest, int], list[int]]


class FakeEngineClient:
    def __init__(self, model_info: EngineReady, *, script: Script, ready: bool = True) -> None:
        self._model_info = model_info
        self.script = script
        self.model_info: EngineReady | None = model_info if ready else None
        self.latest_stats: SchedulerStats | None = None
        self.engine_stats: list[SchedulerStats | None] | None = None  # per engine; None: [latest_stats]
        self.dead_reason: str | None = None
        self.requests: list[EngineCoreRequest] = []
        self.abort_calls: list[tuple[list[str], list[int] | None]] = []
        self.closed_unfinished: list[str] = []  # request ids whose generate() was closed early
        self.hang_after_steps: int | None = None
        self.die_after_steps: int | None = None
        self.error_message: str | None = None  # finish every sequence with ERROR at once
        self.unrequested_abort = False  # the engine aborts sequences on its own
        self.num_generated_tokens: int | None = None  # reported on final outputs
        self.num_cached_tokens: int | None = None  # reported on each choice's first and final outputs
        self.num_generation_tokens = 0  # every token yielded, as the real client counts them
        self.num_tokens_after_disconnect = 0
        self.client_gone_ids: list[str] = []
        self._live: dict[str, set[int]] = {}  # request id -> sequences its stream still delivers
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
            live = self._live.get(request_id, set())
            if indices is None:
                live.clear()
            else:
                live.discard(indices[k])
        self._event("aborted").set()

    def mark_client_gone(self, request_ids: list[str]) -> None:
        self.client_gone_ids.extend(request_ids)

    async def generate(self, requests: list[EngineCoreRequest]) -> AsyncIterator[EngineCoreOutput]:
        if self.is_dead:
            raise EngineDeadError(self.dead_reason)
        self.requests.extend(requests)
        self._event("started").set()
        for request in requests:
            self._live[request.request_id] = set(range(request.sampling_params.n))
        scripts = {r.request_id: [self.script(r, j) for j in range(r.sampling_params.n)] for r in requests}
        finals: dict[str, set[int]] = {r.request_id: set() for r in requests}  # sent by the "engine"
        queue: asyncio.Queue[EngineCoreOutput | Exception] = asyncio.Queue()
        # The engine runs ahead of the consumer, as the real one does behind its socket.
        engine = asyncio.create_task(self._run(requests, scripts, finals, queue))
        try:
            while any(self._live[r.request_id] for r in requests):
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                live = self._live[item.request_id]
                if item.index not in live:
                    continue  # a late output of a sequence the consumer aborted
                if item.finish_reason is not None:
                    live.discard(item.index)
                yield item
        finally:
            engine.cancel()
            for request in requests:
                del self._live[request.request_id]
                if len(finals[request.request_id]) < request.sampling_params.n:
                    self.closed_unfinished.append(request.request_id)
                    self._event("aborted").set()

    async def _run(self, requests: list[EngineCoreRequest], scripts: dict[str, list[list[int]]],
                   finals: dict[str, set[int]], queue: asyncio.Queue) -> None:
        """Steps until every sequence has its final output or was aborted by the consumer."""
        def is_running(request_id: str, index: int) -> bool:
            return index not in finals[request_id] and index in self._live.get(request_id, ())

        step = 0
        while any(is_running(r.request_id, j) for r in requests for j in range(r.sampling_params.n)):
            if self.hang_after_steps is not None and step >= self.hang_after_steps:
                self._event("hanging").set()
                await self._event("released").wait()  # until cancelled or released
                self.hang_after_steps = None
            if self.die_after_steps is not None and step >= self.die_after_steps:
                self.dead_reason = "scripted death"
                queue.put_nowait(EngineDeadError(self.dead_reason))
                return
            await asyncio.sleep(0)  # a scheduling point, as between engine steps
            for request in requests:
                for j in range(request.sampling_params.n):
                    if not is_running(request.request_id, j):
                        continue
                    output = self._output(request, j, step, scripts[request.request_id][j])
                    if output.finish_reason is not None:
                        finals[request.request_id].add(j)
                    if output.finish_reason is not None or step == 0:
                        output.num_cached_tokens = self.num_cached_tokens
                    self.num_generation_tokens += len(output.new_token_ids)
                    queue.put_nowait(output)
            step += 1

    # -- helpers for tests -----------------------------------------------------------------

    def release(self) -> None:
        """Ends a hang: the engine steps on."""
        self._event("released").set()

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
            return finished(EngineCoreOutput(request_id, index, [], error=self.error_message), FinishCause.ERROR)
        if self.unrequested_abort and step > 0:
            return finished(EngineCoreOutput(request_id, index, []), FinishCause.ABORT)
        if request.pooling is not None:  # pooled at once, as the engine does at the prompt's end
            vector = fake_vector(request.prompt_token_ids, self._model_info.hidden_size)
            return finished(EngineCoreOutput(request_id, index, [], pooled=vector), FinishCause.POOLED)
        token_id = script[step % len(script)]
        output = EngineCoreOutput(request_id, index, [token_id])
        # as the engine: an EOS id (unless ignore_eos) before a stop token id, neither below min_tokens
        may_stop = step + 1 >= params.min_tokens
        if may_stop and not params.ignore_eos and token_id in request.eos_token_ids:
            finished(output, FinishCause.EOS)
        elif may_stop and token_id in params.stop_token_ids:
            finished(output, FinishCause.STOP_TOKEN, stop_reason=token_id)
        elif step + 1 >= params.max_tokens:
            finished(output, FinishCause.LENGTH)
        if params.logprobs is not None:
            output.new_logprobs = [fake_logprobs(token_id, step, params.logprobs)]
        if step == 0 and index == 0 and params.prompt_logprobs is not None:
            output.prompt_logprobs = [None] + [
                fake_logprobs(t, k, params.prompt_logprobs) for k, t in enumerate(request.prompt_token_ids[1:])
            ]
        if output.finish_reason is not None and self.num_generated_tokens is not None:
            output.num_generated_tokens = self.num_generated_tokens
        return output


def finished(output: EngineCoreOutput, cause: FinishCause, *, stop_reason: int | None = None) -> EngineCoreOutput:
    output.finish_cause, output.finish_reason, output.stop_reason = cause, cause.finish_reason, stop_reason
    return output


def fake_vector(prompt_token_ids: list[int], hidden_size: int) -> bytes:
    """A deterministic unit vector of the prompt (float32 little-endian), as a pooled output."""
    seed = sum((k + 1) * t for k, t in enumerate(prompt_token_ids))
    values = [math.sin(seed + 1.7 * k) for k in range(hidden_size)]
    norm = math.sqrt(sum(v * v for v in values))
    return struct.pack(f"<{hidden_size}f", *(v / norm for v in values))


def fake_logprobs(token_id: int, position: int, num_top: int) -> TokenLogprobs:
    """A deterministic entry: the chosen token ranks first, then byte tokens 3, 4, ..."""
    logprob = -0.25 - position / 100
    top_ids = ([token_id] + [3 + k for k in range(num_top)])[:num_top]
    return TokenLogprobs(token_id, logprob, 1, top_ids, [logprob - k for k in range(num_top)])
