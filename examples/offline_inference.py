"""Offline generation with the Python API: a batch of prompts in one call, no server.

    python examples/offline_inference.py [MODEL_PATH]    (default: the embedded SmolLM2 model)
"""

import sys

from furiosa_llm import LLM, SamplingParams

prompts = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "1, 2, 3, 4,",
]
# Greedy decoding; the engine batches all prompts of one call.
sampling_params = SamplingParams(temperature=0.0, max_tokens=16)

with LLM(sys.argv[1] if len(sys.argv) > 1 else None, kv_cache_gib=0.5) as llm:
    for output in llm.generate(prompts, sampling_params):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
