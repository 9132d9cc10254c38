"""Start-up failures of the real `furiosa-llm serve`: one line on stderr naming the file and the
cause, a non-zero exit, no traceback (those are for `--log-level debug`), and no "serving on"
line, which comes only once the server is ready."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from server import STARTUP_TIMEOUT_S, free_port, one_engine_unless_asked
from tiny_llama import write_tiny_llama

COMMAND = os.path.join(os.path.dirname(sys.executable), "furiosa-llm")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny"
    write_tiny_llama(path, "tied")
    return path


def tiny_with(tiny_dir: pathlib.Path, tmp_path: pathlib.Path, **changes) -> pathlib.Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = {**json.loads((model / "config.json").read_text()), **changes}
    (model / "config.json").write_text(json.dumps(config))
    return model


def serve_args(*args: str) -> list[str]:
    return [COMMAND, "serve", *args, *one_engine_unless_asked(args),
            "--host", "127.0.0.1", "--port", str(free_port()), "--kv-cache-gib", "0.01"]


def run_failing(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    result = subprocess.run(serve_args(*args), capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, env=env)
    return result.returncode, result.stdout + result.stderr


def assert_one_line_failure(code: int, output: str, expected_line: str) -> None:
    assert code != 0, output
    assert "Traceback" not in output and " ERROR " not in output, output
    assert "serving" not in output and "running on" not in output, output
    assert [line for line in output.splitlines() if line.startswith("furiosa-llm:")] == [expected_line], output
    assert output.splitlines()[-1] == expected_line, output


def test_a_corrupt_gguf_is_one_line_although_every_process_fails(default_model, tmp_path):
    path = tmp_path / "head.gguf"
    with open(default_model, "rb") as f:
        path.write_bytes(f.read(100_000))  # a download cut short: every child reads it
    code, output = run_failing(str(path), "--data-parallel-size", "2")
    assert_one_line_failure(code, output, output.splitlines()[-1])
    assert output.splitlines()[-1].startswith(f"furiosa-llm: cannot load {path}: not a readable GGUF file")


@pytest.mark.parametrize(
    ("changes", "cause"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (silu only)"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel is not supported (supported: "
                                                 "Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, "
                                                 "Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported "
                                         "(rotary embedding over the whole head only)"),
    ],
)
def test_an_unsupported_model_is_one_line(tiny_dir, tmp_path, changes, cause):
    model = tiny_with(tiny_dir, tmp_path, **changes)
    code, output = run_failing(str(model))
    assert_one_line_failure(code, output, f"furiosa-llm: cannot load {model / 'config.json'}: {cause}")


def test_a_bad_chat_template_is_one_line(tiny_dir, tmp_path):
    template = tmp_path / "bad.jinja"
    template.write_text("{% for m in messages %}{{ m.content }\n")
    code, output = run_failing(str(tiny_dir), "--chat-template", str(template))
    assert_one_line_failure(code, output, f"furiosa-llm: cannot load {template}: invalid chat template (line 1): unexpected '}}'")


def test_a_max_model_len_past_the_models_positions_is_one_line(tiny_dir):
    code, output = run_failing(str(tiny_dir), "--max-model-len", "4096")
    assert_one_line_failure(code, output, (
        f"furiosa-llm: cannot load {tiny_dir}: --max-model-len 4096 is more than the model's context length "
        "(128, its max_position_embeddings); positions past it were never trained and may give wrong output "
        "(--allow-long-max-model-len accepts it anyway)"))


def test_an_out_of_range_flag_is_one_line(tiny_dir):
    result = subprocess.run([COMMAND, "serve", str(tiny_dir), "--port", "70000", "--kv-cache-gib", "0.01"],
                            capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert result.returncode != 0
    assert result.stderr == "furiosa-llm: --port must be between 1 and 65535, got 70000\n"


def test_a_port_already_in_use_is_one_line(tiny_dir):
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([COMMAND, "serve", str(tiny_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--kv-cache-gib", "0.01", "--data-parallel-size", "1"], capture_output=True, text=True,
                                timeout=STARTUP_TIMEOUT_S, env=env)
    assert_one_line_failure(result.returncode, result.stdout + result.stderr,
                            f"furiosa-llm: cannot listen on 127.0.0.1:{port}: Address already in use")


def test_log_level_debug_keeps_the_traceback(tiny_dir, tmp_path):
    model = tiny_with(tiny_dir, tmp_path, hidden_act="gelu")
    code, output = run_failing(str(model), "--log-level", "debug")
    assert code != 0
    assert "Traceback" in output and "ArtifactError" in output, output
    assert output.splitlines()[-1] == f"furiosa-llm: cannot load {model / 'config.json'}: hidden_act 'gelu' is not supported (silu only)"


class Launcher:
    """The real command with its stderr read as it comes (a reader thread; no polling)."""

    def __init__(self, *args: str):
        self.args = serve_args(*args)
        self.url = f"http://127.0.0.1:{self.args[self.args.index('--port') + 1]}"
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def lines_until(self, text: str) -> list[str]:
        """stderr's lines up to and including the first that contains `text`."""
        seen = []
        while True:
            line = self.lines.get(timeout=STARTUP_TIMEOUT_S)
            assert line is not None, f"exited with {self.process.wait()} before {text!r}:\n" + "".join(seen)
            seen.append(line)
            if text in line:
                return seen

    def stop(self) -> tuple[int, list[str]]:
        """SIGTERM; the exit code and the lines not read yet."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.reader.join(timeout=10)
        rest = []
        while (line := self.lines.get_nowait()) is not None:
            rest.append(line)
        return code, rest


def test_the_serving_line_comes_once_the_server_answers(tiny_dir):
    """When the line appears, /health is already 200: before the fix it came first of all."""
    launcher = Launcher(str(tiny_dir))
    try:
        seen = launcher.lines_until("serving")
        assert seen[-1] == f"furiosa-llm: serving {tiny_dir} as 'tiny' on {launcher.url}\n"
        assert seen[-2] == "furiosa-llm: data parallel: 1 engine core (--data-parallel-size 1), not pinned\n"
        assert httpx.get(launcher.url + "/health", timeout=10).status_code == 200
        assert not any("running on" in line for line in seen), seen  # uvicorn's early line
    finally:
        code, rest = launcher.stop()
    assert code == 0
    assert not any("serving" in line for line in rest), rest  # printed once


def test_allow_long_max_model_len_serves_the_longer_context(tiny_dir):
    launcher = Launcher(str(tiny_dir), "--allow-long-max-model-len", "--max-model-len", "256")
    try:
        launcher.lines_until("serving")
        models = httpx.get(launcher.url + "/v1/models", timeout=10).json()
        assert models["data"][0]["max_model_len"] == 256  # past the model's 128 positions
    finally:
        code, _ = launcher.stop()
    assert code == 0
