"""Reasoning parsers: `<think>` blocks split from the content, whole and streamed at every split."""

from __future__ import annotations

import itertools

import pytest

from frontend.reasoning_parsers import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParserRegistry,
    UnknownReasoningParserError,
    prompt_opens_think_block,
)


def test_registry_names_and_lookup():
    assert ReasoningParserRegistry.names() == ["deepseek_r1", "qwen3"]
    assert ReasoningParserRegistry.get("qwen3") is Qwen3ReasoningParser
    with pytest.raises(UnknownReasoningParserError, match="known: deepseek_r1, qwen3"):
        ReasoningParserRegistry.get("granite")


def test_launcher_takes_a_known_parser_and_refuses_others(capsys):
    from frontend.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["serve", "--reasoning-parser", "qwen3"])).reasoning_parser \
        == "qwen3"
    assert config_from_args(build_parser().parse_args(["serve"])).reasoning_parser is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--reasoning-parser", "granite"])
    assert "invalid choice: 'granite' (choose from 'deepseek_r1', 'qwen3')" in capsys.readouterr().err


def r1(**kwargs):
    return DeepSeekR1ReasoningParser.for_request(prompt_text="<|Assistant|><think>\n", chat_template_kwargs=None,
                                                 is_constrained=False, **kwargs)


def qwen(prompt: str = "<|im_start|>assistant\n", kwargs=None):
    return Qwen3ReasoningParser.for_request(prompt_text=prompt, chat_template_kwargs=kwargs, is_constrained=False)


@pytest.mark.parametrize(
    "text, reasoning, content",
    [
        ("<think>\nstep 1\n</think>\n\nThe answer is 4.", "\nstep 1\n", "\n\nThe answer is 4."),
        ("step 1, no opening tag</think>The answer", "step 1, no opening tag", "The answer"),
        ("thinking that never ends", "thinking that never ends", None),  # truncated: all reasoning
        ("<think>a < b and </thi are not tags</think>x", "a < b and </thi are not tags", "x"),
        ("a</think>", "a", None),
        ("</think>only content", "", "only content"),
        ("a</think>b</think>c", "a", "b</think>c"),  # after the block, tags are text
        ("", None, None),
    ],
)
def test_deepseek_r1_extract(text, reasoning, content):
    assert r1().extract(text) == (reasoning, content)


@pytest.mark.parametrize(
    "text, reasoning, content",
    [
        ("<think>\nhmm\n</think>\n\nHello!", "\nhmm\n", "\n\nHello!"),
        ("\n<think>x</think>y", "x", "y"),  # whitespace before the block is not content
        ("Hello, no thinking.", None, "Hello, no thinking."),
        ("Hello <think>not a block</think>", None, "Hello <think>not a block</think>"),
        ("  <thinking>", None, "  <thinking>"),
        ("<think>never closed", "never closed", None),
        ("<thi", None, "<thi"),  # a partial tag at the end is what it says
        ("<think>a</thi", "a</thi", None),
    ],
)
def test_qwen3_extract(text, reasoning, content):
    assert qwen().extract(text) == (reasoning, content)


def test_qwen3_after_a_prompt_that_opened_the_block_reads_reasoning_without_a_tag():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert prompt_opens_think_block(prompt)
    assert qwen(prompt).extract("plan</think>answer") == ("plan", "answer")


def test_qwen3_with_thinking_disabled_extracts_nothing():
    # Qwen3's template closes an empty block in the prompt then; the output is content however it reads
    prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert not prompt_opens_think_block(prompt)
    text = "<think>x</think>y"
    assert qwen(prompt, {"enable_thinking": False}).extract(text) == (None, text)
    assert qwen(prompt, {"enable_thinking": True}).extract(text) == ("x", "y")


def test_a_constrained_output_starts_outside_the_block_unless_the_prompt_opened_it():
    """Under a grammar the output is what the grammar says from its first token: JSON is content,
    unless the prompt itself ends inside a think block."""
    for parser_class in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser):
        parser = parser_class.for_request(prompt_text="<|Assistant|>", chat_template_kwargs=None, is_constrained=True)
        assert parser.extract('{"a": 1}') == (None, '{"a": 1}')
        assert parser.extract("<think>r</think>c") == ("r", "c")
        parser = parser_class.for_request(prompt_text="<|Assistant|><think>\n", chat_template_kwargs=None,
                                          is_constrained=True)
        assert parser.extract("r</think>c") == ("r", "c")


TEXTS = [
    "<think>\nstep <1> </thin </think\n</think>\n\nThe answer is <think>4</think>.",
    " \n<think>a</think></think>b",
    "r1 style</think> content <",
    "<think><think>x</th",
    "  <thin",
    "plain text",
]


def stream(make, pieces: list[str]) -> tuple[str, str, bool]:
    parser = make()
    outs = [parser.feed(p) for p in pieces] + [parser.finish()]
    return "".join(o[0] for o in outs), "".join(o[1] for o in outs), parser.has_reasoning


@pytest.mark.parametrize("make", [r1, qwen, lambda: qwen("<think>"), lambda: qwen(kwargs={"enable_thinking": False})],
                         ids=["deepseek_r1", "qwen3", "qwen3-open", "qwen3-off"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_at_every_split_equals_extract(make, text):
    reasoning, content = make().extract(text)
    expected = (reasoning or "", content or "", reasoning is not None)
    # every way to cut the text in two and three pieces, and one character at a time
    cuts = [(i,) for i in range(len(text) + 1)] + list(itertools.combinations(range(len(text) + 1), 2))
    for cut in cuts:
        bounds = [0, *cut, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert stream(make, pieces) == expected, pieces
    assert stream(make, list(text)) == expected


def test_streaming_holds_only_a_possible_tag():
    parser = r1()
    assert parser.feed("let me think <") == ("let me think ", "")
    assert parser.feed("/thi") == ("", "")
    assert parser.feed("nk>The") == ("", "The")
    assert parser.feed(" end") == ("", " end")
    assert parser.finish() == ("", "")
    parser = qwen()
    assert parser.feed(" <th") == ("", "")
    assert parser.feed("e") == ("", " <the")
    assert parser.feed("<think>") == ("", "<think>")  # content already began: tags are text


def test_think_tags_added_as_plain_tokens_survive_detokenizing_special_ones_need_the_flag():
    """Qwen3 and DeepSeek-R1 add <think> and </think> as tokens that are not special: the text
    the parser reads keeps them with the default skip_special_tokens. Tags made special reach the
    text only with skip_special_tokens false."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from frontend.detokenizer import IncrementalDetokenizer

    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()

    def text(backend: Tokenizer, ids: list[int], *, skip: bool) -> str:
        detokenizer = IncrementalDetokenizer(backend, skip_special_tokens=skip)
        return "".join(detokenizer.push([i]) for i in ids) + detokenizer.flush()

    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    ids = plain.encode("<think>hm</think>ok").ids
    assert text(plain, ids, skip=True) == "<think>hm</think>ok"
    assert r1().extract(text(plain, ids, skip=True)) == ("hm", "ok")

    special = Tokenizer.from_str(tokenizer.to_str())
    special.add_special_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
    ids = special.encode("<think>hm</think>ok").ids
    assert text(special, ids, skip=True) == "hmok"
    assert text(special, ids, skip=False) == "<think>hm</think>ok"
