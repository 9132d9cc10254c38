"""The model's tokenizer: loaded from a Hugging Face directory, or rebuilt from a GGUF file.

A GGUF file has no `tokenizer.json`; it carries llama.cpp's description of the tokenizer as
metadata (`tokenizer.ggml.*`). transformers can read that too, but only through torch, which the
frontend does not have, so for byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`:
GPT-2, SmolLM, Llama 3, ...) we rebuild the `tokenizers.Tokenizer` here:

- model: BPE over the file's tokens (already spelled in GPT-2's byte alphabet) and merges;
- pre-tokenizer: chosen by `tokenizer.ggml.pre`, the name llama.cpp gives to the way a
  vocabulary splits text into words before BPE (a regex, sometimes digits split first);
- added tokens: control tokens (type 3) are special, user-defined ones (type 4) are plain
  added tokens; both are matched whole in the text, never cut by BPE;
- BOS/EOS/UNK/PAD from their ids, `add_bos_token`, and the chat template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ipc.shared.vocabulary import TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED, read_gguf_metadata

# Llama 3 (tiktoken's cl100k shape): case-insensitive contractions, a letter run may take one
# leading non-letter, non-digit (not a newline), numbers in groups of up to 3 digits, newlines
# kept with the symbols before them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen 2: Llama 3's split with single digits.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one family of `tokenizer.ggml.pre` values splits text before BPE."""

    # None: GPT-2's split, built into the ByteLevel pre-tokenizer: contractions, letters,
    # numbers, other symbols, each with at most one leading space; a whitespace run leaves its
    # last space to the word that follows.
    split_regex: str | None
    split_digits: bool = False  # every digit its own word, before the regex
    ignore_merges: bool = False  # a word found whole in the vocabulary is one token
    nfc: bool = False  # NFC-normalize the text first

    def build(self) -> pre_tokenizers.PreTokenizer:
        steps: list[pre_tokenizers.PreTokenizer] = []
        if self.split_digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        if self.split_regex is None:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(self.split_regex), behavior="isolated"))
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


_GPT2 = PreTokenizerSpec(split_regex=None)
_DIGITS_THEN_GPT2 = PreTokenizerSpec(split_regex=None, split_digits=True)
_LLAMA3 = PreTokenizerSpec(split_regex=LLAMA3_SPLIT, ignore_merges=True)
_QWEN2 = PreTokenizerSpec(split_regex=QWEN2_SPLIT, nfc=True)

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


class TokenizerLoadError(ValueError):
    """The tokenizer cannot be built from the artifact; the message names the file."""


def load_tokenizer(model_path: str) -> PreTrainedTokenizerFast:
    """The tokenizer of a Hugging Face model directory or of a GGUF file (local files only)."""
    if os.path.isdir(model_path):
        return _load_hf_tokenizer(model_path)
    if not os.path.isfile(model_path):
        raise TokenizerLoadError(f"{model_path}: no such model file or directory")
    return _load_gguf_tokenizer(model_path)


def eos_token_ids(tokenizer: PreTrainedTokenizerFast, model_path: str) -> list[int]:
    """The token ids that end generation: the tokenizer's EOS; for a Hugging Face directory also
    `generation_config.json`'s `eos_token_id` (an int or a list, e.g. Llama 3's `<|eot_id|>`); for
    a GGUF file also its end-of-turn and end-of-message tokens (`tokenizer.ggml.eot_token_id`,
    `eom_token_id`)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    extra = _generation_config_eos_ids(model_path) if os.path.isdir(model_path) else []
    for token_id in [*extra, *getattr(tokenizer, "end_of_turn_token_ids", ())]:
        if token_id not in ids:
            ids.append(token_id)
    return ids


def _generation_config_eos_ids(model_dir: str) -> list[int]:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("eos_token_id")
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"{path}: cannot read it: {exc}") from exc
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _load_hf_tokenizer(model_dir: str) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
        raise TokenizerLoadError(f"{model_dir}: cannot load its tokenizer: {exc}") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TokenizerLoadError(f"{model_dir}: needs a fast tokenizer (tokenizer.json), got {type(tokenizer).__name__}")
    return tokenizer


# ---- GGUF -------------------------------------------------------------------------------------


def _load_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    metadata = read_gguf_tokenizer_metadata(path)
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerLoadError(
            f"{path}: tokenizer model {model!r} is not supported from a GGUF file "
            "(only byte-level BPE, 'gpt2'); serve the model's Hugging Face directory instead"
        )
    return build_byte_level_tokenizer(metadata, source=path)


def read_gguf_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The `tokenizer.*`, `general.*` and context-length metadata of a GGUF file as plain values."""
    try:
        metadata = read_gguf_metadata(path, _is_tokenizer_key)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside the reader
        raise TokenizerLoadError(f"{path}: not a readable GGUF file: {exc}") from exc
    if "tokenizer.ggml.tokens" not in metadata:
        raise TokenizerLoadError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    return metadata


def _is_tokenizer_key(name: str) -> bool:
    return name.startswith(("tokenizer.", "general.")) or name.endswith(".context_length")


def build_byte_level_tokenizer(metadata: dict[str, Any], *, source: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a byte-level BPE vocabulary's GGUF metadata (`source` names the file
    in errors)."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise TokenizerLoadError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types")
    spec = _pre_tokenizer_spec(metadata, source)

    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a repeated spelling keeps its first id
    try:
        merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or []]
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False)
    except Exception as exc:
        raise TokenizerLoadError(f"{source}: invalid BPE vocabulary or merges: {exc}") from exc
    backend = Tokenizer(bpe)
    if spec.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = spec.build()
    backend.decoder = decoders.ByteLevel()
    # Matched whole before BPE. A token whose spelling repeats an earlier one cannot be added
    # under its own id (the vocabulary maps a spelling to one id), so it is left out.
    for token_type, add in ((TOKEN_TYPE_USER_DEFINED, backend.add_tokens), (TOKEN_TYPE_CONTROL, backend.add_special_tokens)):
        add(
            [
                AddedToken(token, special=token_type == TOKEN_TYPE_CONTROL, normalized=False)
                for token_id, (token, t) in enumerate(zip(tokens, token_types))
                if t == token_type and vocab[token] == token_id
            ]
        )

    def token_for(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise TokenizerLoadError(f"{source}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary")
        return tokens[token_id]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_for("bos_token_id"),
        eos_token=token_for("eos_token_id"),
        unk_token=token_for("unknown_token_id"),
        pad_token=token_for("padding_token_id"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=_context_length(metadata),
    )
    tokenizer.chat_template = metadata.get("tokenizer.chat_template")
    # Read by eos_token_ids(): a GGUF names these apart from EOS, and they end a turn too.
    tokenizer.end_of_turn_token_ids = [
        token_id
        for token_id in (metadata.get("tokenizer.ggml.eot_token_id"), metadata.get("tokenizer.ggml.eom_token_id"))
        if token_id is not None and 0 <= token_id < len(tokens)
    ]
    return tokenizer


def _pre_tokenizer_spec(metadata: dict[str, Any], source: str) -> PreTokenizerSpec:
    name = metadata.get("tokenizer.ggml.pre") or "default"  # older files have no name
    spec = PRE_TOKENIZERS.get(name)
    if spec is None:
        raise TokenizerLoadError(
            f"{source}: pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return spec


def _context_length(metadata: dict[str, Any]) -> int:
    arch = metadata.get("general.architecture")
    value = metadata.get(f"{arch}.context_length") if arch else None
    return int(value) if value else int(1e30)


# ---- prompts: refusing a huge one without tokenizing all of it --------------------------------

# A prompt longer than this is counted a piece at a time first (about 25 ms a piece with
# SmolLM2's tokenizer), and the count stops as soon as it shows that the prompt cannot fit. So a
# multi-megabyte prompt is refused after a few pieces, and never becomes millions of token ids
# (tokenized whole, a 7.6 MB prompt took 5.4 s, and six of them grew the frontend by 1.8 GB).
PROMPT_CHUNK_CHARS = 16 * 1024
# Pieces tokenized apart can count differently from the whole text around each cut. Cuts are
# made where a whitespace run starts, which changed no count over 3,000 random strings with
# SmolLM2's tokenizer; a cut elsewhere (a piece with no whitespace) changed it by at most 9 (a
# special token cut in two). Each cut is allowed this much.
CHUNK_CUT_SLACK_TOKENS = 16


class PromptTooLongError(ValueError):
    """A prompt has at least `min_num_tokens` tokens, which is already too many."""

    def __init__(self, min_num_tokens: int) -> None:
        super().__init__(f"the prompt has at least {min_num_tokens} tokens")
        self.min_num_tokens = min_num_tokens


def encode_prompt(
    tokenizer: PreTrainedTokenizerFast, text: str, *, add_special_tokens: bool, max_num_tokens: int
) -> list[int]:
    """The token ids of `text`, or a `PromptTooLongError` when it certainly has more than
    `max_num_tokens`, found without tokenizing all of a long text. Blocking: call it from a
    worker thread."""
    if len(text) > PROMPT_CHUNK_CHARS:
        num_tokens = tokenizer.num_special_tokens_to_add() if add_special_tokens else 0
        for num_cuts, chunk in enumerate(_prompt_chunks(text)):
            num_tokens += len(tokenizer.encode(chunk, add_special_tokens=False))
            min_num_tokens = num_tokens - num_cuts * CHUNK_CUT_SLACK_TOKENS
            if min_num_tokens > max_num_tokens:
                raise PromptTooLongError(min_num_tokens)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _prompt_chunks(text: str):
    start = 0
    while start < len(text):
        end = start + PROMPT_CHUNK_CHARS
        if end < len(text):
            end = _cut_point(text, start + PROMPT_CHUNK_CHARS // 2, end)
        yield text[start:end]
        start = end


def _cut_point(text: str, lo: int, hi: int) -> int:
    """Where the last whitespace run in `text[lo:hi]` starts, else `hi`."""
    j = max(text.rfind(" ", lo, hi), text.rfind("\n", lo, hi))
    while j > lo and text[j - 1].isspace():
        j -= 1
    return j if j > lo else hi
