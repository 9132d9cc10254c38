"""Specs are checked without a vocabulary: what compiles, and clear reasons for what does not."""

from __future__ import annotations

import json

import pytest

from ipc.messages import SamplingParams, StructuredOutputKind, StructuredOutputSpec, decode_to_engine, encode
from ipc.messages import EngineCoreRequest
from ipc.shared.structured_output import StructuredOutputError, check_structured_output

K = StructuredOutputKind


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutputSpec(K.JSON_OBJECT),
        StructuredOutputSpec(K.JSON_SCHEMA, json.dumps({
            "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/point"}, "tag": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                           "code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        })),
        StructuredOutputSpec(K.REGEX, r"\d{3}-\d{4}"),
        StructuredOutputSpec(K.GRAMMAR, 'start: "a" | "b"'),
    ],
)
def test_supported_specs_compile(spec):
    check_structured_output(spec)


@pytest.mark.parametrize(
    "spec, reason",
    [
        (StructuredOutputSpec(K.JSON_SCHEMA, "{not json"), "not valid JSON"),
        (StructuredOutputSpec(K.JSON_SCHEMA, "[1, 2]"), "must be an object"),
        (StructuredOutputSpec(K.JSON_SCHEMA, json.dumps({"type": "array", "uniqueItems": True})), "uniqueItems"),
        (StructuredOutputSpec(K.JSON_SCHEMA, json.dumps({"type": "strong"})), "strong"),
        (StructuredOutputSpec(K.JSON_SCHEMA, json.dumps({"$ref": "https://example.com/s.json"})), "example.com"),
        (StructuredOutputSpec(K.REGEX, "[0-9"), "unclosed"),
        (StructuredOutputSpec(K.GRAMMAR, "start: missing"), "missing"),
    ],
)
def test_unsupported_specs_say_why(spec, reason):
    with pytest.raises(StructuredOutputError, match=reason):
        check_structured_output(spec)


def test_structured_output_crosses_the_socket():
    spec = StructuredOutputSpec(K.REGEX, "a+")
    message = EngineCoreRequest("r", [1], SamplingParams(max_tokens=4, structured_output=spec), [2], 0.0)
    assert decode_to_engine(encode(message)).sampling_params.structured_output == spec
    plain = EngineCoreRequest("r", [1], SamplingParams(max_tokens=4), [2], 0.0)
    assert decode_to_engine(encode(plain)).sampling_params.structured_output is None
