"""EngineCores over the tiny random checkpoints of tests/tiny_llama.py: milliseconds per step,
for tests that exercise the engine's logic rather than a real model's outputs."""

from __future__ import annotations

import time
from pathlib import Path

from engine_core.core import EngineCore
from engine_core.loader import load_artifact
from engine_core.model import KVCache
from ipc.config import ServeConfig
from ipc.messages import EngineCoreRequest, SamplingParams
from tiny_llama import EOS_ID, write_tiny_llama


def write_tiny_model(directory: Path, variant: str = "tied") -> str:
    write_tiny_llama(directory, variant)
    return str(directory)


def tiny_config(model_dir: str, *, num_blocks: int = 64, **overrides) -> ServeConfig:
    """A ServeConfig whose KV cache holds exactly num_blocks blocks of the tiny model."""
    model_config, _ = load_artifact(model_dir)
    block_size = overrides.get("block_size", 16)
    gib = num_blocks * KVCache.bytes_per_block(model_config, block_size) / 2**30
    return ServeConfig(model=model_dir, served_model_name="tiny", kv_cache_gib=gib, **overrides)


def tiny_core(model_dir: str, **overrides) -> EngineCore:
    core = EngineCore.from_config(tiny_config(model_dir, **overrides))
    assert core.num_blocks == overrides.get("num_blocks", 64)
    return core


def tiny_request(request_id: str, prompt: list[int], *, eos_token_ids: list[int] = (EOS_ID,),
                 **params) -> EngineCoreRequest:
    params.setdefault("max_tokens", 8)
    return EngineCoreRequest(request_id, list(prompt), SamplingParams(**params), list(eos_token_ids), time.time())


def collect(core: EngineCore, max_steps: int = 10_000) -> list:
    """Step until every request ends; every output in order."""
    outputs = []
    for _ in range(max_steps):
        outputs += core.step()
        if not core.has_unfinished_requests:
            return outputs
    raise AssertionError("the engine did not finish its requests")
