"""`--generation-config`: the sampling defaults a request gets for the fields it leaves out.

`auto` (vLLM's default) reads the model's own: an HF directory's `generation_config.json` or a
GGUF's `general.sampling.*` metadata (llama.cpp's keys). `vllm` ignores them: vLLM's neutral
defaults (temperature 1, no filters, no penalty). Any other value is a directory whose
`generation_config.json` is read. Only temperature, top_p, top_k, min_p and repetition_penalty
are taken; a field the request sets, to any value, wins.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ipc.shared.vocabulary import read_gguf_metadata

logger = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# the GGUF key llama.cpp writes for each field (gguf-py's Keys.General.SAMPLING_*)
GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def load_generation_defaults(setting: str, model: str) -> dict[str, float | int]:
    """The defaults in force for `--generation-config setting` with the artifact `model`."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        source = model
    else:
        if not os.path.isdir(setting):
            raise ValueError(f"--generation-config {setting!r}: not 'auto', 'vllm' or a directory")
        source = setting
    path = Path(source)
    if path.is_dir():
        file = path / "generation_config.json"
        if not file.is_file():
            return {}
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            return {}
        return _typed({name: data[name] for name in FIELDS if name in data})
    if path.is_file() and path.suffix.lower() == ".gguf":
        found = read_gguf_metadata(str(path), set(GGUF_KEYS))
        return _typed({GGUF_KEYS[key]: value for key, value in found.items()})
    return {}


def _typed(values: dict) -> dict[str, float | int]:
    result: dict[str, float | int] = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # null or junk in a model's file is no default
        # GGUF floats are float32: 0.6 is read as 0.6000000238; 7 digits give back the written value
        result[name] = int(value) if name == "top_k" else float(f"{value:.7g}")
    return result


def describe(defaults: dict[str, float | int]) -> str:
    if not defaults:
        return "vLLM's neutral sampling defaults"
    return "the model's sampling defaults " + ", ".join(f"{k}={v:g}" for k, v in sorted(defaults.items()))
