"""Small GGUF files that hold only a tokenizer, for the tokenizer identity tests, and the texts
those tests encode. Deterministic: `scripts/make_tokenizer_golden.py` writes the same files and
records what transformers makes of them in tests/golden/gguf_tokenizers.json, with the digest
of each file's vocabulary (`vocabulary_digest`) so a test can tell the golden belongs to it.

- `tiny_sentencepiece`: a SentencePiece-style vocabulary ("▁" words, scores, `<0xNN>` byte
  fallback, control and user-defined tokens) of ~450 tokens, learned here by a few lines of BPE
  over `CORPUS`; written as a `llama` and as a `phi3` file (the two prefix-space styles).
- `tiny_qwen2`: a byte-level BPE vocabulary (GPT-2's byte alphabet, merges) with Qwen 2's
  pre-tokenizer and its special tokens; `tiny_tekken` the same with Mistral NeMo's.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

import gguf

CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.
def tokenize(text):
    return [piece for piece in text.split() if piece]
for i in range(10): print(i, i * i)
Tokenizers turn text into tokens, and tokens back into text. 日本語のテキスト 日本
Hello, world! How are you today? I am fine, thank you. 12345 67890
"""

SPACE = "\u2581"

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _learn_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: join the most frequent adjacent pair (ties: the smallest pair) each round."""
    split = {word: list(word) for word in words}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            parts = split[word]
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, parts in split.items():
            i, joined = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    joined.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            split[word] = joined
    return merges


# ---- SentencePiece ------------------------------------------------------------------------------

SP_CONTROL = ["<|turn|>", "<|end_turn|>"]
SP_USER_DEFINED = ["<|tool|>", "[img]"]


def sentencepiece_vocabulary() -> dict:
    """tokens, scores and types as a SentencePiece BPE model lays them out: special tokens, the
    256 bytes, then merged pieces best first, then single characters by frequency."""
    words = Counter(SPACE + word for word in CORPUS.split())
    merged = [a + b for a, b in _learn_merges(words, 160)]
    chars = Counter(c for word, count in words.items() for c in word for _ in range(count))
    singles = sorted((c for c in chars if c not in merged), key=lambda c: (-chars[c], c))
    tokens = ["<unk>", "<s>", "</s>", *SP_CONTROL, *SP_USER_DEFINED]
    types = [UNKNOWN, CONTROL, CONTROL, *[CONTROL] * len(SP_CONTROL), *[USER_DEFINED] * len(SP_USER_DEFINED)]
    scores = [0.0] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    scores += [0.0] * 256
    pieces = list(dict.fromkeys(merged + singles))
    tokens += pieces
    types += [NORMAL] * len(pieces)
    scores += [-float(i) for i in range(len(pieces))]
    return {"tokens": tokens, "scores": scores, "types": types}


def write_sentencepiece_gguf(path: Path, *, arch: str = "llama", add_space_prefix: bool = True) -> str:
    vocab = sentencepiece_vocabulary()
    writer = _writer(path, arch, len(vocab["tokens"]))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix)
    return _finish(writer, path)


# ---- byte-level BPE with Qwen 2's pre-tokenizer -------------------------------------------------

QWEN2_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_USER_DEFINED = ["<think>", "</think>"]
# Qwen 2's split (as in frontend/tokenizer.py's QWEN2_SPLIT), used here only to learn merges
_QWEN2_WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z\u00c0-\uffff]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+""")


def _byte_alphabet() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + shifted)
            shifted += 1
    return spelling


def qwen2_vocabulary() -> dict:
    spelling = _byte_alphabet()
    words = Counter("".join(spelling[b] for b in word.encode()) for word in _QWEN2_WORDS.findall(CORPUS))
    merges = _learn_merges(words, 200)
    tokens = [spelling[b] for b in range(256)] + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens))
    types = [NORMAL] * len(tokens) + [CONTROL] * len(QWEN2_CONTROL) + [USER_DEFINED] * len(QWEN2_USER_DEFINED)
    tokens += QWEN2_CONTROL + QWEN2_USER_DEFINED
    return {"tokens": tokens, "types": types, "merges": [f"{a} {b}" for a, b in merges]}


def write_qwen2_gguf(path: Path, *, pre: str = "qwen2", arch: str = "qwen2") -> str:
    vocab = qwen2_vocabulary()
    writer = _writer(path, arch, len(vocab["tokens"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_eos_token_id(vocab["tokens"].index("<|im_end|>"))
    writer.add_bos_token_id(vocab["tokens"].index("<|endoftext|>"))
    writer.add_pad_token_id(vocab["tokens"].index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    return _finish(writer, path)


# ---- files ---------------------------------------------------------------------------------------

WRITERS = {
    "tiny_sentencepiece": lambda path: write_sentencepiece_gguf(path, arch="llama"),
    "tiny_phi3": lambda path: write_sentencepiece_gguf(path, arch="phi3"),
    "tiny_qwen2": write_qwen2_gguf,
    # the same byte-level vocabulary with Mistral NeMo's pre-tokenizer
    "tiny_tekken": lambda path: write_qwen2_gguf(path, pre="tekken", arch="llama"),
}


def vocabulary_digest(name: str) -> str:
    """Changes whenever the file `WRITERS[name]` writes would tokenize differently."""
    vocab = qwen2_vocabulary() if name in ("tiny_qwen2", "tiny_tekken") else sentencepiece_vocabulary()
    return hashlib.sha256(json.dumps([name, vocab], sort_keys=True).encode()).hexdigest()


def _writer(path: Path, arch: str, vocab_size: int) -> gguf.GGUFWriter:
    # Enough of a model description for transformers to read the file's config.
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab_size)
    return writer


def _finish(writer: gguf.GGUFWriter, path: Path) -> str:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# ---- the texts ----------------------------------------------------------------------------------

# `{bos}`, `{eos}`, `{control}` and `{user}` stand for the file's special tokens.
TEXTS = [
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "   three leading spaces and trailing   ",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers turn text into tokens, and tokens back into text.",
    "multiple    spaces   between     words",
    "tabs\tbetween\t\twords\t\t\tand\ttrailing\t",
    "line one\nline two\n\nline four\n\n\n\nline eight\n",
    "\n\nleading newlines",
    "mixed \t \n \r\n whitespace\u00a0here",
    "\t\tindented with tabs",
    "def tokenize(text):\n    return [piece for piece in text.split() if piece]\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C",
    'print(f"{x!r:>10}") if x else None  # comment',
    "<div class=\"a\">&nbsp;</div>\n\t<span>x</span>",
    "12345 67890 3.14159 -42 1e-9 0x1F",
    "日本語のテキストです。東京は日本の首都です。",
    "中文测试：你好，世界！",
    "한국어 텍스트입니다",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Ёжик в тумане.",
    "Ελληνικά και Deutsch: Grüße, Straße, naïve café",
    "emoji: 😀👍🏽🎉 and flags 🇯🇵🇫🇷 and family 👨‍👩‍👧‍👦",
    "zero width\u200bjoiner\u200d and combining e\u0301 ",
    "math ∑∫√∞ ≠ ≤ ≥ and arrows → ← ↔",
    "{bos}Hello after bos",
    "Hello{eos}",
    "{control}user\nHi there{eos} and more",
    "text {user} with a user-defined token {user}{user}",
    "{control}{control}",
    "a{control}b {control} c",
    " {bos} spaced special",
    "",
    " ",
    "\n",
    "ends with space ",
    "I'm sure they'll say it's what we've done, isn't it?",
    "URL: https://example.com/path?q=1&r=two#frag",
    "camelCaseWords, HTTPServer and XMLHttpRequest/path//x",
    "forty spaces" + " " * 40 + "end",
    "thirty-five tabs" + "\t" * 35 + "end",
    "forty newlines" + "\n" * 40 + "end",
    " \t \n" * 12,
    "{control}user\nWrite a poem.{eos}\n{control}model\n",
]


def _random_texts(count: int, seed: int = 14) -> list[str]:
    """Short strings joined from fragments at random (seeded): words of several scripts, runs of
    spaces, tabs and newlines, digits, punctuation, emoji, rare characters and special tokens."""
    fragments = [
        "the", " the", "The", "fox", " jumps", "tokens", "text", "piece", "日本", "語", "東京", "你好", "한국",
        "مرحبا", "नमस्ते", "Привет", "Ωμέγα", "café", "naïve", "e\u0301", "😀", "👍🏽", "🇯🇵", "∑", "→", "\u200b",
        "\U0001d518", "\u00a0", " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", " \n", "\r\n", "0", "42", "3.14",
        "-", "_", ".", ",", "!?", "()", "{}", "[]", "<", ">", "</", "'s", "'ll", "#", "//", "==", "->",
        "{bos}", "{eos}", "{control}", "{user}",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(fragments) for _ in range(rng.randint(1, 12))) for _ in range(count)]


TEXTS += _random_texts(120)
# The NFC forms of the texts that are not in NFC: Qwen 2 normalizes to NFC first.
TEXTS += [unicodedata.normalize("NFC", text) for text in TEXTS if unicodedata.normalize("NFC", text) != text]
TEXTS = list(dict.fromkeys(TEXTS))


def special_tokens(name: str) -> dict[str, str]:
    if name in ("tiny_qwen2", "tiny_tekken"):
        return {"bos": "<|endoftext|>", "eos": "<|im_end|>", "control": "<|im_start|>", "user": "<think>"}
    if name == "gemma3_270m":
        return {"bos": "<bos>", "eos": "<eos>", "control": "<start_of_turn>", "user": "[multimodal]"}
    return {"bos": "<s>", "eos": "</s>", "control": "<|turn|>", "user": "<|tool|>"}


def texts_for(name: str) -> list[str]:
    texts = []
    for text in TEXTS:
        for key, token in special_tokens(name).items():
            text = text.replace("{" + key + "}", token)
        texts.append(text)
    return texts
