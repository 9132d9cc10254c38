"""structured_outputs, guided_* and response_format on both endpoints: the constraint that reaches
the engine, checked by what llguidance (compiling it as the engine does) accepts."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest

from ipc.messages import StructuredOutputKind, StructuredOutputSpec
from ipc.shared.structured_output import grammar_for

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"prompt": "hi"}


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    return llguidance.hf.from_tokenizer(tokenizer)


@pytest.fixture
def accepts(tokenizer, ll_tokenizer):
    """Whether the grammar the engine would compile for `spec` accepts exactly `text`."""

    def check(spec: StructuredOutputSpec, text: str) -> bool:
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar_for(spec))
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        return matcher.validate_tokens(token_ids) == len(token_ids) and (
            matcher.consume_tokens(token_ids) and matcher.is_accepting())

    return check


def post(client, endpoint: str, **fields):
    path, base = ("/v1/chat/completions", CHAT) if endpoint == "chat" else ("/v1/completions", COMPLETION)
    return client.post(path, json={**base, "max_tokens": 4, **fields})


def spec_of(client, engine, endpoint: str, **fields) -> StructuredOutputSpec | None:
    response = post(client, endpoint, **fields)
    assert response.status_code == 200, response.text
    return engine.requests[-1].sampling_params.structured_output


ENDPOINTS = pytest.mark.parametrize("endpoint", ["chat", "completions"])


@ENDPOINTS
@pytest.mark.parametrize("field", ["structured_outputs", "guided"])
def test_choice_allows_exactly_the_choices(client, engine, accepts, endpoint, field):
    choices = ["yes", "no way", 'say "hi"\n']
    body = {"structured_outputs": {"choice": choices}} if field == "structured_outputs" else {"guided_choice": choices}
    spec = spec_of(client, engine, endpoint, **body)
    assert spec.kind == StructuredOutputKind.GRAMMAR
    assert all(accepts(spec, c) for c in choices)
    assert not accepts(spec, "ye") and not accepts(spec, "yes!") and not accepts(spec, "maybe")


@ENDPOINTS
@pytest.mark.parametrize("field", ["structured_outputs", "guided"])
def test_regex_is_a_full_match(client, engine, accepts, endpoint, field):
    regex = r"[a-z]+@[a-z]+\.com"
    body = {"structured_outputs": {"regex": regex}} if field == "structured_outputs" else {"guided_regex": regex}
    spec = spec_of(client, engine, endpoint, **body)
    assert spec == StructuredOutputSpec(StructuredOutputKind.REGEX, regex)
    assert accepts(spec, "alan@enigma.com") and not accepts(spec, "alan@enigma.com!")


@ENDPOINTS
@pytest.mark.parametrize("field", ["structured_outputs", "guided", "response_format"])
@pytest.mark.parametrize("as_text", [False, True])
def test_json_schema_in_every_spelling(client, engine, accepts, endpoint, field, as_text):
    schema = json.dumps(PERSON) if as_text else PERSON
    body = {
        "structured_outputs": {"structured_outputs": {"json": schema}},
        "guided": {"guided_json": schema},
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
    }[field]
    spec = spec_of(client, engine, endpoint, **body)
    assert spec.kind == StructuredOutputKind.JSON_SCHEMA and json.loads(spec.spec) == PERSON
    assert accepts(spec, '{"name": "Ada", "age": 36}') and not accepts(spec, '{"name": "Ada"}')


@ENDPOINTS
def test_json_object(client, engine, endpoint):
    for body in ({"structured_outputs": {"json_object": True}}, {"response_format": {"type": "json_object"}}):
        assert spec_of(client, engine, endpoint, **body).kind == StructuredOutputKind.JSON_OBJECT
    assert spec_of(client, engine, endpoint, structured_outputs={"json_object": False}) is None
    assert spec_of(client, engine, endpoint, response_format={"type": "text"}) is None


LARK = 'start: item (", " item)*\nitem: /[0-9]+/'
GBNF = 'root ::= item (", " item)*\nitem ::= [0-9]+'


@ENDPOINTS
@pytest.mark.parametrize("grammar", [LARK, GBNF], ids=["lark", "gbnf"])
@pytest.mark.parametrize("field", ["structured_outputs", "guided"])
def test_grammar_in_lark_or_gbnf(client, engine, accepts, endpoint, grammar, field):
    body = {"structured_outputs": {"grammar": grammar}} if field == "structured_outputs" else {"guided_grammar": grammar}
    spec = spec_of(client, engine, endpoint, **body)
    assert spec.kind == StructuredOutputKind.GRAMMAR
    assert accepts(spec, "1, 22, 333") and not accepts(spec, "1,2") and not accepts(spec, "a")


def test_whitespace_pattern_replaces_the_fixed_json_layout(client, engine, accepts):
    fixed = spec_of(client, engine, "chat", guided_json=PERSON)
    spaced = '{ "name" : "Ada" ,\n "age" : 36 }'
    assert not accepts(fixed, spaced)
    for body in ({"guided_json": PERSON, "guided_whitespace_pattern": "[ \n]*"},
                 {"structured_outputs": {"json": PERSON, "whitespace_pattern": "[ \n]*"}}):
        spec = spec_of(client, engine, "completions", **body)
        assert accepts(spec, spaced) and accepts(spec, '{"name":"Ada","age":36}')
        assert not accepts(spec, '{"name": "Ada"}')


def test_structural_tag_constrains_only_what_follows_a_trigger(client, engine, accepts):
    tag = {"type": "structural_tag", "triggers": ["<function="],
           "structures": [{"begin": "<function=f>", "schema": PERSON, "end": "</function>"}]}
    spec = spec_of(client, engine, "chat", structured_outputs={"structural_tag": json.dumps(tag)})
    assert accepts(spec, "Sure. <function=f>{\"name\": \"Ada\", \"age\": 36}</function> done")
    assert not accepts(spec, "Sure. <function=f>{\"name\": 36}</function>")


def test_guided_decoding_backend_is_accepted(client, engine):
    assert spec_of(client, engine, "chat", guided_regex="a+", guided_decoding_backend="xgrammar").kind == StructuredOutputKind.REGEX


@ENDPOINTS
@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"guided_json": PERSON, "guided_regex": "a+"}, "guided_regex", "guided_json and guided_regex"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs.choice", "one structured"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "response_format",
         "structured_outputs.regex and response_format"),
        ({"guided_choice": ["a", "b"], "use_beam_search": True, "n": 2}, "use_beam_search", "Beam search"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "not supported"),
        ({"guided_grammar": "this is no grammar ::= ::="}, "guided_grammar", "not supported"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "structured_outputs.json",
         "uniqueItems"),
        ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "JSON constraint"),
        ({"guided_regex": "a", "guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "JSON constraint"),
        ({"structured_outputs": {"structural_tag": {"structures": [{"begin": "<f>", "schema": {}}],
                                                    "triggers": ["<g"]}}},
         "structured_outputs.structural_tag", "trigger"),
    ],
)
def test_impossible_constraints_are_400_before_generation(client, engine, endpoint, fields, param, words):
    response = post(client, endpoint, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert engine.requests == []


def test_a_required_tool_call_and_a_guided_field_is_400_naming_the_field(client, engine):
    tool = {"type": "function", "function": {"name": "f"}}
    response = post(client, "chat", tools=[tool], tool_choice="required", guided_regex="a")
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_regex"


# ---- ignored fields are logged by name, once per request


@ENDPOINTS
def test_unknown_fields_are_accepted_and_logged_by_name(client, engine, caplog, endpoint):
    caplog.set_level("WARNING", logger="frontend.app")
    fields = {"frobnicate": 1, "guided_decoding_backend": "outlines", "structured_outputs": {"regex": "a+", "disable_fallback": True}}
    assert spec_of(client, engine, endpoint, **fields).kind == StructuredOutputKind.REGEX
    warnings = [r.getMessage() for r in caplog.records if r.name == "frontend.app" and "ignoring" in r.getMessage()]
    assert len(warnings) == 1, warnings
    for name in ("'frobnicate'", "'guided_decoding_backend'", "'structured_outputs.disable_fallback'"):
        assert name in warnings[0]
    assert "'structured_outputs'" not in warnings[0] and "'prompt'" not in warnings[0]


def test_a_request_with_only_known_fields_logs_no_warning(client, engine, caplog):
    caplog.set_level("WARNING", logger="frontend.app")
    spec_of(client, engine, "chat", guided_choice=["a"], temperature=0, seed=1, stream=False)
    assert not [r for r in caplog.records if "ignoring" in r.getMessage()]
