"""Engine fixtures: the default model's weights loaded once, and a factory for EngineCores."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits

from engine_core.core import EngineCore
from engine_core.loader import load_artifact
from ipc.config import EngineConfig


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    """As the engine process runs by default: two BLAS threads collapse when the machine is busy."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def smollm2(default_model):
    return load_artifact(default_model)


@pytest.fixture
def make_core(smollm2, default_model):
    """EngineCore over the default model; keyword arguments override EngineConfig fields."""

    def make(**overrides) -> EngineCore:
        settings = {"kv_cache_gib": 0.25, **overrides}
        config = EngineConfig(model=default_model, served_model_name="smollm2", **settings)
        model_config, weights = smollm2
        return EngineCore(config, model_config, weights)

    return make
