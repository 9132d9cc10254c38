"""Helpers for engine tests: build requests, step an EngineCore to the end."""

from __future__ import annotations

import time

from engine_core.core import EngineCore
from ipc.messages import EngineCoreRequest, FinishReason, SamplingParams

SMOLLM2_EOS = [2]

# Sampling for comparing seeded draws between two computations that differ in the last bits
# (another batch shape, chunking, a cached prefix, another CPU's BLAS kernel). Over the whole
# vocabulary, neighbouring tokens' boundaries in the cumulative distribution lie ~1e-5 apart and
# such a difference moves a draw to the next id on some CPU (seen: 44028 vs 44029 on an AMD EPYC
# running OpenBLAS' Haswell kernels). Between two candidates a draw flips only if it lands
# within ~1e-6 of their one boundary.
TWO_CANDIDATES = dict(temperature=1.0, top_k=2)


def request(request_id: str, prompt: list[int], **params) -> EngineCoreRequest:
    params.setdefault("max_tokens", 8)
    return EngineCoreRequest(request_id, prompt, SamplingParams(**params), SMOLLM2_EOS, time.time())


def run_to_completion(core: EngineCore, max_steps: int = 100_000) -> dict[str, dict[int, list[int]]]:
    """Step until every request ends; the tokens of each (request, sequence index)."""
    tokens: dict[str, dict[int, list[int]]] = {}
    finished: dict[tuple[str, int], FinishReason] = {}
    for _ in range(max_steps):
        for out in core.step():
            tokens.setdefault(out.request_id, {}).setdefault(out.index, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finished[(out.request_id, out.index)] = out.finish_reason
        if not core.has_unfinished_requests:
            return tokens
    raise AssertionError("the engine did not finish its requests")


def assert_all_blocks_free(core: EngineCore) -> None:
    """Every KV block is back in the pool and nothing is left queued."""
    pool = core.kv.pool
    assert pool.num_free == pool.num_blocks
    assert not any(pool.ref_counts)
    assert not core.scheduler.running and not core.scheduler.waiting and not core.requests
