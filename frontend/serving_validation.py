"""Request fields -> `SamplingParams` the engine can trust, with a 400 naming the field.

The ranges follow OpenAI, and vLLM for its extensions (top_k, min_p, repetition_penalty,
min_tokens, beam search). Checks that need the model (vocabulary, context length) take its
limits as arguments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from frontend.config import DEFAULT_MAX_LOGPROBS
from frontend.errors import bad_request
from frontend.protocol import SamplingRequestFields
from ipc.messages import SamplingParams, StructuredOutputSpec

MAX_LOGPROBS = DEFAULT_MAX_LOGPROBS  # without a config (the Python API); the server's is --max-logprobs
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class TextSettings:
    """What the frontend itself applies to a sequence's text (the engine never sees text)."""

    stop: list[str]
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    min_tokens: int = 0  # stop strings count only once this many tokens exist, as in vLLM


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise bad_request(message, param=param)


def check_num_logprobs(value: int | None, param: str, max_logprobs: int) -> None:
    """A requested number of logprobs: 0 (the chosen token's only) up to the server's limit."""
    _check(value is None or 0 <= value <= max_logprobs, param,
           f"{param} must be in [0, {max_logprobs}] (the server's --max-logprobs), got {value}.")


def check_prompt_logprobs(request: SamplingRequestFields, max_logprobs: int) -> None:
    check_num_logprobs(request.prompt_logprobs, "prompt_logprobs", max_logprobs)
    _check(request.prompt_logprobs is None or not request.stream, "prompt_logprobs",
           "prompt_logprobs are not available when stream is true (as in vLLM).")


def check_sampling_fields(request: SamplingRequestFields, *, max_num_seqs: int) -> None:
    """Range checks that do not depend on the prompt."""
    _check(request.n >= 1, "n", f"n must be at least 1, got {request.n}.")
    _check(request.cache_salt != "", "cache_salt", "cache_salt must be a non-empty string when given.")
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
    lp = request.length_penalty
    _check(lp is None or -10.0 <= lp <= 10.0, "length_penalty", f"length_penalty must be in [-10, 10], got {lp}.")
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
    stops = [stop] if isinstance(stop, str) else stop or []
    _check("" not in stops, "stop", "stop cannot contain an empty string.")  # as vLLM says


# Below this, dividing float32 logits by the temperature overflows; vLLM treats it as greedy too.
_MIN_SAMPLING_TEMPERATURE = 1e-5


def _effective_temperature(temperature: float | None, beam: bool) -> float:
    if beam or temperature is None:
        return 1.0
    return 0.0 if temperature < _MIN_SAMPLING_TEMPERATURE else temperature


def stop_strings(request: SamplingRequestFields) -> list[str]:
    stop = request.stop
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def text_settings(request: SamplingRequestFields) -> TextSettings:
    return TextSettings(
        stop=stop_strings(request),
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        min_tokens=request.min_tokens,
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


MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias is [-100, 100]
_TOKEN_ID = re.compile(r"-?[0-9]+")


def resolve_logit_bias(request: SamplingRequestFields, vocab_size: int) -> dict[int, float] | None:
    """`logit_bias` with token ids as ints; None when absent or empty."""
    if not request.logit_bias:
        return None
    result = {}
    for key, bias in request.logit_bias.items():
        _check(
            _TOKEN_ID.fullmatch(key) is not None,
            "logit_bias",
            f"logit_bias keys must be token ids (integers written as strings), got {key!r}.",
        )
        token_id = int(key)
        _check(
            0 <= token_id < vocab_size,
            "logit_bias",
            f"logit_bias: {token_id} is not a token id (the vocabulary has {vocab_size}).",
        )
        _check(
            -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
            "logit_bias",
            f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}.",
        )
        result[token_id] = bias
    return result


def make_sampling_params(
    request: SamplingRequestFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    logit_bias: dict[int, float] | None = None,
    structured_output: StructuredOutputSpec | None = None,
    defaults: Mapping[str, float | int] | None = None,
) -> SamplingParams:
    """`defaults` (the model's, from `--generation-config`) fill the sampling fields the request
    left out (null or absent); a value the request sets wins."""
    _check(
        structured_output is None or not request.use_beam_search,
        "use_beam_search",
        "Beam search cannot be combined with constrained output (structured outputs, response_format or a "
        "required tool call).",
    )
    _check(
        request.min_tokens <= max_tokens,
        "min_tokens",
        f"min_tokens ({request.min_tokens}) must not exceed the maximum number of tokens ({max_tokens}).",
    )
    seed = request.seed
    if seed is not None and seed < 0:
        seed %= 2**64  # the engine's generators take unsigned seeds; still reproducible
    beam = request.use_beam_search
    defaults = defaults or {}

    def field(name: str):
        value = getattr(request, name)
        return defaults.get(name) if value is None else value

    temperature, top_p, top_k, min_p = field("temperature"), field("top_p"), field("top_k"), field("min_p")
    repetition_penalty = field("repetition_penalty")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_effective_temperature(temperature, beam),
        top_p=1.0 if beam or top_p is None else top_p,
        top_k=0 if beam or top_k is None or top_k < 0 else top_k,
        min_p=0.0 if beam or min_p is None else min_p,
        seed=seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
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
        cache_salt=request.cache_salt,
        logit_bias=logit_bias,
        structured_output=structured_output,
    )
