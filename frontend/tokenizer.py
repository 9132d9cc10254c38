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

SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral 7B v0.1,
TinyLlama, Gemma, Phi-3) are rebuilt as `build_sentencepiece_tokenizer` describes: BPE whose
merges are recovered from the tokens' ranks, "▁" for a space, `<0xNN>` byte fallback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ipc.shared.vocabulary import (
    SENTENCEPIECE_SPACE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_USER_DEFINED,
    read_gguf_metadata,
)

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

# Tekken (Mistral NeMo, Mistral Small 3): words split before an upper-case run that follows
# lower case ("camelCase" -> "camel", "Case"), single digits, "/" kept with the symbols before it.
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
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
_TEKKEN = PreTokenizerSpec(split_regex=TEKKEN_SPLIT)

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
    "tekken": _TEKKEN,
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
    if model == "gpt2":
        return build_byte_level_tokenizer(metadata, source=path)
    if model == "llama":
        return build_sentencepiece_tokenizer(metadata, source=path)
    raise TokenizerLoadError(
        f"{path}: tokenizer model {model!r} is not supported from a GGUF file "
        "(only byte-level BPE, 'gpt2', and SentencePiece, 'llama'); serve the model's Hugging Face directory instead"
    )


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
    token_types = _token_types(metadata, tokens, source)
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
    _add_whole_tokens(backend, tokens, token_types, vocab)

    return _fast_tokenizer(backend, metadata, tokens, source=source, add_bos_by_default=False)


def _fast_tokenizer(
    backend: Tokenizer, metadata: dict[str, Any], tokens: list[str], *, source: str, add_bos_by_default: bool
) -> PreTrainedTokenizerFast:
    """`backend` wrapped with the file's special tokens, BOS/EOS flags and chat template."""

    def token_for(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise TokenizerLoadError(f"{source}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary")
        return tokens[token_id]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_HandedOver(backend),
        bos_token=token_for("bos_token_id"),
        eos_token=token_for("eos_token_id"),
        unk_token=token_for("unknown_token_id"),
        pad_token=token_for("padding_token_id"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_by_default)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=_context_length(metadata),
    )
    tokenizer.chat_template = metadata.get("tokenizer.chat_template")
    # Read by eos_token_ids(): a GGUF names these apart from EOS, and they end a turn too.
    tokenizer.end_of_turn_token_ids = _end_of_turn_token_ids(metadata, tokens)
    return tokenizer


class _HandedOver:
    """Gives `PreTrainedTokenizerFast` the backend just built, without the deep copy it makes of
    its `tokenizer_object` (a JSON round trip of the whole vocabulary: 4-6 s for Gemma's 262k
    tokens and 515k merges on a busy 2-core machine)."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend = backend

    def __deepcopy__(self, memo: dict) -> Tokenizer:
        return self.backend

    def __getattr__(self, name: str) -> Any:  # any other use sees the backend itself
        return getattr(self.backend, name)


# The control tokens that end a chat turn, by spelling, for files that name no end-of-turn
# token (`tokenizer.ggml.eot_token_id`): Gemma's GGUF files do not, and without it a chat reply
# would run on past `<end_of_turn>` (llama.cpp recognizes these spellings the same way).
END_OF_TURN_SPELLINGS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def _end_of_turn_token_ids(metadata: dict[str, Any], tokens: list[str]) -> list[int]:
    named = [metadata.get("tokenizer.ggml.eot_token_id"), metadata.get("tokenizer.ggml.eom_token_id")]
    token_ids = [token_id for token_id in named if token_id is not None and 0 <= token_id < len(tokens)]
    if metadata.get("tokenizer.ggml.eot_token_id") is None:
        token_types = metadata.get("tokenizer.ggml.token_type") or []
        spelled = {token: token_id for token_id, token in enumerate(tokens) if token in END_OF_TURN_SPELLINGS}
        token_ids += [
            token_id
            for token_id in spelled.values()
            if token_id < len(token_types) and token_types[token_id] == TOKEN_TYPE_CONTROL
        ]
    return token_ids


# ---- SentencePiece -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SentencePieceFlavor:
    """What a family's SentencePiece tokenizer does that its GGUF metadata does not say."""

    # BPE merges are ranked by the score of the token they make (llama.cpp's rule), or by its
    # position in the file. Gemma needs positions: its user-defined whitespace pieces ("▁▁",
    # "▁▁▁", ...) score -1000 in the file, below thousands of ordinary tokens, yet SentencePiece
    # takes them whole before anything else; their early positions say so.
    rank_by_position: bool = False
    # Pieces of spaces only are stored with real spaces ("  ", "   ", ...; llama.cpp's converter
    # writes Gemma's user-defined "▁▁" pieces so) and become "▁" runs again, the spelling the
    # text has when it reaches BPE. Elsewhere such a token is a user-defined token matched whole.
    spaces_stored_as_spaces: bool = False
    # Where the prefix space (`tokenizer.ggml.add_space_prefix`) goes: before the text's start
    # only, or before every stretch of text between special tokens, as Phi-3's tokenizer.json
    # does (a `Prepend("▁")` normalizer; "<|user|>hi" becomes "<|user|>", "▁hi").
    prefix_every_segment: bool = False


SENTENCEPIECE_FLAVORS: dict[str, SentencePieceFlavor] = {
    "gemma": SentencePieceFlavor(rank_by_position=True, spaces_stored_as_spaces=True),
    "gemma2": SentencePieceFlavor(rank_by_position=True, spaces_stored_as_spaces=True),
    "gemma3": SentencePieceFlavor(rank_by_position=True, spaces_stored_as_spaces=True),
    "phi3": SentencePieceFlavor(prefix_every_segment=True),
}


def build_sentencepiece_tokenizer(metadata: dict[str, Any], *, source: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a SentencePiece vocabulary's GGUF metadata (`tokenizer.ggml.model`
    "llama"; `source` names the file in errors).

    - model: BPE over the file's tokens, with the merges the tokens' ranks imply (the file has
      none; see `sentencepiece_merges`), byte fallback to the `<0xNN>` tokens for a character
      that has no token;
    - a space is "▁"; with `tokenizer.ggml.add_space_prefix` (default true; Gemma's files say
      false) a "▁" goes before the text, and decoding drops the first space again;
    - what the file does not say comes from the architecture's `SentencePieceFlavor`;
    - control tokens are special, user-defined ones (Gemma's "\n", "\t\t", `<start_of_image>`)
      plain added tokens, both matched whole; BOS is added unless the file says
      `add_bos_token = false`.
    """
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types = _token_types(metadata, tokens, source)
    scores: list[float] | None = metadata.get("tokenizer.ggml.scores")
    if scores is not None and len(scores) != len(tokens):
        raise TokenizerLoadError(f"{source}: {len(tokens)} tokens but {len(scores)} scores")
    flavor = SENTENCEPIECE_FLAVORS.get(metadata.get("general.architecture") or "", SentencePieceFlavor())
    if flavor.rank_by_position or scores is None:
        ranks = [-float(token_id) for token_id in range(len(tokens))]
    else:
        ranks = [float(score) for score in scores]

    pieces = [_spaces_respelled(token) for token in tokens] if flavor.spaces_stored_as_spaces else tokens
    vocab: dict[str, int] = {}
    for token_id, piece in enumerate(pieces):
        vocab.setdefault(piece, token_id)  # a repeated spelling keeps its first id
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_token = pieces[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(pieces) else None
    try:
        bpe = models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(pieces, ranks, vocab),
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as exc:
        raise TokenizerLoadError(f"{source}: invalid SentencePiece vocabulary: {exc}") from exc
    backend = Tokenizer(bpe)
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    if add_prefix and flavor.prefix_every_segment:
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SENTENCEPIECE_SPACE), normalizers.Replace(" ", SENTENCEPIECE_SPACE)]
        )
    else:
        # One word per stretch of text: SentencePiece does not split before merging.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SENTENCEPIECE_SPACE, prepend_scheme="first" if add_prefix else "never", split=False
        )
    steps = [decoders.Replace(SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    _add_whole_tokens(backend, tokens, token_types, vocab)
    return _fast_tokenizer(backend, metadata, tokens, source=source, add_bos_by_default=True)


def _spaces_respelled(token: str) -> str:
    if token and token.strip(" ") == "":
        return SENTENCEPIECE_SPACE * len(token)
    return token


def sentencepiece_merges(pieces: list[str], ranks: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The BPE merges that a SentencePiece vocabulary implies, best first.

    SentencePiece's BPE joins, at each step, the adjacent pair whose joined piece ranks best.
    As BPE merges: every cut of a piece into two pieces of the vocabulary is a merge, ranked by
    the joined piece's rank; merges of equally ranked pieces go longer left part first, then
    longer right part, then in vocabulary order (transformers orders them so, and identical
    token ids need the same order).
    """
    # 1.2M candidate cuts for Gemma's vocabulary (about 2 s of CPU), so the loop is kept lean.
    # Cuts are made in the order they sort in (a vocabulary ranked by position needs no
    # reordering at all).
    known = vocab.__contains__
    keyed: list[tuple[float, int, int, int, str, str]] = []
    add = keyed.append
    for order, piece in enumerate(pieces):
        length = len(piece)
        if length < 2 or vocab[piece] != order:
            continue
        rank = -ranks[order]
        for cut in range(length - 1, 0, -1):
            left = piece[:cut]
            if known(left):
                right = piece[cut:]
                if known(right):
                    add((rank, -cut, cut - length, order, left, right))
    keyed.sort()
    return [(left, right) for *_, left, right in keyed]


def _add_whole_tokens(backend: Tokenizer, tokens: list[str], token_types: list[int], vocab: dict[str, int]) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens: both are
    matched whole in the raw text before the model sees it. A token whose spelling repeats an
    earlier one, or that the vocabulary spells differently, cannot be added under its own id (the
    vocabulary maps a spelling to one id), so it is left out."""
    for token_type, add in ((TOKEN_TYPE_USER_DEFINED, backend.add_tokens), (TOKEN_TYPE_CONTROL, backend.add_special_tokens)):
        add(
            [
                AddedToken(token, special=token_type == TOKEN_TYPE_CONTROL, normalized=False)
                for token_id, (token, t) in enumerate(zip(tokens, token_types))
                if t == token_type and vocab.get(token) == token_id
            ]
        )


def _token_types(metadata: dict[str, Any], tokens: list[str], source: str) -> list[int]:
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise TokenizerLoadError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types")
    return token_types


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
