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


POOLING_API_KEY = "embedding-test-key"
POOLING_MAX_MODEL_LEN = 128  # the golden inputs fit; a longer input is the over-long case


@pytest.fixture(scope="session")
def pooling_server():
    """The default model as an embedding model (`--runner pooling`, last-token pooling), behind
    an API key, with a short context so that an over-long input is cheap to send."""
    srv = Server("--runner", "pooling", "--max-model-len", str(POOLING_MAX_MODEL_LEN),
                 "--api-key", POOLING_API_KEY).wait_ready()
    yield srv
    srv.stop()
