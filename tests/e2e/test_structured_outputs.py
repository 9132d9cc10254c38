"""Structured outputs from the real server on the default model: every form of constraint
(vLLM's `structured_outputs`, the older `guided_*` fields), on both APIs, streamed and not,
produces text that satisfies it for five prompts each."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import llguidance
import llguidance.hf
import openai
import pytest

from frontend.default_model import default_model_path
from frontend.tokenizer import load_tokenizer
from ipc.messages import StructuredOutputKind, StructuredOutputSpec
from ipc.shared.structured_output import grammar_for, lark_from_grammar

TOPICS = ["the sea", "a red bicycle", "winter in Oslo", "a chess game", "baking bread"]
CHOICES = ["positive", "negative", "neutral"]
REGEX = r"(yes|no), because [a-z ]{5,40}\."
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
LARK = 'start: "The answer is " number "."\nnumber: /[1-9][0-9]{0,3}/'
GBNF = 'root ::= "Rating: " [1-5] " of 5, " word\nword ::= [a-z]{3,12}'
TAG_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
STRUCTURAL_TAG = {"type": "structural_tag", "triggers": ["<weather>"],
                  "structures": [{"begin": "<weather>", "schema": TAG_SCHEMA, "end": "</weather>"}]}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def grammar_accepts():
    """Whether llguidance, with the model's vocabulary, accepts `text` as a whole for a Lark grammar."""
    tokenizer = load_tokenizer(default_model_path())
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def accepts(lark: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar_for(StructuredOutputSpec(StructuredOutputKind.GRAMMAR, lark)))
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        return matcher.consume_tokens(token_ids) and matcher.is_accepting()

    return accepts


def generate(client, model: str, topic: str, *, api: str, stream: bool, extra: dict, max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of one request, on `api`, streamed or not."""
    question = f"Write about {topic}."
    kwargs = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream, "extra_body": extra}
    if api == "chat":
        response = client.chat.completions.create(messages=[{"role": "user", "content": question}], **kwargs)
    else:
        response = client.completions.create(prompt=question + "\n", **kwargs)
    if not stream:
        choice = response.choices[0]
        return (choice.message.content if api == "chat" else choice.text), choice.finish_reason
    parts, finish_reason = [], None
    for chunk in response:
        for choice in chunk.choices:
            parts.append((choice.delta.content or "") if api == "chat" else choice.text)
            finish_reason = choice.finish_reason or finish_reason
    return "".join(parts), finish_reason


def outputs(client, model: str, extra: dict, *, max_tokens: int = 60) -> list[str]:
    """Each topic's text, both APIs, streamed and not (20 requests, decoded together). Every
    output ended by itself (the grammar or EOS), not by max_tokens."""
    jobs = [(topic, api, stream) for topic in TOPICS for api in ("chat", "completions") for stream in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: generate(client, model, job[0], api=job[1], stream=job[2], extra=extra,
                                                     max_tokens=max_tokens), jobs))
    for (topic, api, stream), (text, finish_reason) in zip(jobs, results):
        assert finish_reason == "stop", (topic, api, stream, text)
    return [text for text, _ in results]


@pytest.mark.parametrize("field", ["structured_outputs", "guided_choice"])
def test_choice(client, model_name, field):
    extra = {"structured_outputs": {"choice": CHOICES}} if field == "structured_outputs" else {field: CHOICES}
    for text in outputs(client, model_name, extra):
        assert text in CHOICES


@pytest.mark.parametrize("field", ["structured_outputs", "guided_regex"])
def test_regex(client, model_name, field):
    extra = {"structured_outputs": {"regex": REGEX}} if field == "structured_outputs" else {field: REGEX}
    texts = outputs(client, model_name, extra)
    for text in texts:
        assert re.fullmatch(REGEX, text), text
    assert len(set(texts)) > 1  # the prompts matter


@pytest.mark.parametrize("field", ["structured_outputs", "guided_json", "response_format"])
def test_json_schema(client, model_name, field):
    extra = {
        "structured_outputs": {"structured_outputs": {"json": PERSON}},
        "guided_json": {"guided_json": json.dumps(PERSON)},
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
    }[field]
    for text in outputs(client, model_name, extra):
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object(client, model_name):
    for text in outputs(client, model_name, {"structured_outputs": {"json_object": True}}, max_tokens=200):
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("grammar", [LARK, GBNF], ids=["lark", "gbnf"])
@pytest.mark.parametrize("field", ["structured_outputs", "guided_grammar"])
def test_grammar(client, model_name, grammar_accepts, grammar, field):
    extra = {"structured_outputs": {"grammar": grammar}} if field == "structured_outputs" else {field: grammar}
    for text in outputs(client, model_name, extra):
        assert grammar_accepts(lark_from_grammar(grammar), text), text


def test_structural_tag(client, model_name):
    """Text is free, but whatever follows the trigger is the schema's JSON and the end tag."""
    extra = {"structured_outputs": {"structural_tag": json.dumps(STRUCTURAL_TAG)}}
    shots = 'Paris: <weather>{"city": "Paris"}</weather>\nOslo: <weather>{"city": "Oslo"}</weather>\n'
    texts = []
    for city in ("Lima", "Pune", "Kyiv", "Rome", "Cairo"):
        for stream in (False, True):
            response = client.completions.create(model=model_name, prompt=f"{shots}{city}:", max_tokens=30,
                                                 temperature=0, stream=stream, extra_body=extra)
            texts.append("".join(c.text for chunk in response for c in chunk.choices) if stream
                         else response.choices[0].text)
    for text in texts:
        for match in re.finditer("<weather>", text):
            rest = text[match.end():]
            if "</weather>" in rest:
                jsonschema.validate(json.loads(rest[: rest.index("</weather>")]), TAG_SCHEMA)
            else:  # cut by max_tokens: still a prefix of the schema's JSON
                assert rest.startswith("{"), text
    assert sum("</weather>" in text for text in texts) >= 5, texts  # the constraint was exercised
