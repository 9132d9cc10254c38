"""What the two generation endpoints share: validation, the engine loop, per-choice assembly.

A request flows through three stages:

1. validation: an OpenAI request becomes `EngineCoreRequest`s whose `SamplingParams` the
   engine can trust (every range check that needs the model's limits happens here);
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
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import msgspec
from tokenizers import decoders
from transformers import PreTrainedTokenizerFast

from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from frontend.engine_client import EngineDeadError
from frontend.errors import (
    OpenAIError,
    bad_request,
    engine_unavailable,
    error_event,
    internal_error,
    model_not_found,
)
from frontend.protocol import SamplingRequestFields, UsageInfo
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

MAX_LOGPROBS = 20  # vLLM's default `max_logprobs`
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same value
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# ---------------------------------------------------------------------------------------
# Validation: OpenAI request fields -> SamplingParams


@dataclass(frozen=True)
class TextSettings:
    """What the frontend itself applies to a sequence's text (the engine never sees text)."""

    stop: list[str]
    include_stop_str_in_output: bool
    skip_special_tokens: bool


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise bad_request(message, param=param)


def check_sampling_fields(request: SamplingRequestFields, *, max_num_seqs: int) -> None:
    """Range checks that do not depend on the prompt."""
    _check(request.n >= 1, "n", f"n must be at least 1, got {request.n}.")
    if request.best_of is not None:
        _check(
            request.best_of >= request.n,
            "best_of",
            f"best_of must be at least n ({request.n}), got {request.best_of}.",
        )
    num_candidates = max(request.n, request.best_of or 0)
    _check(
        num_candidates <= max_num_seqs,
        "n" if request.best_of is None else "best_of",
        f"{num_candidates} sequences per request exceed the server's max_num_seqs ({max_num_seqs}).",
    )
    if request.stream and request.use_beam_search:
        raise bad_request(
            "Beam search cannot stream: the best beams are only known when generation ends. "
            "Set stream to false.",
            param="stream",
        )
    if request.stream and request.best_of is not None and request.best_of > request.n:
        raise bad_request(
            "best_of > n cannot stream: the best candidates are only known when generation "
            "ends. Set stream to false or best_of to n.",
            param="best_of",
        )
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options can only be set when stream is true.", param="stream_options")
    if not request.use_beam_search:  # beam search ignores temperature and the sampling filters
        t = request.temperature
        _check(t is None or 0.0 <= t <= 2.0, "temperature", f"temperature must be in [0, 2], got {t}.")
        p = request.top_p
        _check(p is None or 0.0 < p <= 1.0, "top_p", f"top_p must be in (0, 1], got {p}.")
        k = request.top_k
        _check(
            k is None or k == -1 or k >= 0,
            "top_k",
            f"top_k must be -1 or 0 (disabled) or at least 1, got {k}.",
        )
        m = request.min_p
        _check(m is None or 0.0 <= m <= 1.0, "min_p", f"min_p must be in [0, 1], got {m}.")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        _check(value is None or -2.0 <= value <= 2.0, name, f"{name} must be in [-2, 2], got {value}.")
    r = request.repetition_penalty
    _check(r is None or 0.0 < r <= 2.0, "repetition_penalty", f"repetition_penalty must be in (0, 2], got {r}.")
    s = request.seed
    _check(s is None or _INT64_MIN <= s <= _INT64_MAX, "seed", f"seed must fit in 64 bits, got {s}.")
    _check(request.min_tokens >= 0, "min_tokens", f"min_tokens must be at least 0, got {request.min_tokens}.")
    stop = request.stop
    if isinstance(stop, list):
        _check(all(isinstance(x, str) for x in stop), "stop", "stop must be a string or a list of strings.")


def stop_strings(request: SamplingRequestFields) -> list[str]:
    stop = request.stop
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def text_settings(request: SamplingRequestFields) -> TextSettings:
    return TextSettings(
        stop=stop_strings(request),
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
    )


def resolve_max_tokens(
    requested: int | None,
    *,
    param: str,
    default: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    clamp: bool,
) -> int:
    """The number of tokens to generate; a prompt that leaves no room is a 400 with the numbers.

    `default` None means "the rest of the context".
    """
    _check(num_prompt_tokens > 0, "prompt", "The prompt is empty: it has no tokens.")
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt "
            f"has {num_prompt_tokens} tokens, which leaves no room to generate. "
            "Shorten the prompt.",
            param="messages" if param == "max_completion_tokens" else "prompt",
        )
    if requested is None:
        return room if default is None else min(default, room)
    _check(requested >= 1, param, f"{param} must be at least 1, got {requested}.")
    if requested > room:
        if clamp:
            return room
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
            f"prompt, {requested} for the completion). Reduce the prompt or {param}.",
            param=param,
        )
    return requested


def check_stop_token_ids(request: SamplingRequestFields, vocab_size: int) -> None:
    for token_id in request.stop_token_ids or []:
        _check(
            0 <= token_id < vocab_size,
            "stop_token_ids",
            f"stop_token_ids: {token_id} is not a token id (the vocabulary has {vocab_size}).",
        )


def make_sampling_params(
    request: SamplingRequestFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    _check(
        request.min_tokens <= max_tokens,
        "min_tokens",
        f"min_tokens ({request.min_tokens}) must not exceed the maximum number of tokens ({max_tokens}).",
    )
    seed = request.seed
    if seed is not None and seed < 0:
        seed %= 2**64  # the engine's generators take unsigned seeds; still reproducible
    beam = request.use_beam_search
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if beam or request.temperature is None else request.temperature,
        top_p=1.0 if beam or request.top_p is None else request.top_p,
        top_k=0 if beam or request.top_k in (None, -1) else request.top_k,
        min_p=0.0 if beam or request.min_p is None else request.min_p,
        seed=seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        min_tokens=request.min_tokens,
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        n=request.n,
        best_of=request.best_of,
        use_beam_search=beam,
        length_penalty=request.length_penalty,
        early_stopping=request.early_stopping,
    )


# ---------------------------------------------------------------------------------------
# Token strings for logprobs


class TokenStrings:
    """The exact bytes of each token, and a printable string for it (cached per token id).

    A byte-level BPE token may hold part of a UTF-8 character; its `bytes` are still exact.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._is_byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}

    def bytes_of(self, token_id: int) -> bytes:
        data = self._cache.get(token_id)
        if data is None:
            data = self._cache[token_id] = self._compute_bytes(token_id)
        return data

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def _compute_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._is_byte_level:
            try:
                return bytes(_BYTE_DECODER[c] for c in piece)
            except KeyError:
                return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of the 256 bytes, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


# ---------------------------------------------------------------------------------------
# The engine loop


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
    """When a request arrived, produced its first token and finished (wall-clock seconds)."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class UsageCounter:
    """Token counts of a response. With best_of or beam search the engine reports all
    candidates' tokens on its final outputs, which is what was really generated."""

    def __init__(self, prompts: Sequence[PreparedPrompt]) -> None:
        self.num_prompt_tokens = sum(len(p.request.prompt_token_ids) for p in prompts)
        self._is_candidate_count = {
            p.request.request_id: p.request.sampling_params.num_candidates > p.request.sampling_params.n
            or p.request.sampling_params.use_beam_search
            for p in prompts
        }
        self._num_tokens: dict[tuple[str, int], int] = {}
        self._num_engine_tokens: dict[str, int] = {}

    def add(self, output: EngineCoreOutput, num_tokens: int) -> None:
        key = (output.request_id, output.index)
        self._num_tokens[key] = self._num_tokens.get(key, 0) + num_tokens
        if output.num_generated_tokens is not None and self._is_candidate_count[output.request_id]:
            previous = self._num_engine_tokens.get(output.request_id, 0)
            self._num_engine_tokens[output.request_id] = max(previous, output.num_generated_tokens)

    @property
    def num_completion_tokens(self) -> int:
        total = 0
        for request_id in self._is_candidate_count:
            seen = sum(n for (rid, _), n in self._num_tokens.items() if rid == request_id)
            total += max(seen, self._num_engine_tokens.get(request_id, 0))
        return total

    def usage(self) -> UsageInfo:
        completion = self.num_completion_tokens
        return UsageInfo(self.num_prompt_tokens, completion, self.num_prompt_tokens + completion)


class ChoiceState:
    """Turns one sequence's engine outputs into text deltas: detokenize, then stop strings."""

    def __init__(self, index: int, tokenizer: PreTrainedTokenizerFast, settings: TextSettings) -> None:
        self.index = index
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=settings.skip_special_tokens)
        self.matcher = StopStringMatcher(settings.stop, include_stop_str_in_output=settings.include_stop_str_in_output)
        self.finish_reason: str | None = None
        self.has_output = False

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, output: EngineCoreOutput) -> tuple[ChoiceDelta, bool]:
        """The delta for `output`, and whether a stop string ended the sequence here."""
        text, stop = self.matcher.feed(self.detokenizer.push(output.new_token_ids))
        delta = ChoiceDelta(self.index, text, output.new_token_ids, output.new_logprobs)
        delta.is_first = not self.has_output
        self.has_output = True
        if stop is None and output.finish_reason is not None:
            # The sequence ended: release what the detokenizer held (it may still complete a
            # stop string), then what the matcher held.
            tail, stop = self.matcher.feed(self.detokenizer.flush())
            delta.text += tail
            if stop is None:
                delta.text += self.matcher.flush()
                delta.finish_reason = _finish_reason(output)
                delta.stop_reason = output.stop_reason
        if stop is not None:
            delta.finish_reason, delta.stop_reason = "stop", stop
        self.finish_reason = delta.finish_reason
        return delta, stop is not None


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


class RequestLoad:
    """Generation requests in flight, shared by both endpoints, to refuse work beyond a bound.

    Requests beyond `max_num_seqs` wait in the engine; more than `max_waiting_requests` such
    requests get a 503 instead of an ever longer queue.
    """

    def __init__(self, max_num_requests: int) -> None:
        self.max_num_requests = max_num_requests
        self.num_requests = 0

    def check(self) -> None:
        if self.num_requests >= self.max_num_requests:
            raise engine_unavailable(
                f"The server is overloaded ({self.num_requests} requests in flight); retry later.",
                code="server_overloaded",
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
    ) -> None:
        self.config = config
        self.engine_client = engine_client
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.token_strings = TokenStrings(tokenizer)
        self.load = load or RequestLoad(config.max_num_seqs + config.max_waiting_requests)
        # A hook for metrics: called once per request with its timing.
        self.on_request_finished = on_request_finished

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
            raise engine_unavailable("The model is still loading; retry shortly.", code="engine_not_ready")
        self.load.check()
        return info

    def make_engine_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float) -> EngineCoreRequest:
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
                states[(prompt.request.request_id, j)] = ChoiceState(prompt.first_choice_index + j, self.tokenizer, settings)
        timing.num_prompt_tokens = usage.num_prompt_tokens
        num_unfinished = len(states)
        self.load.num_requests += 1
        try:
            async with _merged_outputs(self.engine_client, [p.request for p in prompts]) as outputs:
                async for output in outputs:
                    if output.prompt_logprobs is not None:
                        prompt_logprobs[output.request_id] = output.prompt_logprobs
                    state = states.get((output.request_id, output.index))
                    if state is None or state.is_finished:
                        continue  # tokens in flight after our own stop-string abort
                    if timing.first_token_time is None and output.new_token_ids:
                        timing.first_token_time = time.time()
                    usage.add(output, len(output.new_token_ids))
                    delta, hit_stop = state.process(output)
                    if delta.is_first:
                        delta.prompt_logprobs = prompt_logprobs.get(output.request_id)
                    if hit_stop and output.finish_reason is None:
                        await self.engine_client.abort([output.request_id], [output.index])
                    yield delta
                    if state.is_finished:
                        num_unfinished -= 1
                        if num_unfinished == 0:
                            break
        except EngineDeadError as exc:
            raise engine_unavailable(f"The engine is not running: {exc}", code="engine_dead") from None
        finally:
            self.load.num_requests -= 1
            timing.finish_time = time.time()
            timing.num_generation_tokens = usage.num_completion_tokens
            if self.on_request_finished is not None:
                self.on_request_finished(timing)


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
