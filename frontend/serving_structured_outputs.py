"""A request's output constraint -> the engine's `StructuredOutputSpec`, on both endpoints.

A request names at most one constraint, in one of three spellings:

| request field                                   | engine spec                                   |
| ----------------------------------------------- | --------------------------------------------- |
| `structured_outputs.json`, `guided_json`,       | JSON_SCHEMA                                   |
| `response_format` json_schema                   |                                               |
| `structured_outputs.json_object`,               | JSON_OBJECT                                   |
| `response_format` json_object                   |                                               |
| `structured_outputs.regex`, `guided_regex`      | REGEX (the whole output matches)              |
| `structured_outputs.choice`, `guided_choice`    | GRAMMAR: `start: "a" | "b"`                   |
| `structured_outputs.grammar`, `guided_grammar`  | GRAMMAR (Lark, or GBNF/EBNF converted to it)  |
| `structured_outputs.structural_tag`             | GRAMMAR: free text, JSON between tags         |

`structured_outputs` is vLLM's object; the `guided_*` fields are its older spelling, which
FuriosaAI's server documents. A whitespace pattern (`structured_outputs.whitespace_pattern`,
`guided_whitespace_pattern`) replaces the fixed JSON layout of a JSON constraint. Two
constraints at once is a 400 naming the second; so is a spec llguidance cannot compile.
"""

from __future__ import annotations

import json
from typing import Any

from frontend.errors import bad_request
from frontend.protocol import SamplingRequestFields
from ipc.messages import StructuredOutputKind, StructuredOutputSpec
from ipc.shared.structured_output import (
    StructuredOutputError,
    check_structured_output,
    lark_from_grammar,
    lark_from_structural_tag,
)

_CONSTRAINT_FIELDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


def constraint_fields(request: SamplingRequestFields) -> list[tuple[str, Any]]:
    """(param, value) of every constraint the request sets, in the order fields are checked."""
    found = []
    params = request.structured_outputs
    if params is not None:
        for name in _CONSTRAINT_FIELDS:
            value = getattr(params, name)
            if value is not None and value is not False:
                found.append((f"structured_outputs.{name}", value))
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(request, name)
        if value is not None:
            found.append((name, value))
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        found.append(("response_format", response_format))
    return found


def structured_output_spec(request: SamplingRequestFields) -> tuple[StructuredOutputSpec | None, str | None]:
    """The request's constraint (None: free text) and the field that set it, or a 400."""
    found = constraint_fields(request)
    whitespace_param, whitespace = _whitespace_pattern(request)
    if not found:
        if whitespace is not None:
            raise bad_request(f"{whitespace_param} applies only to a JSON constraint; the request has none.",
                              param=whitespace_param)
        return None, None
    if len(found) > 1:
        raise bad_request(
            f"A request can have one structured output constraint; it has {found[0][0]} and {found[1][0]}.",
            param=found[1][0],
        )
    param, value = found[0]
    spec = _spec(param, value)
    if whitespace is not None:
        spec = _with_whitespace(spec, whitespace, whitespace_param, param)
    try:
        check_structured_output(spec)
    except StructuredOutputError as exc:
        what = "The response_format schema" if param == "response_format" else param
        raise bad_request(f"{what} is not supported: {exc}", param=param) from None
    return spec, param


def _whitespace_pattern(request: SamplingRequestFields) -> tuple[str | None, str | None]:
    params = request.structured_outputs
    if params is not None and params.whitespace_pattern is not None:
        return "structured_outputs.whitespace_pattern", params.whitespace_pattern
    if request.guided_whitespace_pattern is not None:
        return "guided_whitespace_pattern", request.guided_whitespace_pattern
    return None, None


def _spec(param: str, value: Any) -> StructuredOutputSpec:
    name = param.removeprefix("structured_outputs.").removeprefix("guided_")
    if name == "response_format":
        return _response_format_spec(value)
    if name == "json":
        return StructuredOutputSpec(StructuredOutputKind.JSON_SCHEMA, _schema_text(value, param))
    if name == "json_object":
        return StructuredOutputSpec(StructuredOutputKind.JSON_OBJECT)
    if name == "regex":
        return StructuredOutputSpec(StructuredOutputKind.REGEX, value)
    if name == "choice":
        if not value or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{param} must be a non-empty list of strings.", param=param)
        return StructuredOutputSpec(StructuredOutputKind.GRAMMAR, "start: " + " | ".join(json.dumps(c) for c in value))
    try:
        if name == "grammar":
            return StructuredOutputSpec(StructuredOutputKind.GRAMMAR, lark_from_grammar(value))
        return StructuredOutputSpec(StructuredOutputKind.GRAMMAR, lark_from_structural_tag(_json_value(value, param)))
    except StructuredOutputError as exc:
        raise bad_request(f"{param} is not supported: {exc}", param=param) from None


def _response_format_spec(response_format) -> StructuredOutputSpec:
    if response_format.type == "json_object":
        return StructuredOutputSpec(StructuredOutputKind.JSON_OBJECT)
    json_schema = response_format.json_schema
    if json_schema is None or json_schema.schema is None:
        raise bad_request('response_format of type "json_schema" needs json_schema.schema.', param="response_format")
    return StructuredOutputSpec(StructuredOutputKind.JSON_SCHEMA, json.dumps(json_schema.schema))


def _json_value(value: str | dict, param: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise bad_request(f"{param} is not valid JSON: {exc}", param=param) from None


def _schema_text(value: str | dict, param: str) -> str:
    schema = _json_value(value, param)
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object).", param=param)
    return json.dumps(schema)


def _with_whitespace(spec: StructuredOutputSpec, pattern: str, whitespace_param: str, param: str) -> StructuredOutputSpec:
    """A JSON constraint whose whitespace is `pattern` instead of the fixed layout: the schema
    inside a grammar, with its own llguidance options."""
    if spec.kind == StructuredOutputKind.JSON_OBJECT:
        schema: Any = {"type": "object"}
    elif spec.kind == StructuredOutputKind.JSON_SCHEMA:
        schema = json.loads(spec.spec)
    else:
        raise bad_request(f"{whitespace_param} applies only to a JSON constraint, not to {param}.",
                          param=whitespace_param)
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise bad_request(f"{param} cannot be combined with {whitespace_param}.", param=whitespace_param)
    options = {"whitespace_flexible": True, "whitespace_pattern": pattern, "item_separator": ",", "key_separator": ":"}
    return StructuredOutputSpec(StructuredOutputKind.GRAMMAR,
                                "start: %json " + json.dumps({**schema, "x-guidance": options}))
