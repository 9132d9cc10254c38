"""Real client libraries (the `clients` extra) against the real server of tests/e2e/conftest.py.

None of them may reach beyond 127.0.0.1: the machines that run these tests have no internet, and
a client that tries would hang or fail by chance. The settings below turn off what the libraries
fetch or send on their own (LiteLLM's model-cost map, the Agents SDK's traces, LangSmith's); an
audit hook refuses and records every other connection or name lookup while the libraries are
imported and while a test here runs, so a test fails when one is attempted, even by a library
that swallows the error.
"""

from __future__ import annotations

import ipaddress
import os
import sys

import pytest

# Read when the libraries are imported.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
os.environ["LANGSMITH_TRACING"] = "false"
os.environ["LANGCHAIN_TRACING_V2"] = "false"

outbound_attempts: list[str] = []  # what was refused, for the next test here to report
_is_watching = False  # audit hooks cannot be removed: outside these tests the hook does nothing


def _is_loopback(host: object) -> bool:
    if host is None:  # getaddrinfo(None, port): the local host
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # any other host name
        return False


def _refuse_outbound(event: str, args: tuple) -> None:
    if not _is_watching:
        return
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _is_loopback(address[0]):  # not AF_UNIX
            outbound_attempts.append(f"connect {address}")
            raise ConnectionRefusedError(f"the test refuses a connection to {address}: only loopback")
    elif event == "socket.getaddrinfo" and not _is_loopback(args[0]):
        outbound_attempts.append(f"getaddrinfo {args[0]!r}")
        raise OSError(f"the test refuses to look up {args[0]!r}: only loopback")


sys.addaudithook(_refuse_outbound)
_is_watching = True
import agents  # noqa: E402  (imported here, watched; the test modules reuse them)
import langchain_openai  # noqa: E402,F401
import litellm  # noqa: E402,F401
import llama_index.llms.openai_like  # noqa: E402,F401

agents.set_tracing_disabled(True)
_is_watching = False


@pytest.fixture(autouse=True)
def no_outbound_connections():
    global _is_watching
    assert outbound_attempts == [], f"importing a client tried to leave the machine: {outbound_attempts}"
    _is_watching = True
    try:
        yield
    finally:
        _is_watching = False
    attempts, outbound_attempts[:] = list(outbound_attempts), []
    assert attempts == [], f"a client tried to leave the machine: {attempts}"
