"""POST /v1/completions: prompts in, text (or a stream of text chunks) out.

Each prompt of a request is its own engine request; its n sequences fill choices
`prompt_index * n + j`. With `echo` a choice starts with its prompt, and with `logprobs` too
the prompt's own logprobs (computed by the engine as `prompt_logprobs`) lead the list.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from frontend.errors import bad_request
from frontend.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamChoice,
    CompletionStreamResponse,
    PromptLogprobs,
)
from frontend.output_processor import ChoiceDelta, PreparedPrompt
from frontend.serving import GenerationJob, OpenAIServing, random_id
from frontend.serving_logprobs import (
    TokenStrings,
    clamp_logprob,
    prompt_logprobs,
)
from frontend.serving_structured_outputs import structured_output_spec
from frontend.serving_validation import (
    check_num_logprobs,
    check_prompt_logprobs,
    check_sampling_fields,
    check_stop_token_ids,
    make_sampling_params,
    resolve_logit_bias,
    resolve_max_tokens,
)
from ipc.messages import EngineReady, TokenLogprobs

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API
# Each prompt is tokenized and becomes its own engine request; admission (`RequestLoad`) bounds
# their sequences too, but this bound holds whatever --max-waiting-requests says.
MAX_PROMPTS_PER_REQUEST = 256


class CompletionLogprobsBuilder:
    """Builds one choice's completions-format logprobs; `text_offset` runs across calls."""

    def __init__(self, token_strings: TokenStrings, num_top: int) -> None:
        self.token_strings = token_strings
        self.num_top = num_top
        self.offset = 0

    def build(self, token_ids: list[int], entries: list[TokenLogprobs | None] | None) -> CompletionLogProbs:
        result = CompletionLogProbs([], [], [], [])
        for k, token_id in enumerate(token_ids):
            entry = entries[k] if entries is not None and k < len(entries) else None
            token = self.token_strings.text_of(token_id)
            result.tokens.append(token)
            result.text_offset.append(self.offset)
            self.offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(clamp_logprob(entry.logprob))
            top = {token: clamp_logprob(entry.logprob)}
            for top_id, top_logprob in list(zip(entry.top_token_ids, entry.top_logprobs))[: self.num_top]:
                top.setdefault(self.token_strings.text_of(top_id), clamp_logprob(top_logprob))
            result.top_logprobs.append(top)
        return result


def _append_logprobs(into: CompletionLogProbs, more: CompletionLogProbs) -> None:
    into.tokens.extend(more.tokens)
    into.text_offset.extend(more.text_offset)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[bytes]:
        """Validates eagerly (errors are plain 400s), then a response or an SSE byte stream."""
        return await self.respond(await self.prepare(request))

    async def prepare(self, request: CompletionRequest) -> CompletionJob:
        """Validates and tokenizes a request into a job ready to run (admission checked, nothing
        sent to the engine yet); bad input raises an OpenAIError. furiosa_llm.LLM runs through here."""
        arrival_time = time.time()
        self.check_model(request.model)
        info = self.engine_info()
        if request.suffix is not None:
            raise bad_request("suffix is not supported: this server does not do fill-in-the-middle.", param="suffix")
        check_sampling_fields(request, max_num_seqs=self.config.engine.max_num_seqs)
        check_stop_token_ids(request, info.vocab_size)
        check_num_logprobs(request.logprobs, "logprobs", self.config.max_logprobs)
        check_prompt_logprobs(request, self.config.max_logprobs)
        bias = resolve_logit_bias(request, info.vocab_size)
        structured_output, _ = structured_output_spec(request)
        split = _split_prompts(request.prompt)
        num_seqs = len(split) * max(request.n, request.best_of or 0)
        self.load.check(num_seqs)  # before the costly part, tokenizing
        completion_id = random_id("cmpl")
        prompts: list[PreparedPrompt] = []
        for i, prompt in enumerate(split):
            token_ids = await self._prompt_token_ids(prompt, info)
            max_tokens = resolve_max_tokens(
                request.max_tokens,
                param="max_tokens",
                default=DEFAULT_MAX_TOKENS,
                num_prompt_tokens=len(token_ids),
                max_model_len=info.max_model_len,
                clamp=self.config.clamp_max_tokens,
            )
            params = make_sampling_params(
                request,
                max_tokens=max_tokens,
                logprobs=request.logprobs,
                prompt_logprobs=_engine_prompt_logprobs(request),
                logit_bias=bias,
                structured_output=structured_output,
                defaults=self.generation_defaults,
            )
            engine_request = self.make_engine_request(f"{completion_id}-{i}", token_ids, params, arrival_time)
            prompt_text = prompt if isinstance(prompt, str) else await self.run_blocking(self.tokenizer.decode, token_ids)
            prompts.append(PreparedPrompt(engine_request, prompt_text, i * request.n))
        self.load.check(num_seqs)  # again: others may have started while this one was tokenized
        return CompletionJob(self, request, completion_id, prompts, arrival_time)

    async def _prompt_token_ids(self, prompt: str | list[int], info: EngineReady) -> list[int]:
        if isinstance(prompt, str):
            return await self.encode_prompt(prompt, add_special_tokens=True, max_model_len=info.max_model_len,
                                            param="prompt")
        if len(prompt) >= info.max_model_len:  # no room to generate; known before the loop below
            raise bad_request(
                f"This model's maximum context length is {info.max_model_len} tokens, and the prompt "
                f"has {len(prompt)} tokens, which leaves no room to generate. Shorten the prompt.",
                param="prompt",
            )
        vocab_size = info.vocab_size
        for token_id in prompt:
            if not 0 <= token_id < vocab_size:
                raise bad_request(f"prompt: {token_id} is not a token id (the vocabulary has {vocab_size}).", param="prompt")
        return list(prompt)


def _engine_prompt_logprobs(request: CompletionRequest) -> int | None:
    """The prompt alternatives the engine computes: for vLLM's `prompt_logprobs`, and for the
    echoed prompt's `logprobs`."""
    wanted = [request.prompt_logprobs, request.logprobs if request.echo else None]
    return max((n for n in wanted if n is not None), default=None)


def _split_prompts(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a request: a string, strings, token ids, or token-id lists (not mixed)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be an empty list.", param="prompt")
    if len(prompt) > MAX_PROMPTS_PER_REQUEST and not all(isinstance(p, int) for p in prompt):
        raise bad_request(
            f"A request can have at most {MAX_PROMPTS_PER_REQUEST} prompts, got {len(prompt)}; "
            "split them over several requests.",
            param="prompt",
        )
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids, or a list of "
        "token-id lists; its elements cannot be mixed.",
        param="prompt",
    )


class CompletionJob(GenerationJob):
    """One completion request: its choices as text, or as a stream of text chunks."""

    def __init__(
        self,
        serving: OpenAIServingCompletion,
        request: CompletionRequest,
        completion_id: str,
        prompts: list[PreparedPrompt],
        arrival_time: float,
    ) -> None:
        super().__init__(serving, request, completion_id, prompts, arrival_time)
        num_top = request.logprobs or 0
        self.logprobs_builders = {
            p.first_choice_index + j: CompletionLogprobsBuilder(serving.token_strings, num_top)
            for p in prompts
            for j in range(request.n)
        }
        self.prompt_of_choice = {
            p.first_choice_index + j: p for p in prompts for j in range(request.n)
        }

    def _prompt_logprobs(self, delta: ChoiceDelta) -> PromptLogprobs | None:
        if self.request.prompt_logprobs is None:
            return None
        prompt = self.prompt_of_choice[delta.index].request
        return prompt_logprobs(self.serving.token_strings, prompt.prompt_token_ids, delta.prompt_logprobs,
                               self.request.prompt_logprobs)

    def _choice_parts(self, delta: ChoiceDelta) -> tuple[str, CompletionLogProbs | None]:
        """The text and logprobs a delta adds to its choice, the echoed prompt included."""
        text = delta.text
        want_logprobs = self.request.logprobs is not None
        logprobs = CompletionLogProbs([], [], [], []) if want_logprobs else None
        builder = self.logprobs_builders[delta.index]
        if delta.is_first and self.request.echo:
            prompt = self.prompt_of_choice[delta.index]
            text = prompt.prompt_text + text
            if logprobs is not None:
                _append_logprobs(logprobs, builder.build(prompt.request.prompt_token_ids, delta.prompt_logprobs))
        if logprobs is not None:
            _append_logprobs(logprobs, builder.build(delta.token_ids, delta.logprobs))
        return text, logprobs

    async def collect(self) -> CompletionResponse:
        texts: dict[int, list[str]] = {index: [] for index in self.logprobs_builders}
        logprobs: dict[int, CompletionLogProbs | None] = {}
        finish: dict[int, tuple[str | None, int | str | None]] = {}
        token_ids: dict[int, list[int]] = {index: [] for index in self.logprobs_builders}
        prompt_logprobs_of: dict[int, PromptLogprobs | None] = {}
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                text, more = self._choice_parts(delta)
                texts[delta.index].append(text)
                token_ids[delta.index].extend(delta.token_ids)
                if delta.is_first:
                    prompt_logprobs_of[delta.index] = self._prompt_logprobs(delta)
                if more is not None:
                    _append_logprobs(logprobs.setdefault(delta.index, CompletionLogProbs([], [], [], [])), more)
                if delta.finish_reason is not None:
                    finish[delta.index] = (delta.finish_reason, delta.stop_reason)
        choices = [
            CompletionResponseChoice(
                index=index,
                text="".join(texts[index]),
                logprobs=logprobs.get(index),
                finish_reason=finish.get(index, (None, None))[0],
                stop_reason=finish.get(index, (None, None))[1],
                prompt_logprobs=prompt_logprobs_of.get(index),
                prompt_token_ids=self._prompt_token_ids(index) if self.request.return_token_ids else None,
                token_ids=token_ids[index] if self.request.return_token_ids else None,
            )
            for index in sorted(texts)
        ]
        return CompletionResponse(
            id=self.response_id,
            model=self.serving.model_name,
            choices=choices,
            usage=self.usage.usage(),
            created=self.created,
        )

    async def stream_chunks(self) -> AsyncIterator[CompletionStreamResponse]:
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                text, logprobs = self._choice_parts(delta)
                with_ids = self.request.return_token_ids
                if (not text and delta.finish_reason is None and not (logprobs and logprobs.tokens)
                        and not (with_ids and (delta.token_ids or delta.is_first))):
                    continue  # nothing to say yet (text held back for a possible stop string)
                choice = CompletionStreamChoice(delta.index, text, logprobs, delta.finish_reason, delta.stop_reason)
                if with_ids:
                    choice.token_ids = delta.token_ids
                    if delta.is_first:
                        choice.prompt_token_ids = self._prompt_token_ids(delta.index)
                yield self._chunk([choice], self.usage.usage() if self.include_continuous_usage else None)
        if self.include_usage:
            yield self._chunk([], self.usage.usage())

    def _prompt_token_ids(self, index: int) -> list[int]:
        return self.prompt_of_choice[index].request.prompt_token_ids

    def _chunk(self, choices: list[CompletionStreamChoice], usage) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=self.response_id,
            object="text_completion",
            created=self.created,
            model=self.serving.model_name,
            choices=choices,
            usage=usage,
        )
