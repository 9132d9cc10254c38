"""Fixtures for frontend tests: the test tokenizer, a fake engine client, and the app wired to
both (no model, no sockets); `make_client`, apps whose fake engine plays given texts; and the
default model's tokenizer, for the tests that read it."""

from __future__ import annotations

import contextlib

import pytest
from fake_engine import FakeEngineClient
from fake_model import MAX_MODEL_LEN, MODEL_NAME, build_tokenizer, rotating_script, text_script
from litestar.testing import TestClient
from transformers import PreTrainedTokenizerFast

from frontend.app import create_app
from frontend.tokenizer import load_tokenizer
from frontend.config import FrontendConfig
from ipc.config import EngineConfig
from ipc.messages import EngineReady


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def smollm2(default_model) -> PreTrainedTokenizerFast:
    """The default model's tokenizer, loaded once (5-7 s) for every test module that reads it."""
    return load_tokenizer(default_model)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def config() -> FrontendConfig:
    return FrontendConfig(engine=EngineConfig(model="/nonexistent/model", served_model_name=MODEL_NAME, max_num_seqs=16))


@pytest.fixture
def engine(tokenizer) -> FakeEngineClient:
    info = EngineReady(MODEL_NAME, MAX_MODEL_LEN, len(tokenizer), num_kv_blocks=64, block_size=16)
    return FakeEngineClient(info, script=rotating_script(tokenizer))


@pytest.fixture
def client(config, engine, tokenizer):
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as test_client:
        yield test_client


@pytest.fixture
def make_client(config, tokenizer):
    """Apps whose fake engine generates `texts` (sequence i the i-th, in turn, then EOS), with room
    for long prompts (4 * MAX_MODEL_LEN); keyword arguments set FrontendConfig fields. Returns
    (client, engine); the clients are closed at teardown."""
    with contextlib.ExitStack() as clients:

        def make(*texts: str, **settings):
            for name, value in settings.items():
                setattr(config, name, value)
            info = EngineReady(MODEL_NAME, MAX_MODEL_LEN * 4, len(tokenizer), num_kv_blocks=64, block_size=16)
            engine = FakeEngineClient(info, script=text_script(tokenizer, *texts))
            client = clients.enter_context(TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)))
            return client, engine

        yield make
