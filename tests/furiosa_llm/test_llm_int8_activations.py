"""`furiosa_llm.LLM(activation_dtype="int8")`: the keyword reaches the engine process, which then
generates sensible greedy text; an unknown value is a start-up error naming the choices."""

from __future__ import annotations

import pytest

from furiosa_llm import LLM, SamplingParams


def test_int8_activations_generate_sensible_greedy_text():
    with LLM(kv_cache_gib=0.25, activation_dtype="int8") as llm:
        output = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert output.outputs[0].text.startswith(" 6, 7, 8")


def test_an_unknown_activation_dtype_is_a_start_up_error():
    with pytest.raises(RuntimeError, match="could not start: .*activation dtype must be one of"):
        LLM(kv_cache_gib=0.25, activation_dtype="int4")
