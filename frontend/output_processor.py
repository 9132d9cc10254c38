"""Engine outputs -> choice deltas: the one place that decides text, stops and finish reasons.

`generate_choices` is the one loop over a request's engine outputs (the engine client delivers
the outputs of all its prompts in one stream). Each sequence's tokens are detokenized
incrementally and scanned for stop strings (`ChoiceState`); a sequence that hits one is
finished here and aborted in the engine. It yields `ChoiceDelta`s, the new text of one choice,
counts the usage (`UsageCounter`) and fills the request's `RequestTiming`. The completions and
chat formatters read the same deltas for a stream and for one response, so a stream
concatenates to exactly the non-streamed response.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from frontend.engine_client import EngineDeadError, ServerStoppingError
from frontend.errors import bad_request, engine_unavailable
from frontend.metrics import RequestTiming
from frontend.protocol import PromptTokensDetails, UsageInfo
from frontend.serving_validation import TextSettings
from ipc.messages import EngineCoreOutput, EngineCoreRequest, FinishCause, FinishReason, TokenLogprobs

# the last token of a sequence ended this way is the EOS or stop token itself
_TOKENS_WITHOUT_TEXT = (FinishCause.EOS, FinishCause.STOP_TOKEN)


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


class UsageCounter:
    """Token counts of a response. With best_of or beam search the engine reports all
    candidates' tokens on its final outputs, which is what was really generated. With prefix
    caching the engine reports each request's cached prompt tokens on each choice's first
    output (and its final one), so a choice a stop string ended has reported them too."""

    def __init__(self, prompts: Iterable[PreparedPrompt]) -> None:
        prompts = list(prompts)
        self.num_prompt_tokens = sum(len(p.request.prompt_token_ids) for p in prompts)
        self._is_candidate_count = {
            p.request.request_id: p.request.sampling_params.num_candidates > p.request.sampling_params.n
            or p.request.sampling_params.use_beam_search
            for p in prompts
        }
        self._num_tokens: dict[str, int] = dict.fromkeys(self._is_candidate_count, 0)
        self._num_engine_tokens: dict[str, int] = dict.fromkeys(self._is_candidate_count, 0)
        self._num_cached_tokens: dict[str, int] = {}  # whenever the engine reports them

    def add(self, output: EngineCoreOutput) -> None:
        request_id = output.request_id
        self._num_tokens[request_id] += len(output.new_token_ids)
        if output.num_cached_tokens is not None:
            self._num_cached_tokens[request_id] = output.num_cached_tokens
        if output.num_generated_tokens is not None and self._is_candidate_count[request_id]:
            self._num_engine_tokens[request_id] = max(self._num_engine_tokens[request_id], output.num_generated_tokens)

    @property
    def num_completion_tokens(self) -> int:
        return sum(max(self._num_tokens[r], self._num_engine_tokens[r]) for r in self._num_tokens)

    def usage(self) -> UsageInfo:
        completion = self.num_completion_tokens
        details = None
        if self._num_cached_tokens:
            details = PromptTokensDetails(sum(self._num_cached_tokens.values()))
        return UsageInfo(self.num_prompt_tokens, completion, self.num_prompt_tokens + completion, details)


class ChoiceState:
    """Turns one sequence's engine outputs into text deltas: detokenize, then stop strings."""

    def __init__(self, index: int, tokenizer: PreTrainedTokenizerFast, settings: TextSettings) -> None:
        self.index = index
        self.include_stop_text = settings.include_stop_str_in_output
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=settings.skip_special_tokens)
        self.matcher = StopStringMatcher(settings.stop, include_stop_str_in_output=settings.include_stop_str_in_output)
        self.min_tokens = settings.min_tokens
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.has_output = False
        self.last_token_time: float | None = None

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
                delta.finish_reason = openai_finish_reason(output)
                delta.stop_reason = output.stop_reason
        if stop is not None:
            delta.finish_reason, delta.stop_reason = "stop", stop
        self.finish_reason = delta.finish_reason
        return delta, stop is not None

    def _text_token_ids(self, output: EngineCoreOutput) -> list[int]:
        """As vLLM does, the EOS or stop token id that ended the sequence adds no text (unless
        include_stop_str_in_output); its id and logprob are still reported. The engine says
        which token that was (`finish_cause`), so the frontend keeps no EOS ids of its own."""
        ids = output.new_token_ids
        if ids and not self.include_stop_text and output.finish_cause in _TOKENS_WITHOUT_TEXT:
            return ids[:-1]
        return ids


def openai_finish_reason(output: EngineCoreOutput) -> str:
    """The OpenAI finish reason of a final output; an error or an abort we did not ask for is
    raised as the API error it becomes."""
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


async def generate_choices(
    engine_client,
    prompts: list[PreparedPrompt],
    tokenizer: PreTrainedTokenizerFast,
    settings: TextSettings,
    usage: UsageCounter,
    timing: RequestTiming,
) -> AsyncIterator[ChoiceDelta]:
    """Yields every choice's deltas, in engine order, until every choice has finished (the
    engine client's stream ends then: it counts the sequences that finished in the engine and
    those we aborted on a stop string).

    Closing this iterator early (client gone, an error) aborts what is still running.
    """
    states: dict[tuple[str, int], ChoiceState] = {}
    for prompt in prompts:
        for j in range(prompt.request.sampling_params.n):
            states[(prompt.request.request_id, j)] = ChoiceState(
                prompt.first_choice_index + j, tokenizer, settings)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
    timing.num_prompt_tokens = usage.num_prompt_tokens
    request_ids = [p.request.request_id for p in prompts]
    is_client_gone = False
    try:
        async with contextlib.aclosing(engine_client.generate([p.request for p in prompts])) as outputs:
            try:
                async for output in outputs:
                    if output.prompt_logprobs is not None:
                        prompt_logprobs[output.request_id] = output.prompt_logprobs
                    if output.queue_time_s is not None:
                        timing.queue_times_s.append(output.queue_time_s)
                    state = states[(output.request_id, output.index)]
                    if output.new_token_ids:
                        state.last_token_time = timing.note_tokens(state.last_token_time)
                    usage.add(output)
                    delta, is_stop_string = state.process(output)
                    if delta.is_first:
                        delta.prompt_logprobs = prompt_logprobs.get(output.request_id)
                    if is_stop_string and output.finish_reason is None:
                        await engine_client.abort([output.request_id], [output.index])
                    yield delta
            except (asyncio.CancelledError, GeneratorExit):
                # The consumer went away mid-generation (client disconnect): what the engine
                # still makes for these requests is counted as wasted.
                is_client_gone = True
                engine_client.mark_client_gone(request_ids)
                raise
    except EngineDeadError as exc:
        raise engine_unavailable(f"The engine is not running: {exc}", code="engine_dead") from None
    except ServerStoppingError as exc:
        raise engine_unavailable(f"The server is shutting down ({exc}); retry the request.",
                                 code="server_shutting_down") from None
    finally:
        timing.finish_time = time.time()
        timing.num_generation_tokens = usage.num_completion_tokens
        unfinished_reason = "abort" if is_client_gone else "error"
        timing.finish_reasons = [s.finish_reason or unfinished_reason for s in states.values()]
