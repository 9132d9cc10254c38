"""The Python API: `from furiosa_llm import LLM, SamplingParams`.

A thin face over the server's own parts: `LLM` runs the engine core as a child process over the
same ZeroMQ contract and prepares requests and reads outputs with the frontend's code
(`frontend.serving_*`, `frontend.output_processor`), so offline results match the server's.
"""

from furiosa_llm.llm import LLM, AsyncLLM
from furiosa_llm.outputs import (
    BeamSearchOutput,
    BeamSearchSequence,
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
)
from furiosa_llm.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "SamplingParams",
    "BeamSearchParams",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "Logprob",
    "BeamSearchOutput",
    "BeamSearchSequence",
]
