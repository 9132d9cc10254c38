"""Structured output specs compiled to llguidance grammars: one definition for both processes.

The frontend checks a spec with `check_structured_output` before it sends a request (an
unsupported schema is a 400 before any generation); the engine compiles the same spec with
`grammar_for` against the model's vocabulary. llguidance computes a token mask per step in
tens of microseconds, builds a matcher in about a millisecond, and needs neither torch nor
any other Python package.

JSON is generated in one layout: `", "` and `": "` separators and no other whitespace. Free
whitespace lets a small model write blank lines until max_tokens; one fixed layout also makes
the text predictable for the tool-call parsers.
"""

from __future__ import annotations

import json

from ipc.messages import StructuredOutputKind, StructuredOutputSpec

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """The spec cannot be compiled; the message says why (for a 400)."""


def grammar_for(spec: StructuredOutputSpec) -> str:
    """The llguidance grammar (serialized) for `spec`; raises StructuredOutputError."""
    import llguidance

    kind = spec.kind
    try:
        if kind == StructuredOutputKind.JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(_schema(spec.spec), overrides=JSON_OPTIONS)
        if kind == StructuredOutputKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == StructuredOutputKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        if kind == StructuredOutputKind.GRAMMAR:
            return llguidance.LLMatcher.grammar_from_lark(spec.spec)
    except (ValueError, TypeError) as exc:
        raise StructuredOutputError(str(exc)) from None
    raise StructuredOutputError(f"unknown structured output kind {kind!r}")


def check_structured_output(spec: StructuredOutputSpec) -> None:
    """Raises StructuredOutputError unless `spec` compiles, without a vocabulary: unknown or
    unsupported JSON Schema keywords, bad references, invalid regexes and grammars."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar_for(spec))
    if error:
        raise StructuredOutputError(error)


def _schema(text: str) -> dict | bool:
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise StructuredOutputError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError("a JSON schema must be an object or a boolean")
    return schema


def lark_from_grammar(text: str) -> str:
    """A grammar in llguidance's Lark dialect, or in GBNF/EBNF (llama.cpp's, as vLLM accepts),
    as Lark."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(text)
    except Exception as exc:  # the converter raises whatever its parser hits
        raise StructuredOutputError(f"the grammar is neither Lark nor GBNF: {exc}") from None


def lark_from_structural_tag(tag: dict) -> str:
    """vLLM's structural tag (`{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`)
    as Lark: free text in which each structure's begin string, once its trigger appears, is
    followed by JSON valid against its schema and its end string. Triggers are plain text."""
    from llguidance import StructTag

    if not isinstance(tag, dict) or not isinstance(tag.get("structures"), list) or not tag["structures"]:
        raise StructuredOutputError('a structural tag needs a non-empty "structures" list')
    triggers = tag.get("triggers") or []
    tags = []
    for structure in tag["structures"]:
        if not isinstance(structure, dict) or not isinstance(structure.get("begin"), str):
            raise StructuredOutputError('each structure needs a "begin" string')
        begin = structure["begin"]
        trigger = next((t for t in triggers if isinstance(t, str) and t and begin.startswith(t)), None)
        if trigger is None:
            raise StructuredOutputError(f"no trigger in {triggers!r} starts the structure's begin {begin!r}")
        schema = structure.get("schema", {})
        if not isinstance(schema, dict):
            raise StructuredOutputError("a structure's schema must be a JSON object")
        tags.append(StructTag(trigger=trigger, begin=begin, grammar={**schema, "x-guidance": JSON_OPTIONS}, end=str(structure.get("end", ""))))
    return StructTag.to_grammar(tags, assume_special=False)
