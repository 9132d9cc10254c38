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
