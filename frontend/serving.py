"""Request preparation shared by the generation endpoints, and the job skeleton they fill.

`OpenAIServing` holds what preparing a request needs (the model name, the engine's model
facts, admission, tokenizing off the event loop); each endpoint's `prepare` validates its
request into `PreparedPrompt`s (see `serving_validation`) and returns a `GenerationJob`. A job
reads the output processor's deltas (`output_processor.generate_choices`) and formats them as
stream chunks or as one response (`serving_completions`, `serving_chat`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

from transformers import PreTrainedTokenizerFast

from frontend.admission import RequestLoad
from frontend.config import FrontendConfig
from frontend.errors import bad_request, engine_unavailable, model_not_found
from frontend.metrics import RequestTiming
from frontend.output_processor import ChoiceDelta, PreparedPrompt, UsageCounter, generate_choices
from frontend.protocol import SamplingRequestFields
from frontend.serving_logprobs import TokenStrings
from frontend.serving_validation import text_settings
from frontend.generation_config import load_generation_defaults
from frontend.sse import sse_stream
from frontend.tokenizer import PromptTooLongError, encode_prompt
from ipc.messages import EngineCoreRequest, EngineReady, SamplingParams

NOT_READY_RETRY_AFTER_S = 5


class OpenAIServing:
    """State and steps shared by the completions and chat endpoints."""

    RUNNER = "generate"  # the --runner an endpoint needs (embeddings: pooling)

    def __init__(
        self,
        config: FrontendConfig,
        engine_client,
        tokenizer: PreTrainedTokenizerFast,
        eos_token_ids: list[int],
        *,
        load: RequestLoad,
        on_request_finished: Callable[[RequestTiming], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.engine_client = engine_client
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.token_strings = TokenStrings(tokenizer)
        self.load = load  # shared by both endpoints
        # A hook for metrics: called once per request with its timing.
        self.on_request_finished = on_request_finished
        self.executor = executor  # None: the event loop's default executor
        # for the sampling fields a request leaves out (`--generation-config`)
        self.generation_defaults = load_generation_defaults(config.generation_config, config.engine.model)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model)

    def engine_info(self) -> EngineReady:
        """The engine's model facts; a 503 while it is loading or after it died. A 400 when the
        server runs the other runner (generation routes under --runner pooling, and back)."""
        runner = self.config.engine.runner
        if runner != self.RUNNER:
            raise bad_request(
                "This model runs as a pooling runner (--runner pooling): it serves /v1/embeddings, not generation."
                if runner == "pooling" else
                "This model runs as a generate runner: start the server with --runner pooling to serve /v1/embeddings.",
                param="model",
            )
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

    @staticmethod
    async def respond(job: GenerationJob):
        """A job's answer: an SSE byte stream if the request asked for one, else the response."""
        if job.request.stream:
            return sse_stream(job.stream_chunks())
        return await job.collect()


class GenerationJob:
    """One validated generation request: its engine requests and the state that a stream and
    a response both read. Subclasses format the deltas (`collect`, `stream_chunks`)."""

    def __init__(
        self,
        serving: OpenAIServing,
        request: SamplingRequestFields,
        response_id: str,
        prompts: list[PreparedPrompt],
        arrival_time: float,
    ) -> None:
        self.serving = serving
        self.request = request
        self.response_id = response_id
        self.prompts = prompts
        self.settings = text_settings(request)
        self.created = int(arrival_time)
        self.timing = RequestTiming(arrival_time)
        self.timing.params_n = [p.request.sampling_params.n for p in prompts]
        self.timing.params_max_tokens = [p.request.sampling_params.max_tokens for p in prompts]
        self.usage = UsageCounter(prompts)
        options = request.stream_options
        self.include_usage = options is not None and options.include_usage  # read by streams only
        self.include_continuous_usage = self.include_usage and options.continuous_usage_stats

    async def collect(self):
        raise NotImplementedError

    def stream_chunks(self) -> AsyncIterator:
        raise NotImplementedError

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """The output processor's deltas, with the request's sequences counted as in flight
        and its timing handed to the metrics hook at the end, on every path."""
        serving = self.serving
        num_seqs = sum(p.request.sampling_params.num_candidates for p in self.prompts)
        with serving.load.holding(num_seqs):
            try:
                choices = generate_choices(serving.engine_client, self.prompts, serving.tokenizer, self.settings,
                                           self.usage, self.timing)
                async with contextlib.aclosing(choices):
                    async for delta in choices:
                        yield delta
            finally:
                if serving.on_request_finished is not None:
                    serving.on_request_finished(self.timing)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
