"""What stands in for a model in frontend tests: a small byte-level BPE tokenizer with a ChatML
template, token scripts for the fake engine, and a parser for OpenAI's SSE framing."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ipc.messages import EngineCoreRequest

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2  # <|im_end|>
MAX_MODEL_LEN = 128
MODEL_NAME = "test-model"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "A stop string may end in the middle of a token, or span several tokens.",
    "Streaming text arrives one token at a time; the server holds back what could be a stop.",
    "Numbers like 12345 and symbols like {} [] () are tokens too. Ünïcödé and 日本語 and 🙂.",
] * 4

# What the fake engine "generates": tokens of this text, rotated by seed and sequence index.
SCRIPT_TEXT = "Hello world! The quick brown fox jumps over the lazy dog. A stop string may end here."


def build_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", bos_token=None, clean_up_tokenization_spaces=False
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def rotating_script(tokenizer: PreTrainedTokenizerFast):
    script_ids = tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)

    def script(request: EngineCoreRequest, index: int) -> list[int]:
        shift = ((request.sampling_params.seed or 0) + 3 * index) % len(script_ids)
        return script_ids[shift:] + script_ids[:shift]

    return script


def text_script(tokenizer: PreTrainedTokenizerFast, *texts: str, eos: bool = True):
    """A script that generates `texts[index]` (then EOS) for sequence `index`."""
    encoded = [tokenizer.encode(t, add_special_tokens=False) + ([EOS_ID] if eos else []) for t in texts]
    return lambda request, index: encoded[index % len(encoded)]


def parse_sse(body: str) -> list[dict | str]:
    """The events of an OpenAI-framed SSE body; asserts the framing itself."""
    assert "\r" not in body, "OpenAI frames events with LF only"
    assert body.endswith("data: [DONE]\n\n")
    events: list[dict | str] = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    return events[:-1]
