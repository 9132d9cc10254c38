"""frontend.chat_template: renders as Hugging Face's apply_chat_template does (checked against
transformers itself and the golden SmolLM2 prompts), with template errors as ChatTemplateError."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from frontend.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from frontend.tokenizer import load_tokenizer

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "smollm2_tokenizer.json"



@pytest.fixture(scope="module")
def golden_chat_cases() -> list[dict]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["chat_cases"]


def make(source: str, bos_token: str | None = "<s>", eos_token: str | None = "</s>") -> ChatTemplate:
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)


# ---- the default model, against the golden renderings ------------------------------------------


def test_golden_chat_cases_render_exactly(smollm2, golden_chat_cases):
    template = load_chat_template(None, smollm2)
    assert len(golden_chat_cases) >= 4
    for case in golden_chat_cases:
        text = template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert text == case["text"]


def test_golden_chat_cases_tokenize_without_a_second_bos(smollm2, golden_chat_cases):
    template = load_chat_template(None, smollm2)
    for case in golden_chat_cases:
        text = template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        ids = smollm2.encode(text, add_special_tokens=False)
        assert ids == case["ids"]
        assert ids[0] == smollm2.bos_token_id and ids[1] != smollm2.bos_token_id


def test_add_generation_prompt_defaults_to_true_and_can_be_off(smollm2):
    template = load_chat_template(None, smollm2)
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages).endswith("<|im_start|>assistant\n")
    assert template.render(messages, add_generation_prompt=False).endswith("hi<|im_end|>\n")


# ---- the same output as transformers' apply_chat_template -----------------------------------------

# Written for these tests: the features real templates use (Llama 3.1-style tools, role checks,
# loop controls, namespaces, whitespace control, a {% generation %} block, a trailing newline).
TOOLS_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = "You are helpful." %}
{%- endif %}
<|system|>
{{ system }}
{%- if tools is not none %}
Tools available:
{%- for tool in tools %}
{{ tool | tojson(indent=4) }}
{%- endfor %}
{%- endif %}
<|end|>
{% for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
<|assistant|>
        {%- for call in message.tool_calls %}
{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}
        {%- endfor %}
<|end|>
    {%- elif message.role == 'tool' %}
<|tool|>{{ message.content | tojson }}<|end|>
    {%- else %}
<|{{ message.role }}|>
{{ message.content }}<|end|>
    {%- endif %}
{% endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{% endif %}
"""

ALTERNATION_TEMPLATE = (
    "{% set ns = namespace(count=0) %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index > 6 %}{% break %}{% endif %}"
    "{% set ns.count = ns.count + 1 %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
    "{{ ' (' ~ ns.count ~ ')' }}"
)

WHITESPACE_TEMPLATE = """{% for message in messages %}
    {% if message.role == 'user' %}
        U: {{ message.content }}
    {% else %}
        A: {{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:{% endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city <today> & \"now\"",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Zürich, 東京…"}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi <b>&</b> é 日本 🙂"}],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": {"temperature": 21, "unit": "°C"}},
        {"role": "assistant", "content": "It is 21 °C."},
        {"role": "user", "content": "Thanks"},
    ],
]


@pytest.mark.parametrize("source", [TOOLS_TEMPLATE, ALTERNATION_TEMPLATE, WHITESPACE_TEMPLATE])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(smollm2, source, conversation, tools, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    template = ChatTemplate(source, bos_token=smollm2.bos_token, eos_token=smollm2.eos_token)
    kwargs = dict(tools=tools, add_generation_prompt=add_generation_prompt)
    try:
        expected = smollm2.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)
    except Exception as exc:  # transformers raises jinja2's TemplateError: we raise ours
        with pytest.raises(ChatTemplateError) as info:
            template.render(messages, **kwargs)
        assert str(info.value) == str(exc)
        return
    assert template.render(messages, **kwargs) == expected


def test_tools_are_passed_as_hugging_face_does():
    template = make("{% if tools is none %}none{% else %}{{ tools | length }}:{{ tools[0].function.name }}{% endif %}")
    assert template.render([]) == "none"
    assert template.render([], tools=[WEATHER_TOOL]) == "1:get_weather"


def test_tools_render_as_indented_json_without_html_escaping_or_ascii_escapes():
    text = make(TOOLS_TEMPLATE).render([{"role": "user", "content": "x"}], tools=[WEATHER_TOOL])
    assert json.dumps(WEATHER_TOOL, indent=4, ensure_ascii=False) in text
    assert '"Weather in a city <today> & \\"now\\""' in text
    assert "Zürich, 東京…" in text


def test_tojson_options():
    template = make("{{ v | tojson }}|{{ v | tojson(sort_keys=true) }}|{{ v | tojson(ensure_ascii=true) }}")
    value = {"b": "<é>", "a": [1, None, True]}
    assert template.render([], v=value) == (
        '{"b": "<é>", "a": [1, null, true]}|{"a": [1, null, true], "b": "<é>"}|{"b": "<\\u00e9>", "a": [1, null, true]}'
    )


def test_strftime_now_is_todays_date():
    before = datetime.now().strftime("%d %B %Y")
    text = make("{{ strftime_now('%d %B %Y') }}").render([])
    assert text in {before, datetime.now().strftime("%d %B %Y")}


def test_bos_eos_and_extra_variables_reach_the_template():
    template = make("{{ bos_token }}{{ eos_token }}{% if enable_thinking %}T{% endif %}")
    assert template.render([]) == "<s></s>"
    assert template.render([], enable_thinking=True) == "<s></s>T"
    assert template.render([], bos_token="[B]") == "[B]</s>"
    assert make("{{ bos_token }}|", bos_token=None).render([]) == "None|"


def test_trailing_newline_of_the_template_is_dropped_like_hugging_face():
    assert make("x\n").render([]) == "x"
    assert make("x\n\n").render([]) == "x\n"


def test_a_template_renders_the_same_many_times():
    template = make(ALTERNATION_TEMPLATE)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert {template.render(messages) for _ in range(3)} == {"[INST] a [/INST]b</s> (2)"}


# ---- errors --------------------------------------------------------------------------------------


def test_raise_exception_becomes_a_chat_template_error_with_its_message():
    template = make(ALTERNATION_TEMPLATE)
    messages = [{"role": "assistant", "content": "first"}]
    with pytest.raises(ChatTemplateError, match="^Conversation roles must alternate user/assistant"):
        template.render(messages)


def test_chat_template_error_is_a_value_error():
    assert issubclass(ChatTemplateError, ValueError)


def test_undefined_attribute_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match="no attribute 'missing'"):
        make("{{ messages[0].missing.deeper }}").render([{"role": "user", "content": "x"}])


def test_type_errors_from_unexpected_input_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="TypeError"):
        make("{{ messages[0].content + '!' }}").render([{"role": "user", "content": None}])


def test_syntax_error_is_reported_when_the_template_is_loaded():
    with pytest.raises(ChatTemplateError, match="line 2"):
        make("ok\n{% if %}")


def test_sandbox_refuses_mutation_and_private_attributes():
    with pytest.raises(ChatTemplateError, match="unsafe"):
        make("{{ messages.append(1) }}").render([])
    with pytest.raises(ChatTemplateError):
        make("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(ChatTemplateError, match="_secret"):
        make("{% set ns = namespace(_secret=1) %}").render([])


def test_underscore_names_on_a_namespace_are_refused_on_assignment_too():
    with pytest.raises(ChatTemplateError, match="_x"):
        make("{% set ns = namespace(a=1) %}{% set ns._x = 2 %}").render([])


# ---- loading ---------------------------------------------------------------------------------------


class _FakeTokenizer:
    def __init__(self, chat_template):
        self.chat_template = chat_template
        self.bos_token = "<s>"
        self.eos_token = "</s>"


def test_load_uses_the_tokenizers_template(smollm2):
    template = load_chat_template(None, smollm2)
    assert template.source == smollm2.chat_template
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_a_template_file_overrides_the_tokenizers(tmp_path, smollm2):
    path = tmp_path / "custom.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}", encoding="utf-8")
    template = load_chat_template(str(path), smollm2)
    assert template.render([{"role": "user", "content": "é"}]) == "[user] é\n"


def test_a_missing_template_file_is_a_clear_error(tmp_path, smollm2):
    path = tmp_path / "nope.jinja"
    with pytest.raises(ChatTemplateError, match="does not exist") as info:
        load_chat_template(str(path), smollm2)
    assert str(path) in str(info.value)


def test_a_template_file_with_a_syntax_error_fails_at_load(tmp_path, smollm2):
    path = tmp_path / "bad.jinja"
    path.write_text("{% for m in messages %}", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        load_chat_template(str(path), smollm2)


def test_no_template_anywhere_gives_none():
    assert load_chat_template(None, _FakeTokenizer(None)) is None
    assert load_chat_template(None, _FakeTokenizer("")) is None


def test_named_templates_use_the_default_one():
    tokenizer = _FakeTokenizer({"default": "D{{ bos_token }}", "tool_use": "T"})
    assert load_chat_template(None, tokenizer).render([]) == "D<s>"


def test_a_template_that_writes_bos_gives_one_bos_when_encoded_without_special_tokens(tmp_path):
    from tiny_llama import BOS_ID, write_tiny_llama

    write_tiny_llama(tmp_path, "tied")
    tokenizer = load_tokenizer(str(tmp_path))
    path = tmp_path / "with_bos.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    text = load_chat_template(str(path), tokenizer).render([{"role": "user", "content": "the cat"}])
    assert text == "<s>user: the cat\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert tokenizer.encode(text)[:2] == [BOS_ID, BOS_ID]  # why the API encodes chat prompts without
