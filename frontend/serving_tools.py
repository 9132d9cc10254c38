"""`tools` and `tool_choice` (with the request's own constraint) -> what the engine is
constrained to, and how the output text is read back.

The request's own constraint is `response_format`, `structured_outputs` or a `guided_*` field
(see `serving_structured_outputs`).

| request                               | engine constraint                    | output parsed by      |
| ------------------------------------- | ------------------------------------ | --------------------- |
| no tools, or tool_choice "none"       | the request's own, if any            | nothing               |
| tool_choice "auto" (the default when  | the request's own, if any            | --tool-call-parser    |
| the server has auto tool choice on)   |                                      |                       |
| tool_choice "required"                | calls to any of the tools            | llama3_json           |
| tool_choice {"function": {"name": f}} | one call to f                        | llama3_json           |

Forced calls are generated in Llama 3's JSON shape, `{"name": "f", "parameters": {...}}`,
with the arguments constrained to the function's JSON schema (several calls are joined by
"; " when parallel calls are allowed). The shape holds whatever the model or its template,
and the llama3_json parser reads it back, streamed or not, like any other output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from frontend.config import FrontendConfig
from frontend.errors import bad_request
from frontend.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from frontend.serving_structured_outputs import structured_output_spec
from frontend.tool_parsers import ToolParser, ToolParserRegistry
from frontend.tool_parsers.llama3_json import Llama3JsonToolParser
from ipc.messages import StructuredOutputKind, StructuredOutputSpec
from ipc.shared.structured_output import JSON_OPTIONS, StructuredOutputError, check_structured_output

# A function declared without parameters takes none: its arguments are `{}`.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ChatOutputPlan:
    structured_output: StructuredOutputSpec | None  # for the engine; None: free text
    tool_parser: ToolParser | None  # None: the output is plain content

    @classmethod
    def for_request(cls, request: ChatCompletionRequest, config: FrontendConfig) -> "ChatOutputPlan":
        """The plan, or a 400 naming the field that makes it impossible."""
        choice = _tool_choice(request, config)
        own_spec, own_param = structured_output_spec(request)
        if choice in ("none", "auto"):
            parser = None if choice == "none" else ToolParserRegistry.get(config.tool_call_parser)()
            return cls(own_spec, parser)
        if own_spec is not None:
            raise bad_request(
                f"{own_param} cannot be combined with a required or named tool_choice: both decide the output.",
                param=own_param,
            )
        spec = _forced_calls_spec(request.tools, choice, single=request.parallel_tool_calls is False)
        _check(spec, param="tools")
        return cls(spec, Llama3JsonToolParser())


def _tool_choice(request: ChatCompletionRequest, config: FrontendConfig) -> str | NamedToolChoice:
    """"none", "auto", "required" or a named function, checked against the tools and flags."""
    choice = request.tool_choice
    is_auto_enabled = config.enable_auto_tool_choice and config.tool_call_parser is not None
    if not request.tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice needs tools: the request has none.", param="tool_choice")
        return "none"
    if any(not tool.function.name for tool in request.tools):
        raise bad_request("Every tool's function needs a name: one of them is empty.", param="tools")
    if choice is None:  # OpenAI's default with tools is "auto"; without a parser, plain text
        return "auto" if is_auto_enabled else "none"
    if choice == "auto" and not is_auto_enabled:
        raise bad_request(
            '"auto" tool choice requires the server to be started with --enable-auto-tool-choice '
            "and --tool-call-parser.",
            param="tool_choice",
        )
    if isinstance(choice, NamedToolChoice):
        names = [tool.function.name for tool in request.tools]
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                f"({', '.join(map(repr, names))}).",
                param="tool_choice",
            )
    return choice


def _forced_calls_spec(tools: list[Tool], choice: str | NamedToolChoice, *, single: bool) -> StructuredOutputSpec:
    if isinstance(choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
        single = True
    calls = [_call_schema(tool) for tool in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if single:
        return StructuredOutputSpec(StructuredOutputKind.JSON_SCHEMA, json.dumps(schema))
    # One call or more, "; " between them; the JSON layout is the one ipc.shared.structured_output
    # gives a plain schema (a schema inside a grammar carries its own options).
    grammar = 'start: call ("; " call)*\ncall: %json ' + json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    return StructuredOutputSpec(StructuredOutputKind.GRAMMAR, grammar)


def _call_schema(tool: Tool) -> dict[str, Any]:
    function = tool.function
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "parameters": function.parameters or NO_PARAMETERS},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def _check(spec: StructuredOutputSpec, *, param: str) -> None:
    try:
        check_structured_output(spec)
    except StructuredOutputError as exc:
        raise bad_request(f"A tool's parameters schema is not supported: {exc}", param=param) from None
