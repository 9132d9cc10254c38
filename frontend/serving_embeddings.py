"""POST /v1/embeddings (`--runner pooling`): inputs in, one vector per input out.

Each input (a string, or token ids) becomes a pooling engine request; all of a request's inputs
go to the engine at once, which prefills them together and returns each one's pooled,
L2-normalized final hidden state (float32 bytes; the engine's `--pooler-type` says how it
pools). `dimensions` keeps the first N components and renormalizes them (Matryoshka style);
`encoding_format` "base64" is the little-endian float32 bytes in base64, as OpenAI sends them.
An input longer than the model's context is a 400, unless `truncate_prompt_tokens` says to keep
its last N tokens (vLLM's rule; -1: the context length).
"""

from __future__ import annotations

import array
import base64
import contextlib
import math
import sys
import time

from frontend.engine_client import EngineDeadError, ServerStoppingError
from frontend.errors import bad_request, engine_unavailable
from frontend.metrics import RequestTiming
from frontend.output_processor import openai_finish_reason
from frontend.protocol_embeddings import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from frontend.serving import OpenAIServing, random_id
from frontend.tokenizer import PromptTooLongError, encode_prompt
from ipc.messages import EngineCoreRequest, EngineReady, PoolingParams, SamplingParams

# OpenAI's bound on the inputs of one request; admission (`RequestLoad`) bounds them too.
MAX_INPUTS_PER_REQUEST = 2048
_NO_SAMPLING = SamplingParams(max_tokens=0)


class OpenAIServingEmbedding(OpenAIServing):
    RUNNER = "pooling"

    async def create_embedding(self, request: EmbeddingRequest) -> EmbeddingResponse:
        arrival_time = time.time()
        self.check_model(request.model)
        info = self.engine_info()
        inputs = _split_inputs(request.input)
        _check_dimensions(request.dimensions, info.hidden_size)
        max_num_tokens = _max_input_tokens(request.truncate_prompt_tokens, info.max_model_len)
        self.load.check(len(inputs))  # before tokenizing, the costly part
        token_ids = [await self._input_token_ids(item, request, info, max_num_tokens) for item in inputs]
        self.load.check(len(inputs))
        response_id = random_id("embd")
        requests = [
            EngineCoreRequest(f"{response_id}-{i}", ids, _NO_SAMPLING, [], arrival_time, pooling=PoolingParams())
            for i, ids in enumerate(token_ids)
        ]
        vectors = await self._pool(requests, RequestTiming(arrival_time))
        data = [EmbeddingData(index=i, embedding=_encode(_truncated(vectors[r.request_id], request.dimensions),
                                                          request.encoding_format))
                for i, r in enumerate(requests)]
        num_tokens = sum(map(len, token_ids))
        return EmbeddingResponse(id=response_id, model=self.model_name, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))

    async def _input_token_ids(self, item: str | list[int], request: EmbeddingRequest, info: EngineReady,
                               max_num_tokens: int | None) -> list[int]:
        if isinstance(item, str):
            if not item:
                raise bad_request("input must not contain an empty string.", param="input")
            try:  # without truncation, refused early when certainly too long (see encode_prompt)
                ids = await self.run_blocking(
                    encode_prompt, self.tokenizer, item, add_special_tokens=request.add_special_tokens,
                    max_num_tokens=info.max_model_len if max_num_tokens is None else math.inf)
            except PromptTooLongError as exc:
                raise _too_long(info.max_model_len, f"at least {exc.min_num_tokens}") from None
        else:
            if not item:
                raise bad_request("input must not contain an empty list of token ids.", param="input")
            for token_id in item:
                if not 0 <= token_id < info.vocab_size:
                    raise bad_request(f"input: {token_id} is not a token id (the vocabulary has {info.vocab_size}).",
                                      param="input")
            ids = list(item)
        if max_num_tokens is not None:
            return ids[-max_num_tokens:]
        if len(ids) > info.max_model_len:
            raise _too_long(info.max_model_len, str(len(ids)))
        return ids

    async def _pool(self, requests: list[EngineCoreRequest], timing: RequestTiming) -> dict[str, bytes]:
        """Every request's pooled vector; the engine's error for any of them is the API's error.
        Cancelled (the client went away), the engine client aborts what is still running."""
        vectors: dict[str, bytes] = {}
        timing.num_prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        with self.load.holding(len(requests)):
            try:
                async with contextlib.aclosing(self.engine_client.generate(requests)) as outputs:
                    async for output in outputs:
                        if output.queue_time_s is not None:
                            timing.queue_times_s.append(output.queue_time_s)
                        if output.finish_reason is not None:
                            timing.finish_reasons.append(openai_finish_reason(output))  # raises on error
                            vectors[output.request_id] = output.pooled
                timing.first_token_time = timing.finish_time = time.time()
            except EngineDeadError as exc:
                raise engine_unavailable(f"The engine is not running: {exc}", code="engine_dead") from None
            except ServerStoppingError as exc:
                raise engine_unavailable(f"The server is shutting down ({exc}); retry the request.",
                                         code="server_shutting_down") from None
            finally:
                if timing.finish_time is None:
                    timing.finish_time = time.time()
                    timing.finish_reasons += ["error"] * (len(requests) - len(timing.finish_reasons))
                if self.on_request_finished is not None:
                    self.on_request_finished(timing)
        return vectors


def _split_inputs(value: str | list) -> list[str | list[int]]:
    """A string, strings, token ids, or token-id lists (not mixed)."""
    if isinstance(value, str):
        if not value:
            raise bad_request("input must not be an empty string.", param="input")
        return [value]
    if not value:
        raise bad_request("input must not be an empty list.", param="input")
    if all(isinstance(v, int) for v in value):
        return [list(value)]
    if len(value) > MAX_INPUTS_PER_REQUEST:
        raise bad_request(f"A request can have at most {MAX_INPUTS_PER_REQUEST} inputs, got {len(value)}; "
                          "split them over several requests.", param="input")
    if all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
        return list(value)
    raise bad_request("input must be a string, a list of strings, a list of token ids, or a list of "
                      "token-id lists; its elements cannot be mixed.", param="input")


def _too_long(max_model_len: int, num_tokens: str):
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens, and an input has {num_tokens} "
        "tokens. Shorten it, or set truncate_prompt_tokens to keep its last tokens.",
        param="input",
    )


def _check_dimensions(dimensions: int | None, hidden_size: int) -> None:
    if dimensions is not None and not 1 <= dimensions <= hidden_size:
        raise bad_request(f"dimensions must be between 1 and {hidden_size} (the model's embedding size), "
                          f"got {dimensions}.", param="dimensions")


def _max_input_tokens(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """How many tokens of each input to keep (its last ones); None: no truncation."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens == -1:
        return max_model_len
    if not 1 <= truncate_prompt_tokens <= max_model_len:
        raise bad_request(f"truncate_prompt_tokens must be -1 (the context length) or between 1 and "
                          f"{max_model_len}, got {truncate_prompt_tokens}.", param="truncate_prompt_tokens")
    return truncate_prompt_tokens


def _truncated(vector: bytes, dimensions: int | None) -> array.array:
    """The engine's float32 little-endian vector; with `dimensions`, its first N renormalized."""
    values = array.array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    if dimensions is None or dimensions == len(values):
        return values
    head = values[:dimensions]
    norm = math.sqrt(math.fsum(v * v for v in head))
    return array.array("f", (v / norm for v in head)) if norm > 0 else head


def _encode(values: array.array, encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return values.tolist()
    if sys.byteorder == "big":
        values = array.array("f", values)
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")
