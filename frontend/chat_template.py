"""Chat templates: a conversation (and tools) rendered to the prompt text the model was tuned on.

Templates come from the model (the tokenizer's `chat_template`) or from `--chat-template FILE`,
and are rendered the way Hugging Face's `apply_chat_template` renders them, so that a prompt is
byte-for-byte the one the model saw in training:

- Jinja2's `ImmutableSandboxedEnvironment` (templates are untrusted code from model repos),
  `trim_blocks` and `lstrip_blocks` on, the `loopcontrols` extension, and a no-op
  `{% generation %}` block (HF uses it to mark assistant tokens for training);
- globals `raise_exception(message)`, `strftime_now(format)`, `namespace`, `dict`;
- a `tojson` filter that is `json.dumps` (no HTML escaping, non-ASCII kept, `indent` honoured);
- variables `messages`, `tools` (None when absent), `documents`, `add_generation_prompt`,
  `bos_token`, `eos_token`, and any extra keyword given to `render`.

Any failure while rendering (the template's own `raise_exception`, an undefined attribute, a
type error on unexpected input) becomes a `ChatTemplateError`, which the API reports as a 400.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template cannot be loaded or rendered; the message is the template's own."""


class ChatTemplate:
    """One compiled chat template; `render` is safe to call from many requests."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"invalid chat template (line {exc.lineno}): {exc.message}") from exc

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        documents: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`; `extra` reaches the template as more variables
        (e.g. `enable_thinking`), and may override `bos_token`/`eos_token`."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(exc.message or type(exc).__name__) from exc
        except Exception as exc:  # the template hit data it did not expect, e.g. None + str
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


def load_chat_template(path: str | None, tokenizer: Any) -> ChatTemplate | None:
    """The `--chat-template FILE` if given, else the tokenizer's own, else None (the model has
    no template: chat requests are then refused)."""
    bos_token = getattr(tokenizer, "bos_token", None)
    eos_token = getattr(tokenizer, "eos_token", None)
    if path is not None:
        if not os.path.isfile(path):
            raise ChatTemplateError(f"chat template file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"chat template file {path} cannot be read: {exc}") from exc
    else:
        source = _tokenizer_template(tokenizer)
        if source is None:
            return None
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)


def _tokenizer_template(tokenizer: Any) -> str | None:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # named templates: "default", and e.g. "tool_use", "rag"
        source = source.get("default")
    return source or None


# ---- the environment ----------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: `self` may be a kwarg
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    return env


_ENVIRONMENT = _make_environment()
