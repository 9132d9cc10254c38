"""Helpers for engine tests: requests, EngineCores over the tiny random checkpoints of
tests/tiny_llama.py (milliseconds per step, for the engine's logic rather than a real model's
outputs), stepping an EngineCore to the end, and checking that it let go of everything."""

from __future__ import annotations

import time
from pathlib import Path

from engine_core.core import EngineCore
from engine_core.loader import load_artifact
from engine_core.model import KVCache
from ipc.config import EngineConfig
from ipc.messages import EngineCoreOutput, EngineCoreRequest, SamplingParams
from tiny_llama import EOS_ID, write_tiny_llama

SMOLLM2_EOS = [2]

# Sampling for comparing seeded draws between two computations that differ in the last bits
# (another batch shape, chunking, a cached prefix, another CPU's BLAS kernel). Over the whole
# vocabulary, neighbouring tokens' boundaries in the cumulative distribution lie ~1e-5 apart and
# such a difference moves a draw to the next id on some CPU (seen: 44028 vs 44029 on an AMD EPYC
# running OpenBLAS' Haswell kernels). Between two candidates a draw flips only if it lands
# within ~1e-6 of their one boundary.
TWO_CANDIDATES = dict(temperature=1.0, top_k=2)


def request(request_id: str, prompt: list[int], **params) -> EngineCoreRequest:
    """A request to SmolLM2 (the default model)."""
    params.setdefault("max_tokens", 8)
    return EngineCoreRequest(request_id, prompt, SamplingParams(**params), SMOLLM2_EOS, time.time())


def write_tiny_model(directory: Path, variant: str = "tied") -> str:
    write_tiny_llama(directory, variant)
    return str(directory)


def tiny_config(model_dir: str, *, num_blocks: int = 64, **overrides) -> EngineConfig:
    """An EngineConfig whose KV cache holds exactly num_blocks blocks of the tiny model."""
    model_config, _ = load_artifact(model_dir)
    block_size = overrides.get("block_size", 16)
    gib = num_blocks * KVCache.bytes_per_block(model_config, block_size) / 2**30
    return EngineConfig(model=model_dir, served_model_name="tiny", kv_cache_gib=gib, **overrides)


def tiny_core(model_dir: str, **overrides) -> EngineCore:
    core = EngineCore.from_config(tiny_config(model_dir, **overrides))
    assert core.num_blocks == overrides.get("num_blocks", 64)
    return core


def tiny_request(request_id: str, prompt: list[int], *, eos_token_ids: list[int] = (EOS_ID,),
                 **params) -> EngineCoreRequest:
    """A request to a tiny model."""
    params.setdefault("max_tokens", 8)
    return EngineCoreRequest(request_id, list(prompt), SamplingParams(**params), list(eos_token_ids), time.time())


def collect(core: EngineCore, max_steps: int = 10_000) -> list[EngineCoreOutput]:
    """Step until every request ends; every output in order."""
    outputs = []
    for _ in range(max_steps):
        outputs += core.step()
        if not core.has_unfinished_requests:
            return outputs
    raise AssertionError("the engine did not finish its requests")


def run_to_completion(core: EngineCore, max_steps: int = 100_000) -> dict[str, dict[int, list[int]]]:
    """Step until every request ends; the tokens of each (request, sequence index)."""
    tokens: dict[str, dict[int, list[int]]] = {}
    for output in collect(core, max_steps):
        tokens.setdefault(output.request_id, {}).setdefault(output.index, []).extend(output.new_token_ids)
    return tokens


def assert_all_blocks_free(core: EngineCore) -> None:
    """Every KV block is back in the pool and nothing is left queued."""
    pool = core.kv.pool
    assert pool.num_free == pool.num_blocks
    assert not any(pool.ref_counts)
    assert not core.scheduler.running and not core.scheduler.waiting and not core.requests
