"""What the two generation endpoints share: the engine loop, per-choice assembly, SSE framing.

A request flows through three stages:

1. validation (`serving_validation`): an OpenAI request becomes `EngineCoreRequest`s whose
   `SamplingParams` the engine can trust;
2. `OpenAIServing.generate_choices`: the one loop over engine outputs. Each sequence's tokens
   are detokenized incrementally and scanned for stop strings; a sequence that hits one is
   finished here and aborted in the engine. It yields `ChoiceDelta`s, the new text of one
   choice;
3. formatting (`serving_completions`, `serving_chat`): deltas become stream chunks, or are
   accumulated into one response. Both read the same deltas, so a stream concatenates to
   exactly the non-streamed response.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import msgspec
from transformers import PreTrainedTokenizerFast

from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from frontend.engine_client import EngineDeadError, ServerStoppingError
from frontend.errors import (
    OpenAIError,
    bad_request,
    engine_unavailable,
    error_event,
    internal_error,
    model_not_found,
)
from frontend.protocol import PromptTokensDetails, SamplingRequestFields, UsageInfo
from frontend.serving_logprobs import TokenStrings
from frontend.serving_validation import TextSettings
from frontend.tokenizer import PromptTooLongError, encode_prompt
from ipc.config import ServeConfig
from ipc.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineReady,
    FinishReason,
    SamplingParams,
    TokenLogprobs,
)

logger = logging.getLogger(__name__)


@dataclass
class ChoiceDelta:
    """What is new in one choice: text, the tokens behind it, and whether it has ended."""

    index: int  # the choice index in the response
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    is_first: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first delta, if asked


@dataclass
class PreparedPrompt:
    """One engine request: a prompt and the choice indices its sequences fill."""

    request: EngineCoreRequest
    prompt_text: str
    first_choice_index: int  # sequence j of this prompt is choice first_choice_index + j


@dataclass
class RequestTiming:
    """When a request arrived, produced its first token and finished (wall-clock seconds), and
    how each of its choices ended: what the metrics observe once per request."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # engine-measured, one per engine request: from its arrival in the engine to its first step
    queue_times_s: list[float] = field(default_factory=list)
    # per choice, between consecutive outputs that carried tokens
    inter_token_latencies_s: list[float] = field(default_factory=list)
    # per choice: "stop", "length", "abort" (the client went away) or "error"
    finish_reasons: list[str] = field(default_factory=list)


class UsageCounter:
    """Token counts of a response. With best_of or beam search the engine reports all
    candidates' tokens on its final outputs, which is what was really generated.

    With prefix caching the engine reports each request's cached prompt tokens on its final
    outputs, including the ABORT that answers our abort of a sequence a stop string ended; if
    `expects_cached_tokens`, `is_complete` stays false until every request has reported them."""

    def __init__(self, prompts: Sequence[PreparedPrompt], *, expects_cached_tokens: bool) -> None:
        self.num_prompt_tokens = sum(len(p.request.prompt_token_ids) for p in prompts)
        self._is_candidate_count = {
            p.request.request_id: p.request.sampling_params.num_candidates > p.request.sampling_params.n
            or p.request.sampling_params.use_beam_search
            for p in prompts
        }
        self._num_tokens: dict[str, int] = dict.fromkeys(self._is_candidate_count, 0)
        self._num_engine_tokens: dict[str, int] = dict.fromkeys(self._is_candidate_count, 0)
        self._expects_cached_tokens = expects_cached_tokens
        self._num_cached_tokens: dict[str, int] = {}  # whenever the engine reports them

    def add(self, output: EngineCoreOutput, num_tokens: int) -> None:
        request_id = output.request_id
        self._num_tokens[request_id] += num_tokens
        self.note_cached_tokens(output)
        if output.num_generated_tokens is not None and self._is_candidate_count[request_id]:
            self._num_engine_tokens[request_id] = max(self._num_engine_tokens[request_id], output.num_generated_tokens)

    def note_cached_tokens(self, output: EngineCoreOutput) -> None:
        """Any output may carry them, even one of a choice that has already ended here."""
        if output.num_cached_tokens is not None:
            self._num_cached_tokens[output.request_id] = output.num_cached_tokens

    @property
    def is_complete(self) -> bool:
        """Whether the engine has reported everything the usage shows."""
        return not self._expects_cached_tokens or len(self._num_cached_tokens) == len(self._num_tokens)

    @property
    def num_completion_tokens(self) -> int:
        return sum(max(self._num_tokens[r], self._num_engine_tokens[r]) for r in self._num_tokens)

    def usage(self) -> UsageInfo:
        completion = self.num_completion_tokens
        details = None
        if self._num_cached_tokens:
            details = PromptTokensDetails(sum(self._num_cached_tokens.values()))
        return UsageInfo(self.num_prompt_tokens, completion, self.num_prompt_tokens + completion, details)


def waits_for_cached_tokens(config: ServeConfig, request: SamplingRequestFields) -> bool:
    """Whether a response whose last choices a stop string ended waits for the engine's count of
    cached prompt tokens: only with prefix caching, and only if it shows usage."""
    shows_usage = not request.stream or (request.stream_options is not None and request.stream_options.include_usage)
    return config.enable_prefix_caching and shows_usage


class ChoiceState:
    """Turns one sequence's engine outputs into text deltas: detokenize, then stop strings."""

    def __init__(self, index: int, tokenizer: PreTrainedTokenizerFast, settings: TextSettings,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self.index = index
        self.eos_token_ids = frozenset(eos_token_ids)
        self.include_stop_text = settings.include_stop_str_in_output
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=settings.skip_special_tokens)
        self.matcher = StopStringMatcher(settings.stop, include_stop_str_in_output=settings.include_stop_str_in_output)
        self.min_tokens = settings.min_tokens
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.has_output = False
        self.last_token_time: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, output: EngineCoreOutput) -> tuple[ChoiceDelta, bool]:
        """The delta for `output`, and whether a stop string ended the sequence here."""
        self.num_tokens += len(output.new_token_ids)
        can_stop = self.num_tokens > self.min_tokens  # vLLM: only past min_tokens
        text, stop = self.matcher.feed(self.detokenizer.push(self._text_token_ids(output)), can_stop=can_stop)
        delta = ChoiceDelta(self.index, text, output.new_token_ids, output.new_logprobs)
        delta.is_first = not self.has_output
        self.has_output = True
        if stop is None and output.finish_reason is not None:
            # The sequence ended: release what the detokenizer held (it may still complete a
            # stop string), then what the matcher held.
            tail, stop = self.matcher.feed(self.detokenizer.flush(), can_stop=can_stop)
            delta.text += tail
            if stop is None:
                delta.text += self.matcher.flush()
                delta.finish_reason = _finish_reason(output)
                delta.stop_reason = output.stop_reason
        if stop is not None:
            delta.finish_reason, delta.stop_reason = "stop", stop
        self.finish_reason = delta.finish_reason
        return delta, stop is not None

    def _text_token_ids(self, output: EngineCoreOutput) -> list[int]:
        """As vLLM does, the EOS or stop token id that ended the sequence adds no text (unless
        include_stop_str_in_output); its id and logprob are still reported."""
        ids = output.new_token_ids
        if (output.finish_reason == FinishReason.STOP and ids and not self.include_stop_text
                and (output.stop_reason is not None or ids[-1] in self.eos_token_ids)):
            return ids[:-1]
        return ids


def _finish_reason(output: EngineCoreOutput) -> str:
    reason = output.finish_reason
    if reason == FinishReason.STOP:
        return "stop"
    if reason == FinishReason.LENGTH:
        return "length"
    if reason == FinishReason.ERROR:
        # The engine can never serve this request (e.g. it does not fit the KV cache): a 400,
        # since retrying it (as clients do on 5xx) cannot help.
        raise bad_request(f"The request cannot be served: {output.error or 'engine error'}")
    # An abort we did not ask for: the engine is shutting down or shedding load.
    raise engine_unavailable("The request was aborted by the engine.", code="request_aborted")


OVERLOAD_RETRY_AFTER_S = 2
NOT_READY_RETRY_AFTER_S = 5


class RequestLoad:
    """Sequences in flight, shared by both endpoints, to refuse work beyond a bound.

    Every prompt of a request runs max(n, best_of) sequences (the beam width, with beam
    search). The engine runs `max_num_seqs` of them and queues the rest; once `max_num_seqs +
    max_waiting_requests` are in flight a request gets a 503 with `Retry-After` instead of an
    ever longer queue, and a request that alone needs more gets a 400, since it can never be
    admitted. Sequences count from the moment their engine requests are sent, so a burst of
    requests that all pass `check()` before any of them starts can overshoot the bound by that
    burst.
    """

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.num_seqs = 0

    def check(self, num_seqs: int) -> None:
        """Whether a request of `num_seqs` sequences can be admitted now."""
        if num_seqs > self.max_num_seqs:
            raise bad_request(
                f"The request needs {num_seqs} sequences (prompts x max(n, best_of)), more than the "
                f"{self.max_num_seqs} this server admits at once; split it into smaller requests.",
                param="prompt",
            )
        if self.num_seqs + num_seqs > self.max_num_seqs:
            raise engine_unavailable(
                f"The server is overloaded ({self.num_seqs} sequences in flight); retry later.",
                code="server_overloaded",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )


class OpenAIServing:
    """State and steps shared by the completions and chat endpoints."""

    def __init__(
        self,
        config: ServeConfig,
        engine_client,
        tokenizer: PreTrainedTokenizerFast,
        eos_token_ids: list[int],
        *,
        load: RequestLoad | None = None,
        on_request_finished: Callable[[RequestTiming], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.engine_client = engine_client
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.token_strings = TokenStrings(tokenizer)
        self.load = load or RequestLoad(config.max_num_seqs + config.max_waiting_requests)
        # A hook for metrics: called once per request with its timing.
        self.on_request_finished = on_request_finished
        self.executor = executor  # None: the event loop's default executor

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model)

    def engine_info(self) -> EngineReady:
        """The engine's model facts; a 503 while it is loading or after it died."""
        client = self.engine_client
        if client.is_dead:
            raise engine_unavailable(f"The engine is not running: {client.dead_reason}", code="engine_dead")
        info = client.model_info
        if info is None:
            raise engine_unavailable(
                "The model is still loading; retry shortly.",
                code="engine_not_ready",
                retry_after_s=NOT_READY_RETRY_AFTER_S,
            )
        return info

    async def run_blocking(self, fn: Callable, /, *args, **kwargs):
        """`fn(*args, **kwargs)` on a worker thread: tokenizing and rendering templates take
        CPU time that the event loop owes to /health and every stream."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def encode_prompt(self, text: str, *, add_special_tokens: bool, max_model_len: int, param: str) -> list[int]:
        """A prompt's token ids, off the event loop; a 400 for a prompt that leaves no room in
        the context, found without tokenizing all of a huge one."""
        try:
            return await self.run_blocking(encode_prompt, self.tokenizer, text, add_special_tokens=add_special_tokens,
                                           max_num_tokens=max_model_len - 1)
        except PromptTooLongError as exc:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens, and the prompt "
                f"has at least {exc.min_num_tokens} tokens. Shorten the prompt.",
                param=param,
            ) from None

    def make_engine_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float
    ) -> EngineCoreRequest:
        return EngineCoreRequest(request_id, prompt_token_ids, params, list(self.eos_token_ids), arrival_time)

    async def generate_choices(
        self,
        prompts: Sequence[PreparedPrompt],
        settings: TextSettings,
        usage: UsageCounter,
        timing: RequestTiming,
    ) -> AsyncIterator[ChoiceDelta]:
        """Yields every choice's deltas, in engine order, until every choice has finished.

        Closing this iterator early (client gone, an error) aborts what is still running.
        """
        states: dict[tuple[str, int], ChoiceState] = {}
        prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        for prompt in prompts:
            for j in range(prompt.request.sampling_params.n):
                index = prompt.first_choice_index + j
                states[(prompt.request.request_id, j)] = ChoiceState(index, self.tokenizer, settings,
                                                                  prompt.request.eos_token_ids)
        timing.num_prompt_tokens = usage.num_prompt_tokens
        num_unfinished = len(states)
        is_client_gone = False
        num_seqs = sum(p.request.sampling_params.num_candidates for p in prompts)
        self.load.num_seqs += num_seqs
        try:
            request_ids = [p.request.request_id for p in prompts]
            async with _merged_outputs(self.engine_client, [p.request for p in prompts]) as outputs:
                try:
                    async for output in outputs:
                        if output.prompt_logprobs is not None:
                            prompt_logprobs[output.request_id] = output.prompt_logprobs
                        if output.queue_time_s is not None:
                            timing.queue_times_s.append(output.queue_time_s)
                        state = states.get((output.request_id, output.index))
                        if state is not None and not state.is_finished:
                            if output.new_token_ids:
                                _note_token_time(timing, state)
                            usage.add(output, len(output.new_token_ids))
                            delta, hit_stop = state.process(output)
                            if delta.is_first:
                                delta.prompt_logprobs = prompt_logprobs.get(output.request_id)
                            if hit_stop and output.finish_reason is None:
                                await self.engine_client.abort([output.request_id], [output.index])
                            yield delta
                            if state.is_finished:
                                num_unfinished -= 1
                        else:
                            # In flight after our own stop-string abort: only its usage counts.
                            usage.note_cached_tokens(output)
                        # Every choice has ended; if a stop string ended some, the engine's
                        # final outputs for them (which carry the usage) may still be coming.
                        # The outputs end by themselves once every sequence has its final one.
                        if num_unfinished == 0 and usage.is_complete:
                            break
                except (asyncio.CancelledError, GeneratorExit):
                    # The consumer went away mid-generation (client disconnect): what the engine
                    # still makes for these requests is counted as wasted.
                    is_client_gone = True
                    self.engine_client.mark_client_gone(request_ids)
                    raise
        except EngineDeadError as exc:
            if num_unfinished > 0:  # else only the engine's report of cached tokens is missing
                raise engine_unavailable(f"The engine is not running: {exc}", code="engine_dead") from None
        except ServerStoppingError as exc:
            raise engine_unavailable(f"The server is shutting down ({exc}); retry the request.",
                                     code="server_shutting_down") from None
        finally:
            self.load.num_seqs -= num_seqs
            timing.finish_time = time.time()
            timing.num_generation_tokens = usage.num_completion_tokens
            unfinished_reason = "abort" if is_client_gone else "error"
            timing.finish_reasons = [s.finish_reason or unfinished_reason for s in states.values()]
            if self.on_request_finished is not None:
                self.on_request_finished(timing)


def _note_token_time(timing: RequestTiming, state: ChoiceState) -> None:
    now = time.time()
    if timing.first_token_time is None:
        timing.first_token_time = now
    if state.last_token_time is not None:
        timing.inter_token_latencies_s.append(now - state.last_token_time)
    state.last_token_time = now


_END = object()


@contextlib.asynccontextmanager
async def _merged_outputs(engine_client, requests: list[EngineCoreRequest]):
    """The outputs of several engine requests as one stream, in arrival order.

    One task per request drains its `generate()`; leaving the context cancels those tasks,
    which closes each `generate()` and so aborts whatever has not finished.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(request: EngineCoreRequest) -> None:
        try:
            async for output in engine_client.generate(request):
                queue.put_nowait(output)
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    tasks = [asyncio.create_task(drain(r)) for r in requests]

    async def outputs() -> AsyncIterator[EngineCoreOutput]:
        num_running = len(tasks)
        while num_running:
            item = await queue.get()
            if item is _END:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item

    iterator = outputs()
    try:
        yield iterator
    finally:
        # Cancel before any await: under a cancelled anyio scope (Litestar's disconnect
        # handling) every await here raises again, and the aborts must not depend on it.
        for task in tasks:
            task.cancel()
        await iterator.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: msgspec.Struct) -> bytes:
    """One server-sent event exactly as OpenAI frames it (LF line ends, no `event:` field)."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def sse_stream(chunks: AsyncIterator[msgspec.Struct]) -> AsyncIterator[bytes]:
    """Frames chunks as SSE and always ends with `[DONE]`; a failure after the 200 status was
    sent becomes an `{"error": ...}` event."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield sse_event(chunk)
    except OpenAIError as exc:
        yield error_event(exc)
    except Exception:
        logger.exception("a streamed request failed")
        yield error_event(internal_error())
    yield SSE_DONE


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
