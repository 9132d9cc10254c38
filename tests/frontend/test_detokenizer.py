"""frontend.detokenizer: incremental detokenizing against tokenizer.decode() at every split of
the ids, and stop strings against a one-character-at-a-time reference at every split of the text."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "smollm2_tokenizer.json"
FFFD = "\ufffd"

MULTIBYTE_TEXTS = [
    "Café naïve résumé Ångström",
    "日本語のテキスト。中文：你好！한국어",
    "Emoji 😀🎉 👍🏽 ❤️ 🇫🇷",
    "Family 👨\u200d👩\u200d👧 and 🏳️\u200d🌈 end",
    " Привет, мир! مرحبا שלום",
    "a\u00a0b\u200bc ∑∫√ 𝔘𝔫𝔦",
]



@pytest.fixture(scope="module")
def golden_texts() -> list[str]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["texts"]


def gpt2_byte_spelling() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes spell themselves, the rest move to 256+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelling = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + offset)
    return spelling


def byte_token_ids(tokenizer, data: bytes) -> list[int]:
    """One token per byte: the worst case for splitting characters."""
    spelling = gpt2_byte_spelling()
    ids = [tokenizer.convert_tokens_to_ids(spelling[b]) for b in data]
    assert tokenizer.unk_token_id not in ids
    return ids


def run(tokenizer, pushes: list[list[int]], *, skip_special_tokens: bool = True) -> list[str]:
    """The deltas of `pushes`, then of flush()."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detokenizer.push(ids) for ids in pushes] + [detokenizer.flush()]


def splits(ids: list[int], max_cuts: int = 2):
    """Every way of cutting `ids` into at most max_cuts + 1 non-empty pushes."""
    for num_cuts in range(max_cuts + 1):
        for cuts in itertools.combinations(range(1, len(ids)), num_cuts):
            bounds = (0, *cuts, len(ids))
            yield [ids[a:b] for a, b in itertools.pairwise(bounds)]


def complete_prefix(data: bytes, num_bytes: int) -> str:
    """The characters wholly inside data[:num_bytes] (data is valid UTF-8)."""
    return data[:num_bytes].decode("utf-8", errors="ignore")


# ---- byte-level BPE (SmolLM2) ------------------------------------------------------------------


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_token_by_token_equals_decode_for_every_golden_text(smollm2, golden_texts, skip_special_tokens):
    for text in golden_texts:
        ids = smollm2.encode(text)
        deltas = run(smollm2, [[i] for i in ids], skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == smollm2.decode(ids, skip_special_tokens=skip_special_tokens)
        assert not any(FFFD in d for d in deltas), text


def test_every_split_of_real_tokens_equals_decode(smollm2):
    for text in MULTIBYTE_TEXTS:
        ids = smollm2.encode(text)
        assert any(FFFD in smollm2.decode([i]) for i in ids)  # the text does split characters
        for pushes in splits(ids, max_cuts=2):
            deltas = run(smollm2, pushes)
            assert "".join(deltas) == text
            assert not any(FFFD in d for d in deltas)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_one_byte_per_token_never_splits_a_character_nor_holds_a_complete_one(smollm2, text):
    data = text.encode("utf-8")
    ids = byte_token_ids(smollm2, data)
    detokenizer = IncrementalDetokenizer(smollm2)
    emitted = ""
    for num_bytes, token_id in enumerate(ids, start=1):
        delta = detokenizer.push([token_id])
        assert FFFD not in delta
        emitted += delta
        assert emitted == complete_prefix(data, num_bytes)  # released as soon as complete
    assert detokenizer.flush() == ""
    assert emitted == text


@pytest.mark.parametrize("text", ["é日", "🤖x", "a👍🏽b", "Ωé"])
def test_every_split_of_byte_tokens_equals_the_text(smollm2, text):
    ids = byte_token_ids(smollm2, text.encode("utf-8"))
    for pushes in splits(ids, max_cuts=3):
        deltas = run(smollm2, pushes)
        assert "".join(deltas) == text
        assert not any(FFFD in d for d in deltas)


def test_long_sequences_slide_the_window_and_still_equal_decode(smollm2, golden_texts):
    ids = [i for text in golden_texts for i in smollm2.encode(text)]
    assert len(ids) > 20 * IncrementalDetokenizer.max_window_tokens
    for step in (1, 3, 7):
        pushes = [ids[k : k + step] for k in range(0, len(ids), step)]
        assert "".join(run(smollm2, pushes)) == smollm2.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped_or_kept(smollm2):
    ids = smollm2.encode("Hi<|im_end|> there")
    assert "".join(run(smollm2, [[i] for i in ids])) == "Hi there"
    assert "".join(run(smollm2, [[i] for i in ids], skip_special_tokens=False)) == "Hi<|im_end|> there"


def test_empty_push_returns_nothing(smollm2):
    detokenizer = IncrementalDetokenizer(smollm2)
    assert detokenizer.push([]) == ""
    assert detokenizer.push(smollm2.encode("ok")) == "ok"
    assert detokenizer.push([]) == ""


def test_a_stray_continuation_byte_is_released_with_the_next_text(smollm2):
    ids = byte_token_ids(smollm2, b"a\x80b")
    assert run(smollm2, [[i] for i in ids]) == ["a", "", FFFD + "b", ""]
    assert smollm2.decode(ids) == "a" + FFFD + "b"


def test_a_lead_byte_cut_short_is_released_with_the_next_text(smollm2):
    ids = byte_token_ids(smollm2, b"\xe6\x97x")  # two of the three bytes of 日, then x
    deltas = run(smollm2, [[i] for i in ids])
    assert deltas == ["", "", FFFD + "x", ""]
    assert "".join(deltas) == smollm2.decode(ids)


def test_a_character_cut_short_at_the_end_comes_out_of_flush(smollm2):
    ids = byte_token_ids(smollm2, b"ok\xf0\x9f\xa4")  # 🤖 without its last byte
    deltas = run(smollm2, [[i] for i in ids])
    assert deltas[:-1] == ["o", "k", "", "", ""]
    assert deltas[-1] == FFFD
    assert "".join(deltas) == smollm2.decode(ids)


def test_invalid_bytes_are_held_for_a_bounded_number_of_tokens(smollm2):
    max_held = IncrementalDetokenizer.max_held_pushes
    ids = byte_token_ids(smollm2, b"\x80" * (max_held + 3))
    deltas = run(smollm2, [[i] for i in ids])
    assert deltas[: max_held - 1] == [""] * (max_held - 1)
    assert deltas[max_held - 1] == FFFD * max_held  # given up on: released
    assert "".join(deltas) == smollm2.decode(ids)


def test_a_real_replacement_character_is_released(smollm2):
    ids = smollm2.encode("a\ufffdb\ufffd")  # the model may generate U+FFFD itself
    deltas = run(smollm2, [[i] for i in ids])
    assert "".join(deltas) == "a\ufffdb\ufffd"


# ---- SentencePiece-style BPE (Metaspace, byte fallback), as Llama 2 and Mistral ship ------------


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'0123456789":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "w"), ("o", "r"), ("l", "d"), ("▁w", "or"),
              ("▁wor", "ld"), ("▁", "▁"), ("▁", "h"), ("e", "l"), ("el", "l"), ("ell", "o")]  # fmt: skip
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )


SENTENCEPIECE_TEXTS = [
    "hello world",
    "  two leading spaces and  two  inside ",
    "héllo 日本 🤖! the world",
    "the</s> world",
    "Family 👨\u200d👩\u200d👧 and 🏳️\u200d🌈 end",
]


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    return sentencepiece_tokenizer()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sentencepiece_every_split_equals_decode(sentencepiece, skip_special_tokens):
    for text in SENTENCEPIECE_TEXTS:
        ids = sentencepiece.encode(text)
        expected = sentencepiece.decode(ids, skip_special_tokens=skip_special_tokens)
        for pushes in splits(ids, max_cuts=2):
            deltas = run(sentencepiece, pushes, skip_special_tokens=skip_special_tokens)
            assert "".join(deltas) == expected
            assert not any(FFFD in d for d in deltas)


def test_sentencepiece_byte_run_cut_inside_a_character_keeps_what_completed(sentencepiece):
    # Byte fallback decodes a run of byte tokens all or nothing: one incomplete character at
    # its end turns the whole run into U+FFFDs, even characters that had completed. A stream
    # cannot take back the 👨 it already sent, so here (only) it differs from decode().
    ids = sentencepiece.encode("👨\u200d👩", add_special_tokens=False)[:-1]
    assert sentencepiece.convert_ids_to_tokens(ids[:2]) == ["▁", "<0xF0>"] and len(ids) == 11
    assert sentencepiece.decode(ids) == FFFD * 10
    deltas = run(sentencepiece, [[i] for i in ids])
    assert deltas[:8] == ["", "", "", "", "👨", "", "", "\u200d"]
    assert set("".join(deltas[8:])) == {FFFD}


def test_sentencepiece_drops_only_the_first_tokens_space(sentencepiece):
    ids = sentencepiece.encode("the world", add_special_tokens=False)
    assert sentencepiece.convert_ids_to_tokens(ids) == ["▁the", "▁world"]
    assert run(sentencepiece, [[i] for i in ids]) == ["the", " world", ""]


def test_sentencepiece_keeps_spaces_after_the_window_slides(sentencepiece):
    ids = sentencepiece.encode(" ".join(["the world"] * 40), add_special_tokens=False)
    assert len(ids) > 4 * IncrementalDetokenizer.max_window_tokens
    deltas = run(sentencepiece, [[i] for i in ids])
    assert deltas[:3] == ["the", " world", " the"]
    assert "".join(deltas) == sentencepiece.decode(ids)


def test_sentencepiece_space_survives_a_run_of_skipped_special_tokens(sentencepiece):
    # The window must not slide to a context of skipped tokens only: it decodes to "", and the
    # next token would then lose its leading space as if it began the text.
    ids = sentencepiece.encode("hello", add_special_tokens=False) + [sentencepiece.eos_token_id] * 40
    ids += sentencepiece.encode("the world", add_special_tokens=False)
    assert sentencepiece.decode(ids, skip_special_tokens=True) == "hello the world"
    assert "".join(run(sentencepiece, [[i] for i in ids])) == "hello the world"


def test_sentencepiece_byte_fallback_characters_are_never_split(sentencepiece):
    ids = sentencepiece.encode("a 🤖 b", add_special_tokens=False)
    assert sentencepiece.convert_ids_to_tokens(ids).count("<0xF0>") == 1
    deltas = run(sentencepiece, [[i] for i in ids])
    assert "".join(deltas) == "a 🤖 b"
    assert " 🤖" in deltas or "🤖" in deltas


# ---- stop strings --------------------------------------------------------------------------------


def reference_stop(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Checked one character at a time: the first stop to be completed, the longest on a tie."""
    for end in range(1, len(text) + 1):
        completed = [s for s in stop if s and text[:end].endswith(s)]
        if completed:
            found = max(completed, key=len)
            return text[: end if include else end - len(found)], found
    return text, None


def feed_all(pieces: list[str], stop: list[str], include: bool) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include)
    out, found = "", None
    fed = ""
    for piece in pieces:
        fed += piece
        emitted, hit = matcher.feed(piece)
        out += emitted
        if hit is not None:
            assert found is None
            found = hit
        elif found is None:
            assert len(fed) - len(out) <= max((len(s) for s in stop), default=1) - 1
    if found is None:
        out += matcher.flush()
    return out, found


STOP_CASES = [
    ("STOP then text", ["STOP"]),  # at the start
    ("text STOP text", ["STOP"]),  # in the middle
    ("text then STOP", ["STOP"]),  # at the very end
    ("no stop in here", ["STOP"]),
    ("xabcdy", ["abcd", "bc"]),  # overlapping: "bc" is completed first
    ("xabcy", ["bc", "abc"]),  # same end: the longer (earlier) one
    ("aaab aab", ["aab"]),  # a partial match that fails, then a real one
    ("ab", ["abcdef"]),  # a stop longer than all the text
    ("one\n\ntwo", ["\n\n", "two"]),
    ("日本語のテキスト。東京", ["。", "東京"]),
    ("emoji 🤖🤖 done", ["🤖🤖", "done"]),
    ("ends with a partial sto", ["stop"]),
    ("ab", ["", "b"]),  # empty stop strings are ignored
]


@pytest.mark.parametrize(("text", "stop"), STOP_CASES)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_at_every_split_of_the_text(text, stop, include):
    expected = reference_stop(text, stop, include)
    for num_cuts in range(3):
        for cuts in itertools.combinations(range(1, len(text)), num_cuts):
            bounds = (0, *cuts, len(text))
            pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
            assert feed_all(pieces, stop, include) == expected, pieces


def test_reference_stop_answers_are_the_intended_ones():
    assert reference_stop("xabcdy", ["abcd", "bc"], False) == ("xa", "bc")
    assert reference_stop("xabcy", ["bc", "abc"], True) == ("xabc", "abc")
    assert reference_stop("text STOP text", ["STOP"], False) == ("text ", "STOP")


def test_only_what_could_start_a_stop_is_held_back():
    matcher = StopStringMatcher(["</answer>"], include_stop_str_in_output=False)
    assert matcher.feed("The result is 4 <") == ("The result is 4 ", None)
    assert matcher.feed("/ans") == ("", None)
    assert matcher.feed("wer-ish") == ("</answer-ish", None)
    assert matcher.feed("xyz") == ("xyz", None)
    assert matcher.flush() == ""


def test_held_back_text_is_released_by_flush():
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    assert matcher.feed("almost ST") == ("almost ", None)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_after_a_stop_nothing_more_is_emitted():
    matcher = StopStringMatcher(["\n"], include_stop_str_in_output=True)
    assert matcher.feed("line\nrest") == ("line\n", "\n")
    assert matcher.is_stopped and matcher.stop_str == "\n"
    assert matcher.feed("more text\n") == ("", None)
    assert matcher.flush() == ""


def test_no_stop_ends_in_text_fed_before_min_tokens_but_one_may_begin_there():
    matcher = StopStringMatcher([",", "END"], include_stop_str_in_output=False)
    assert matcher.feed("1,", can_stop=False) == ("1,", None)
    assert matcher.feed(" 2, E", can_stop=False) == (" 2, ", None)  # "E" may begin "END"
    assert matcher.feed("N", can_stop=False) == ("", None)  # still held, still cannot end
    assert matcher.feed("D 3, 4") == ("", "END")  # began before, ends now: counts
    matcher = StopStringMatcher([","], include_stop_str_in_output=True)
    assert matcher.feed("1, 2", can_stop=False) == ("1, 2", None)
    assert matcher.feed(", 3,") == (",", ",")


def test_a_stop_held_back_while_it_could_not_end_does_not_end_later():
    matcher = StopStringMatcher(["ab", "b"], include_stop_str_in_output=False)
    assert matcher.feed("xa", can_stop=False) == ("x", None)  # "a" may begin "ab"
    assert matcher.feed("b", can_stop=False) == ("ab", None)
    assert matcher.feed("cb") == ("c", "b")


def test_without_stop_strings_text_passes_through():
    matcher = StopStringMatcher([], include_stop_str_in_output=False)
    assert matcher.feed("anything at all") == ("anything at all", None)
    assert matcher.flush() == ""


def test_detokenizer_and_stop_matcher_together(smollm2):
    text = "The answer: 東京🤖 is here. Then more text follows."
    ids = smollm2.encode(text)
    for stop, expected in [(["🤖"], "The answer: 東京"), (["here."], "The answer: 東京🤖 is "), (["zzz"], text)]:
        detokenizer = IncrementalDetokenizer(smollm2)
        matcher = StopStringMatcher(stop, include_stop_str_in_output=False)
        out, hit = "", None
        for token_id in ids:
            emitted, hit = matcher.feed(detokenizer.push([token_id]))
            out += emitted
            if hit:
                break
        if hit is None:
            out += matcher.feed(detokenizer.flush())[0] + matcher.flush()
        assert out == expected
        assert hit == (None if stop == ["zzz"] else stop[0])
