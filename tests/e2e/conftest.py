"""One real server for the end-to-end tests of a session (the default model)."""

from __future__ import annotations

import pytest

from server import Server


@pytest.fixture(scope="session")
def server():
    srv = Server().wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def model_name(server) -> str:
    import httpx

    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]



@pytest.fixture(scope="session")
def pooling_server():
    """The default model as an embedding model (`--runner pooling`, last-token pooling), behind
    an API key (`.api_key`), with a short context (`.max_model_len`) so that an over-long input
    is cheap to send."""
    srv = Server("--runner", "pooling", "--max-model-len", "128", "--api-key", "embedding-test-key")
    srv.api_key, srv.max_model_len = "embedding-test-key", 128
    srv.wait_ready()
    yield srv
    srv.stop()
