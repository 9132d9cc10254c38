"""Offline chat with the Python API: the model's chat template, no server.

    python examples/offline_chat.py [MODEL_PATH]    (default: the embedded SmolLM2 model)
"""

import sys

from furiosa_llm import LLM, SamplingParams

conversation = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]

with LLM(sys.argv[1] if len(sys.argv) > 1 else None, kv_cache_gib=0.5) as llm:
    (output,) = llm.chat(conversation, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    print(output.outputs[0].text)
