"""Write tests/golden/smollm2_embeddings.json: what transformers + PyTorch give as embeddings.

For fixed texts, tokenized here by transformers' tokenizer of the default model (the SmolLM2
GGUF), the model's last hidden state (after the final RMSNorm) pooled two ways, as
`furiosa-llm serve --runner pooling --pooler-type last|mean` does: the last token's state, and
the mean over the prompt's tokens; each L2-normalized. Full vectors (576 floats) are stored, 7
significant digits. Torch is a dependency of this script only (see make_golden.py):

    /work/torchvenv/bin/python scripts/make_embedding_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_golden import (  # noqa: E402  (the same model lookup, loading and JSON layout)
    SMOLLM2_GGUF_NAME,
    load_smollm2_model,
    load_smollm2_tokenizer,
    make_deterministic,
    round_sig,
    versions,
    write_golden,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France.",
    # long enough (over 100 tokens) for chunked prefill and mean pooling over many positions
    "In the beginning the universe was created. This has made a lot of people very angry and "
    "been widely regarded as a bad move. Many were increasingly of the opinion that they'd all "
    "made a big mistake in coming down from the trees in the first place. And some said that "
    "even the trees had been a bad move, and that no one should ever have left the oceans. "
    "Far out in the uncharted backwaters of the unfashionable end of the western spiral arm of "
    "the Galaxy lies a small unregarded yellow sun.",
]


def normalized(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def main() -> None:
    import torch

    make_deterministic()
    tokenizer = load_smollm2_tokenizer()
    model = load_smollm2_model()
    cases = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer.encode(text, add_special_tokens=True)
            # the decoder stack alone: its output is the final-normed hidden state of each position
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
            cases.append({
                "text": text,
                "token_ids": ids,
                "last": round_sig(normalized(hidden[-1]), 7),
                "mean": round_sig(normalized(hidden.mean(axis=0)), 7),
            })
    write_golden("smollm2_embeddings.json", {
        "source": f"transformers {SMOLLM2_GGUF_NAME} (dequantized to float32): model.model(ids).last_hidden_state, "
                  "pooled (last token; mean over the prompt) and L2-normalized",
        "versions": versions(),
        "hidden_size": int(model.config.hidden_size),
        "cases": cases,
    })


if __name__ == "__main__":
    main()
