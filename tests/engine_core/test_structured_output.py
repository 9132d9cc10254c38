"""Constrained generation in the engine, on a tiny random model: whatever the model prefers,
the output follows the grammar, and requests without one are untouched."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer

from engine_core.core import EngineCore
from engine_core.structured_output import StructuredOutputManager, apply_grammar_masks
from engine_helpers import TWO_CANDIDATES, collect
from ipc.config import EngineConfig
from ipc.messages import (
    EngineCoreRequest,
    FinishCause,
    FinishReason,
    SamplingParams,
    StructuredOutputKind,
    StructuredOutputSpec,
)
from ipc.shared.vocabulary import read_vocabulary
from tiny_llama import EOS_ID, IM_END_ID, write_tiny_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
PROMPT = [2, 100, 120, 140, 3]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_llama(path, "tied")
    return str(path)


@pytest.fixture
def core(tiny_dir) -> EngineCore:
    return EngineCore.from_config(EngineConfig(model=tiny_dir, served_model_name="tiny", kv_cache_gib=0.01))


def json_spec(schema) -> StructuredOutputSpec:
    return StructuredOutputSpec(StructuredOutputKind.JSON_SCHEMA, json.dumps(schema))


def add(core: EngineCore, request_id: str, **params) -> None:
    params.setdefault("max_tokens", 80)
    core.add_request(EngineCoreRequest(request_id, PROMPT, SamplingParams(**params), [EOS_ID, IM_END_ID], time.time()))


def run(core: EngineCore) -> dict[tuple[str, int], tuple[list[int], FinishReason, str | None]]:
    tokens: dict[tuple[str, int], list[int]] = {}
    ends = {}
    for _ in range(1000):
        for out in core.step():
            key = (out.request_id, out.index)
            tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                ends[key] = (out.finish_reason, out.error)
        if not core.has_unfinished_requests:
            return {key: (tokens.get(key, []), *ends[key]) for key in ends}
    raise AssertionError("the engine did not finish")


def decode(tiny_dir: str, token_ids: list[int]) -> str:
    return Tokenizer.from_file(f"{tiny_dir}/tokenizer.json").decode(token_ids, skip_special_tokens=False)


def test_json_schema_output_validates_and_ends_when_complete(core, tiny_dir):
    for k in range(4):
        add(core, f"json-{k}", temperature=1.0, seed=k, structured_output=json_spec(SCHEMA))
    add(core, "greedy-json", temperature=0.0, structured_output=json_spec(SCHEMA))
    results = run(core)
    for (request_id, _), (token_ids, reason, error) in results.items():
        assert reason == FinishReason.STOP, (request_id, error)
        text = decode(tiny_dir, token_ids)
        jsonschema.validate(json.loads(text), SCHEMA)
        # one layout: ", " and ": " separators, no other whitespace outside strings
        assert text.startswith('{"city": "') and '", "unit": "' in text, text


def test_unconstrained_requests_in_the_same_batch_are_untouched(core, tiny_dir):
    add(core, "free", temperature=0.0, max_tokens=12)
    alone = run(core)[("free", 0)][0]
    add(core, "free", temperature=0.0, max_tokens=12)
    add(core, "json", temperature=0.0, structured_output=json_spec(SCHEMA))
    add(core, "free-seeded", seed=7, max_tokens=12, **TWO_CANDIDATES)
    mixed = run(core)
    assert mixed[("free", 0)][0] == alone
    add(core, "free-seeded", seed=7, max_tokens=12, **TWO_CANDIDATES)
    assert run(core)[("free-seeded", 0)][0] == mixed[("free-seeded", 0)][0]


def test_regex_and_grammar_kinds(core, tiny_dir):
    add(core, "regex", temperature=1.0, seed=3,
        structured_output=StructuredOutputSpec(StructuredOutputKind.REGEX, r"[0-9]{3}-[a-z]{2}"))
    add(core, "lark", temperature=1.0, seed=4,
        structured_output=StructuredOutputSpec(StructuredOutputKind.GRAMMAR, 'start: ("yes" | "no") "!"'))
    add(core, "object", temperature=1.0, seed=5, max_tokens=200,
        structured_output=StructuredOutputSpec(StructuredOutputKind.JSON_OBJECT))
    results = run(core)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", decode(tiny_dir, results[("regex", 0)][0]))
    assert decode(tiny_dir, results[("lark", 0)][0]) in ("yes!", "no!")
    tokens, reason, _ = results[("object", 0)]
    text = decode(tiny_dir, tokens)
    if reason == FinishReason.STOP:  # a random model may write one long string until max_tokens
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_a_complete_grammar_is_the_finish_cause(core, tiny_dir):
    add(core, "lark", temperature=1.0, seed=4,
        structured_output=StructuredOutputSpec(StructuredOutputKind.GRAMMAR, 'start: ("yes" | "no") "!"'))
    outputs = collect(core)
    assert decode(tiny_dir, [t for o in outputs for t in o.new_token_ids]) in ("yes!", "no!")
    assert outputs[-1].finish_cause == FinishCause.GRAMMAR_END
    assert outputs[-1].finish_reason == FinishReason.STOP and outputs[-1].stop_reason is None


def test_n_candidates_each_follow_the_grammar(core, tiny_dir):
    add(core, "n3", temperature=1.0, seed=11, n=3, structured_output=json_spec(SCHEMA))
    results = run(core)
    assert len(results) == 3
    for token_ids, reason, _ in results.values():
        assert reason == FinishReason.STOP
        jsonschema.validate(json.loads(decode(tiny_dir, token_ids)), SCHEMA)


def test_a_spec_that_does_not_compile_is_an_error_output(core):
    add(core, "bad", structured_output=StructuredOutputSpec(StructuredOutputKind.REGEX, "[0-9"))
    (_, reason, error), = run(core).values()
    assert reason == FinishReason.ERROR and "does not compile" in error


def test_eos_is_allowed_only_when_the_grammar_accepts(tiny_dir):
    manager = StructuredOutputManager(lambda: read_vocabulary(tiny_dir), 300)
    matcher = manager.matcher_for(StructuredOutputSpec(StructuredOutputKind.REGEX, "ab?"))

    class Seq:
        grammar = matcher

        class request:
            eos_token_ids = frozenset([EOS_ID, IM_END_ID])

    def allowed() -> set[int]:
        logits = np.zeros((2, 300), dtype=np.float32)
        apply_grammar_masks(logits, [type("Free", (), {"grammar": None})(), Seq()])
        assert np.isfinite(logits[0]).all()  # the unconstrained row
        return set(np.flatnonzero(np.isfinite(logits[1])).tolist())

    a, b = 4 + ord("a"), 4 + ord("b")  # byte tokens
    assert allowed() == {a}
    assert matcher.accept(a)
    assert allowed() == {b, EOS_ID, IM_END_ID}  # "a" is complete; "ab" too
    assert matcher.accept(b) and matcher.is_terminated
