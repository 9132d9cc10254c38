"""`LLM`: offline generation in Python, with the server's request preparation and output processor.

An `LLM` starts the engine core as a child process (`engine.EngineProcess`) and drives it with
the frontend's `EngineClient` on an event loop thread of its own (`engine.LoopThread`). Each
prompt becomes the completions (or chat) request an HTTP client would send and is prepared by
the server's own `OpenAIServingCompletion` / `OpenAIServingChat`: the same checks, template,
tokenizing and max_tokens rules, the same `generate_choices` loop (detokenizing, stop strings).
All prompts of a call are submitted at once, so the engine batches them. The server's errors
become Python ones: a 400 is a `ValueError` with the server's message, a 503 a `RuntimeError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from frontend.admission import RequestLoad
from frontend.chat_template import ChatTemplate, load_chat_template
from frontend.config import FrontendConfig
from frontend.default_model import default_model_path
from frontend.engine_client import EngineClient, EngineDeadError
from frontend.output_processor import ChoiceDelta
from frontend.protocol import ChatCompletionRequest
from frontend.serving import GenerationJob, OpenAIServing
from frontend.serving_chat import OpenAIServingChat
from frontend.serving_completions import OpenAIServingCompletion
from frontend.serving_validation import MAX_LOGPROBS
from frontend.tokenizer import eos_token_ids, load_tokenizer
from furiosa_llm.engine import EngineProcess, LoopThread
from furiosa_llm.outputs import (
    BeamSearchOutput,
    BeamSearchSequence,
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from furiosa_llm.sampling_params import BeamSearchParams, SamplingParams, as_value_error
from ipc.config import EngineConfig
from ipc.messages import TokenLogprobs

# Nothing is refused for load here: a call's prompts all wait in the engine's queue.
_MAX_WAITING_SEQS = 1 << 30
_llm_ids = itertools.count()

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """An engine-core child process and the server's request handling, without HTTP.

    `model`: a GGUF file or Hugging Face directory (None: the embedded default model).
    `engine_args`: `EngineConfig`'s fields, as `furiosa-llm serve`'s flags (max_model_len,
    kv_cache_gib, max_num_seqs, max_num_batched_tokens, num_threads, block_size, activation_dtype, ...).
    `chat_template`: a template file, as `--chat-template`.
    `generation_config`: as `--generation-config`: "auto" (the model's generation_config.json or
    GGUF general.sampling.*), "vllm" (neutral) or a directory; as vLLM's `LLM`, those defaults
    make the `SamplingParams` used when a call passes none (`get_default_sampling_params`).
    """

    def __init__(self, model: str | None = None, *, chat_template: str | None = None,
                 served_model_name: str | None = None, log_level: str = "warning",
                 generation_config: str = "auto", **engine_args: Any) -> None:
        path = default_model_path() if model is None else os.path.abspath(model)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model artifact {model!r} does not exist")
        if generation_config not in ("auto", "vllm") and not os.path.isdir(generation_config):
            raise ValueError(f"generation_config {generation_config!r}: not 'auto', 'vllm' or a directory")
        name = served_model_name or os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
        try:
            engine_config = EngineConfig(model=path, served_model_name=name, log_level=log_level, **engine_args)
        except TypeError as exc:
            raise TypeError(f"LLM: {exc} (the engine's settings are {', '.join(EngineConfig.__struct_fields__)})") from None
        self._engine = EngineProcess(engine_config)
        self._loop = LoopThread(f"furiosa-llm-{next(_llm_ids)}")
        config = FrontendConfig(engine=engine_config, engine_pid=self._engine.pid, generation_config=generation_config,
                                max_waiting_requests=_MAX_WAITING_SEQS, disable_log_stats=True)
        self._client = EngineClient(config)
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._client, self._engine)
        try:
            self._start(config, chat_template)
        except BaseException:
            self.close()  # no engine outlives a failed start
            raise

    def _start(self, config: FrontendConfig, chat_template: str | None) -> None:
        self._loop.run(self._client.start())
        path = config.engine.model
        self.tokenizer = load_tokenizer(path)  # while the engine loads its weights
        try:
            self._loop.run(self._client.wait_ready())
        except EngineDeadError:
            reason = self._engine.startup_error() or self._client.dead_reason
            raise RuntimeError(f"the engine core could not start: {reason}") from None
        args = (config, self._client, self.tokenizer, eos_token_ids(self.tokenizer, path))
        load = RequestLoad.for_limits(max_num_seqs=config.engine.max_num_seqs, max_waiting_requests=_MAX_WAITING_SEQS)
        self._completions = OpenAIServingCompletion(*args, load=load)
        # the model's sampling defaults, as the server reads them, over vLLM's SamplingParams()
        self._default_sampling_params = SamplingParams(**self._completions.generation_defaults)
        self._chat = OpenAIServingChat(*args, load=load, chat_template=load_chat_template(chat_template, self.tokenizer))

    # -- lifetime

    @property
    def engine_pid(self) -> int:
        return self._engine.pid

    def close(self) -> None:
        """Stop the engine core; idempotent (it also happens on garbage collection and exit)."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The parameters a call without `sampling_params` uses: the model's sampling defaults
        (per `generation_config`) over vLLM's `SamplingParams()`."""
        return dataclasses.replace(self._default_sampling_params)

    def _params_or_default(self, params):
        return self.get_default_sampling_params() if params is None else params

    # -- generation

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in input order; all prompts run in one batch."""
        prompt_list = _prompt_list(prompts)
        params_list = _params_list(self._params_or_default(sampling_params), len(prompt_list))
        return self._run_all([self._complete(p, sp) for p, sp in zip(prompt_list, params_list)], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """One `RequestOutput` per conversation; `chat_template` is a template's text."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params_list = _params_list(self._params_or_default(sampling_params), len(conversations))
        serving = self._chat
        if chat_template is not None:
            template = ChatTemplate(chat_template, bos_token=getattr(self.tokenizer, "bos_token", None),
                                    eos_token=getattr(self.tokenizer, "eos_token", None))
            serving = OpenAIServingChat(self._chat.config, self._client, self.tokenizer, self._chat.eos_token_ids,
                                        load=self._chat.load, chat_template=template)
        options = dict(tools=tools, tool_choice="none" if tools else None,
                       add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                       chat_template_kwargs=chat_template_kwargs)
        return self._run_all([self._chat_one(serving, c, sp, options) for c, sp in zip(conversations, params_list)],
                             use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`: every prompt's `beam_width` best beams, best first."""
        outputs = self.generate(prompts, params.to_sampling_params(), use_tqdm=False)
        return [BeamSearchOutput([BeamSearchSequence(o.prompt_token_ids + c.token_ids, c.text, c.cumulative_logprob,
                                                     c.finish_reason) for c in o.outputs]) for o in outputs]

    # -- internals (coroutines run on the loop thread)

    def _run_all(self, coros: list, use_tqdm: bool) -> list[RequestOutput]:
        futures = [self._loop.submit(c) for c in coros]
        try:
            with _progress_bar(len(futures), use_tqdm) as bar:
                for future in concurrent.futures.as_completed(futures):
                    output = future.result()
                    if bar is not None:
                        bar.update_output(output)
            return [f.result() for f in futures]
        finally:
            for future in futures:
                future.cancel()  # after an error: stop (and abort in the engine) the others

    async def _complete(self, prompt: PromptType, params: SamplingParams,
                        on_update: Callable[[RequestOutput], None] | None = None) -> RequestOutput:
        if isinstance(prompt, dict):
            prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
        with as_value_error():
            job = await self._completions.prepare(params.to_request_fields(prompt=prompt))
            if params.prompt_logprobs is not None:
                _check_num_logprobs(params.prompt_logprobs, "prompt_logprobs")
                engine_request = job.prompts[0].request
                engine_request.sampling_params = msgspec.structs.replace(
                    engine_request.sampling_params, prompt_logprobs=params.prompt_logprobs)
            return await _collect(job, self._completions, on_update)

    async def _chat_one(self, serving: OpenAIServingChat, conversation: list[dict], params: SamplingParams,
                        options: dict) -> RequestOutput:
        fields = {k: v for k, v in msgspec.structs.asdict(params.to_request_fields()).items()
                  if k not in ("prompt", "echo", "suffix")}
        fields.update(logprobs=params.logprobs is not None, top_logprobs=params.logprobs, **options)
        fields = {k: v for k, v in fields.items() if v is not None}
        try:
            request = msgspec.convert(dict(fields, messages=conversation), ChatCompletionRequest)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
        with as_value_error():
            return await _collect(await serving.prepare(request), serving)


async def _collect(job: GenerationJob, serving: OpenAIServing,
                   on_update: Callable[[RequestOutput], None] | None = None) -> RequestOutput:
    """Reads the output processor's deltas of a one-prompt job into a RequestOutput;
    `on_update` gets a copy of the output so far after each delta (AsyncLLM's stream)."""
    prompt = job.prompts[0]
    num_choices = prompt.request.sampling_params.n
    output = RequestOutput(prompt.request.request_id, prompt.prompt_text, list(prompt.request.prompt_token_ids),
                           None, [CompletionOutput(j, "", [], None, None) for j in range(num_choices)], finished=False)
    texts: list[list[str]] = [[] for _ in range(num_choices)]
    wants_logprobs = prompt.request.sampling_params.logprobs is not None
    async with contextlib.aclosing(job.deltas()) as deltas:
        async for delta in deltas:
            choice = output.outputs[delta.index - prompt.first_choice_index]
            texts[choice.index].append(delta.text)
            choice.token_ids.extend(delta.token_ids)
            if wants_logprobs:
                _add_logprobs(choice, delta, serving)
            if delta.prompt_logprobs is not None:
                output.prompt_logprobs = [None if e is None else _position(e, serving) for e in delta.prompt_logprobs]
            if delta.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            if on_update is not None:
                on_update(_snapshot(output, texts))
    for choice, parts in zip(output.outputs, texts):
        choice.text = "".join(parts)
    output.finished = True
    timing = job.timing
    output.metrics = RequestMetrics(timing.arrival_time, timing.first_token_time, timing.finish_time,
                                    job.usage.num_completion_tokens)
    return output


def _snapshot(output: RequestOutput, texts: list[list[str]]) -> RequestOutput:
    choices = [dataclasses.replace(c, text="".join(parts), token_ids=list(c.token_ids),
                                   logprobs=None if c.logprobs is None else list(c.logprobs))
               for c, parts in zip(output.outputs, texts)]
    return dataclasses.replace(output, outputs=choices, finished=all(c.finish_reason for c in choices))


class AsyncLLM:
    """`LLM` for asyncio code: `generate` streams one prompt's partial `RequestOutput`s (each
    holds everything so far; the last has `finished` set). The engine and the server's code run
    on the `LLM`'s own loop thread; outputs cross to the caller's loop."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm = LLM(model, **kwargs)

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def close(self) -> None:
        self.llm.close()

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()

        def put(item: RequestOutput | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        params = self.llm._params_or_default(sampling_params)
        future = self.llm._loop.submit(self.llm._complete(prompt, params, put))
        future.add_done_callback(lambda _: put(None))
        try:
            while (item := await queue.get()) is not None:
                yield item
            future.result()  # the request's error, if any
        finally:
            future.cancel()  # a consumer that stops early aborts the request in the engine


def _add_logprobs(choice: CompletionOutput, delta: ChoiceDelta, serving: OpenAIServing) -> None:
    if choice.logprobs is None:
        choice.logprobs, choice.cumulative_logprob = [], 0.0
    for entry in delta.logprobs or []:
        choice.logprobs.append(_position(entry, serving))
        choice.cumulative_logprob += entry.logprob


def _position(entry: TokenLogprobs, serving: OpenAIServing) -> PositionLogprobs:
    text_of = serving.token_strings.text_of
    position = {entry.token_id: Logprob(entry.logprob, entry.rank, text_of(entry.token_id))}
    for rank, (token_id, logprob) in enumerate(zip(entry.top_token_ids, entry.top_logprobs), start=1):
        position.setdefault(token_id, Logprob(logprob, rank, text_of(token_id)))
    return position


def _check_num_logprobs(value: int, name: str) -> None:
    if not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}.")


def _prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt of token ids
    return prompts


def _params_list(params, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise ValueError(f"{len(params)} SamplingParams for {num_prompts} prompts: give one, or one per prompt.")
    return params


class _Progress:
    """vLLM's bar: prompts done, with input and output token throughput."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.num_input_tokens = 0
        self.num_output_tokens = 0

    def update_output(self, output: RequestOutput) -> None:
        self.num_input_tokens += len(output.prompt_token_ids)
        self.num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = self.bar.format_dict["elapsed"] or 1e-9
        self.bar.postfix = (f"est. speed input: {self.num_input_tokens / elapsed:.2f} toks/s, "
                            f"output: {self.num_output_tokens / elapsed:.2f} toks/s")
        self.bar.update(1)


@contextlib.contextmanager
def _progress_bar(total: int, use_tqdm: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if not use_tqdm or tqdm is None:
        yield None
        return
    with tqdm(total=total, desc="Processed prompts", dynamic_ncols=True) as bar:
        yield _Progress(bar)


def _shutdown(loop: LoopThread, client: EngineClient, engine: EngineProcess) -> None:
    """Close the sockets, stop the loop thread, stop the engine child (SIGTERM, then SIGKILL)."""
    try:
        if not loop.loop.is_closed() and loop.thread.is_alive():
            loop.submit(client.shutdown()).result(timeout=10)
    except Exception:  # the loop may already be gone at interpreter exit; the engine still stops
        pass
    loop.stop()
    engine.stop()
