"""`SamplingParams` and `BeamSearchParams` with vLLM's fields and defaults.

They are checked by the server's own code: the fields become the same request fields an HTTP
request has (`to_request_fields`), and `frontend.serving_validation` raises the server's 400,
which becomes a `ValueError` with the same message here.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import msgspec

from frontend.errors import OpenAIError
from frontend.serving_validation import check_sampling_fields


@contextlib.contextmanager
def as_value_error() -> Iterator[None]:
    """The server's 400s (invalid values) as ValueError with the server's message."""
    try:
        yield
    except OpenAIError as exc:
        if exc.status == 400:
            raise ValueError(exc.message) from None
        raise RuntimeError(exc.message) from None


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        # The checks that need no model; the model's limits are checked when generating.
        with as_value_error():
            check_sampling_fields(self.to_request_fields(), max_num_seqs=sys.maxsize)

    def to_request_fields(self, **extra):
        """The completions request an HTTP client would send for these parameters."""
        from frontend.protocol import CompletionRequest

        fields = {k: v for k, v in asdict(self).items() if k != "prompt_logprobs"}
        if self.logit_bias is not None:
            fields["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        fields.update(extra)
        fields.setdefault("prompt", "")
        try:  # decoded as the server decodes a JSON body: types checked, ints as floats
            return msgspec.convert(fields, CompletionRequest)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None


@dataclass
class BeamSearchParams:
    """vLLM's beam search settings: `beam_width` beams, all of them returned."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(n=self.beam_width, use_beam_search=True, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos, length_penalty=self.length_penalty,
                              include_stop_str_in_output=self.include_stop_str_in_output)
