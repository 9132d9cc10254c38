"""Greedy decoding of the default model equals Hugging Face transformers + PyTorch's.

The golden file comes from scripts/make_golden.py (transformers on the same GGUF, fp32).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from engine_core.model import rope_inv_freq
from engine_helpers import request, run_to_completion

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "smollm2_greedy.json").read_text())


def test_greedy_tokens_match_transformers_for_every_prompt_batched(make_core):
    core = make_core()
    cases = GOLDEN["cases"]
    assert len(cases) >= 5 and all(len(c["greedy_token_ids"]) >= 48 for c in cases)
    for i, case in enumerate(cases):
        core.add_request(request(str(i), case["prompt_token_ids"], temperature=0.0, ignore_eos=True,
                                 max_tokens=len(case["greedy_token_ids"])))
    tokens = run_to_completion(core)
    for i, case in enumerate(cases):
        assert tokens[str(i)][0] == case["greedy_token_ids"], case["name"]


def test_last_prompt_logits_match_transformers(make_core):
    """A direct look at the numbers: the first logits at the last prompt position."""
    core = make_core()
    case = GOLDEN["cases"][0]
    core.add_request(request("a", case["prompt_token_ids"], max_tokens=1, logprobs=0))
    scheduled = core.scheduler.schedule()
    result = core.runner.execute(scheduled, {})
    expected = np.array(GOLDEN["last_logits_sample"], dtype=np.float32)
    got = result.sample_logits[0, : len(expected)]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_rope_default_frequencies(smollm2):
    config, _ = smollm2
    inv_freq = rope_inv_freq(config)
    assert inv_freq.shape == (config.head_dim // 2,)
    assert inv_freq[0] == 1.0 and np.isclose(inv_freq[-1], config.rope_theta ** (-(config.head_dim - 2) / config.head_dim))
