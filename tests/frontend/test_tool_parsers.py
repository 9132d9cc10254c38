"""Tool-call parsers: model-shaped outputs of both formats, whole and streamed at every split."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.cli import build_parser, config_from_args
from frontend.tool_parsers import ParsedDelta, ToolCall, ToolParserRegistry, fold_deltas
from frontend.tool_parsers.hermes import HermesToolParser
from frontend.tool_parsers.llama3_json import Llama3JsonToolParser


def make_parser(name: str):
    counter = itertools.count()
    return ToolParserRegistry.get(name)(lambda: f"call_{next(counter)}")


def extract(name: str, text: str):
    return make_parser(name).extract(text)


def stream_pieces(name: str, pieces: list[str]) -> list[ParsedDelta]:
    stream = make_parser(name).stream()
    return [stream.feed(piece) for piece in pieces] + [stream.finish()]


def call(index: int, name: str, arguments: str) -> ToolCall:
    return ToolCall(f"call_{index}", name, arguments)


WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}'


# ---------------------------------------------------------------------------------- registry


def test_registry_names_and_lookup():
    assert ToolParserRegistry.names() == ["hermes", "llama3_json"]
    assert ToolParserRegistry.get("hermes") is HermesToolParser
    assert ToolParserRegistry.get("llama3_json") is Llama3JsonToolParser


def test_registry_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as info:
        ToolParserRegistry.get("mistral")
    assert "'mistral'" in str(info.value) and "hermes, llama3_json" in str(info.value)


def test_launcher_refuses_an_unknown_parser_naming_the_known_ones():
    args = build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "mistral"])
    with pytest.raises(SystemExit, match="unknown --tool-call-parser 'mistral'; known: hermes, llama3_json"):
        config_from_args(args)
    args = build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    config = config_from_args(args)
    assert config.enable_auto_tool_choice and config.tool_call_parser == "hermes"


# ---------------------------------------------------------------------------------- llama3_json

LLAMA3_CASES = [
    pytest.param(WEATHER, None, [call(0, "get_weather", '{"city": "Paris", "unit": "celsius"}')], id="single"),
    pytest.param("<|python_tag|>" + WEATHER, None, [call(0, "get_weather", '{"city": "Paris", "unit": "celsius"}')],
                 id="python-tag"),
    pytest.param(f"{WEATHER}; {TIME}", None,
                 [call(0, "get_weather", '{"city": "Paris", "unit": "celsius"}'),
                  call(1, "get_time", '{"timezone": "Europe/Paris"}')], id="two-calls"),
    pytest.param(f"I will look that up.\n\n{TIME}", "I will look that up.",
                 [call(0, "get_time", '{"timezone": "Europe/Paris"}')], id="after-prose"),
    pytest.param('{"type": "function", "name": "f", "parameters": {"q": "a \\"quoted\\" }"}}', None,
                 [call(0, "f", '{"q": "a \\"quoted\\" }"}')], id="type-first-and-escaped-brace"),
    pytest.param('{"name": "now"}', None, [call(0, "now", "{}")], id="no-arguments"),
    pytest.param('{"name": "f", "arguments": "{\\"a\\": 1}"}', None, [call(0, "f", '{"a": 1}')],
                 id="arguments-as-string"),
    pytest.param('{"name": "f\\ud83d", "arguments": "{\\"e\\": \\"\\ud83d\\ude00 \\ud83d\\"}"}', None,
                 [call(0, "f\ufffd", '{"e": "\U0001f600 \ufffd"}')], id="arguments-as-string-with-surrogates"),
    pytest.param('{"name": get_weather, "parameters": {}}', '{"name": get_weather, "parameters": {}}', [],
                 id="malformed-name"),
    pytest.param('{"parameters": {"a": 1}, "name": "f"}', '{"parameters": {"a": 1}, "name": "f"}', [],
                 id="name-after-arguments"),
    pytest.param('The set {1, 2} has {"size": 2}.', 'The set {1, 2} has {"size": 2}.', [], id="braces-in-prose"),
    pytest.param('{"name": "f", "parame', '{"name": "f", "parame', [], id="cut-in-header"),
    pytest.param('{"name": "f", "parameters": {"a": [1, 2', None, [call(0, "f", '{"a": [1, 2')],
                 id="cut-in-arguments"),
    pytest.param("Hello there!  \n", "Hello there!  \n", [], id="plain-text-kept-exactly"),
]


@pytest.mark.parametrize("text, content, calls", LLAMA3_CASES)
def test_llama3_json_extract(text, content, calls):
    assert extract("llama3_json", text) == (content, calls)


# ---------------------------------------------------------------------------------- hermes

H_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
H_TIME = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'

HERMES_CASES = [
    pytest.param(H_WEATHER, None, [call(0, "get_weather", '{"city": "Paris"}')], id="single"),
    pytest.param(f"{H_WEATHER}\n{H_TIME}", None,
                 [call(0, "get_weather", '{"city": "Paris"}'), call(1, "get_time", '{"timezone": "UTC"}')],
                 id="two-calls"),
    pytest.param(f"Let me check the weather.\n{H_WEATHER}", "Let me check the weather.",
                 [call(0, "get_weather", '{"city": "Paris"}')], id="after-prose"),
    pytest.param(f"{H_WEATHER}\nDone.", "Done.", [call(0, "get_weather", '{"city": "Paris"}')], id="before-prose"),
    pytest.param("<tool_call>\n{name: 'get_weather'}\n</tool_call>", "<tool_call>\n{name: 'get_weather'}\n</tool_call>",
                 [], id="malformed-json"),
    pytest.param("<tool_call>\nget_weather(city='Paris')\n</tool_call>",
                 "<tool_call>\nget_weather(city='Paris')\n</tool_call>", [], id="not-json"),
    pytest.param("if a < b and c <tool> d", "if a < b and c <tool> d", [], id="angle-brackets-in-prose"),
    pytest.param('<tool_call>\n{"name": "f", "arguments": {"a": "x', None, [call(0, "f", '{"a": "x')],
                 id="cut-in-arguments"),
    pytest.param('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_', None, [call(0, "f", "{}")],
                 id="cut-in-end-tag"),
    pytest.param('<tool_call>{"name": "f", "arguments": {}}<tool_call>{"name": "g", "arguments": {}}</tool_call>', None,
                 [call(0, "f", "{}"), call(1, "g", "{}")], id="missing-end-tag"),
]


@pytest.mark.parametrize("text, content, calls", HERMES_CASES)
def test_hermes_extract(text, content, calls):
    assert extract("hermes", text) == (content, calls)


# ---------------------------------------------------------------------------------- streaming


def check_streamed(name: str, expected, pieces: list[str]) -> None:
    deltas = stream_pieces(name, pieces)
    assert fold_deltas(deltas) == expected, pieces
    # The first fragment of each call names it; later ones only carry arguments.
    seen: set[int] = set()
    for delta in deltas:
        for fragment in delta.tool_calls:
            first = fragment.index not in seen
            assert (fragment.id is not None, fragment.name is not None) == (first, first)
            assert fragment.index == len(seen) - (not first)
            seen.add(fragment.index)


@pytest.mark.parametrize(
    "name, text",
    [("llama3_json", p.values[0]) for p in LLAMA3_CASES] + [("hermes", p.values[0]) for p in HERMES_CASES],
)
def test_streamed_at_every_split_equals_extract(name, text):
    expected = extract(name, text)
    for i in range(len(text) + 1):
        check_streamed(name, expected, [text[:i], text[i:]])
    check_streamed(name, expected, list(text))


def test_streaming_holds_back_a_possible_call_then_releases_it():
    stream = make_parser("hermes").stream()
    assert stream.feed("Sure <tool").content == "Sure"  # the space may belong to a call
    assert stream.feed("box> here").content == " <toolbox> here"
    stream = make_parser("llama3_json").stream()
    assert stream.feed('Ok {"na').content == "Ok"
    held = stream.feed('me": "f", "parameters": {"a"')
    assert held.content == "" and [(c.name, c.arguments) for c in held.tool_calls] == [("f", '{"a"')]
    assert stream.feed(": 1}}").tool_calls[0].arguments == ": 1}"


# ---------------------------------------------------------------------------------- property

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-1000, 1000), st.text(alphabet='ab {}[]";:\\\n<é', max_size=6)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("xyz", max_size=3), inner, max_size=3),
    max_leaves=6,
)
_arguments = st.dictionaries(st.text("abc_", min_size=1, max_size=5), _json_values, max_size=3)
_names = st.text("abcdefgh_", min_size=1, max_size=8)
_prose = st.text(alphabet="Hi, ok.\n {};<>\"tool_call", max_size=20)


@st.composite
def model_outputs(draw, parser: str):
    """(text, expected calls as (name, arguments dict), or None when malformed parts make the
    expected result not obvious)."""
    parts: list[str] = []
    calls: list[tuple[str, dict]] = []
    is_clean = True
    if draw(st.booleans()):
        prose = draw(_prose)
        parts.append(prose)
        is_clean = "{" not in prose and "<" not in prose and ";" not in prose
    for k in range(draw(st.integers(0, 3))):
        name, arguments = draw(_names), draw(_arguments)
        key = draw(st.sampled_from(["arguments", "parameters"]))
        body = json.dumps({"name": name, key: arguments}, ensure_ascii=draw(st.booleans()))
        if draw(st.integers(0, 4)) == 0:  # malformed: cut or corrupted somewhere
            cut = draw(st.integers(1, len(body) - 1))
            body = body[:cut] + draw(st.sampled_from(["", "}", "x", '"', "\n"])) + body[cut:]
            is_clean = False
        else:
            calls.append((name, arguments))
        if parser == "hermes":
            parts.append(f"<tool_call>\n{body}\n</tool_call>\n")
        else:
            parts.append("; " + body if k else body)
    return "".join(parts), (calls if is_clean else None)


@pytest.mark.parametrize("parser", ["llama3_json", "hermes"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_streamed_equals_extract_at_every_split(parser, data):
    text, expected_calls = data.draw(model_outputs(parser))
    expected = extract(parser, text)
    if expected_calls is not None:
        assert [(c.name, json.loads(c.arguments)) for c in expected[1]] == expected_calls
    for i in range(len(text) + 1):
        check_streamed(parser, expected, [text[:i], text[i:]])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    check_streamed(parser, expected, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
