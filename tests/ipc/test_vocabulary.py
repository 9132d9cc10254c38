"""The engine's view of the vocabulary (token bytes read from the artifact) is the frontend's."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from frontend.serving_logprobs import TokenStrings
from frontend.tokenizer import load_tokenizer
from ipc.shared.vocabulary import VocabularyError, read_gguf_metadata, read_vocabulary
from tiny_llama import EOS_ID, write_tiny_llama


def assert_same_bytes(vocabulary, tokenizer) -> None:
    strings = TokenStrings(tokenizer)
    assert vocabulary.size == len(tokenizer)
    mismatched = [i for i in range(vocabulary.size) if vocabulary.token_bytes[i] != strings.bytes_of(i)]
    assert mismatched == []


def test_gguf_vocabulary_spells_the_reference_token_ids(default_model):
    """transformers' ids for the golden texts (emoji, accents, code, whitespace runs) join to
    those texts' exact bytes."""
    vocabulary = read_vocabulary(default_model)
    assert vocabulary.size == 49152 and vocabulary.eos_token_id == 2
    assert vocabulary.token_bytes[2] == b"<|im_end|>" and 2 in vocabulary.special_token_ids
    assert len(vocabulary.special_token_ids) == 17
    golden = json.loads((Path(__file__).parents[1] / "golden" / "smollm2_tokenizer.json").read_text())
    for text, ids in zip(golden["texts"], golden["ids"]):
        assert b"".join(vocabulary.token_bytes[i] for i in ids) == text.encode(), text
    for case in golden["chat_cases"]:
        assert b"".join(vocabulary.token_bytes[i] for i in case["ids"]) == case["text"].encode()


def test_hugging_face_vocabulary_matches_the_frontend_tokenizer(tmp_path):
    write_tiny_llama(tmp_path, "tied")
    vocabulary = read_vocabulary(str(tmp_path))
    assert vocabulary.eos_token_id == EOS_ID and vocabulary.special_token_ids == [0, 1, 2, 3]
    assert_same_bytes(vocabulary, load_tokenizer(str(tmp_path)))


def test_sentencepiece_style_tokens(tmp_path):
    model = {"type": "BPE", "vocab": {"<unk>": 0, "<0x0A>": 1, "\u2581the": 2, "re": 3}, "merges": [],
             "byte_fallback": True}
    decoder = {"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}]}
    added = [{"id": 4, "content": "</s>", "special": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model, "decoder": decoder, "added_tokens": added}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    vocabulary = read_vocabulary(str(tmp_path))
    assert vocabulary.token_bytes == [b"<unk>", b"\n", b" the", b"re", b"</s>"]
    assert vocabulary.special_token_ids == [4] and vocabulary.eos_token_id == 4


def test_gguf_metadata_reader_reads_only_the_asked_keys(tmp_path):
    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    entries = [
        string("general.name") + struct.pack("<I", 8) + string("toy"),
        string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("b"),
        string("some.floats") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 1, 2, 3),
        string("tokenizer.ggml.eos_token_id") + struct.pack("<II", 4, 1),
    ]
    path = tmp_path / "toy.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries)) + b"".join(entries))
    keys = {"tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id", "missing"}
    assert read_gguf_metadata(str(path), keys) == {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.eos_token_id": 1}
    with pytest.raises(VocabularyError, match="tokenizer model None"):
        read_vocabulary(str(path))
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(VocabularyError, match="not a readable GGUF"):
        read_vocabulary(str(tmp_path / "bad.gguf"))
