"""The shipped examples and the command's own flags work as the README says."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from server import free_port

ROOT = pathlib.Path(__file__).parents[2]
FURIOSA_LLM = os.path.join(os.path.dirname(sys.executable), "furiosa-llm")


def test_openai_client_example(server):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_client.py"), server.url + "/v1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.strip().splitlines()
    assert "Paris" in lines[0] and len(lines) >= 2


def test_curl_example(server):
    out = subprocess.run(["bash", str(ROOT / "examples" / "curl_chat_completions.sh"), server.url],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert '"object":"chat.completion"' in out.replace(" ", "") and "Paris" in out


def test_version_and_help():
    version = subprocess.run([FURIOSA_LLM, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("furiosa-llm ")
    helptext = subprocess.run([FURIOSA_LLM, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--port", "--chat-template", "--enable-auto-tool-choice", "--tool-call-parser",
                 "--devices", "--served-model-name", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--kv-cache-gib", "--response-role", "--api-key", "--log-level"):
        assert flag in helptext


def test_an_absent_device_is_a_clear_start_up_error():
    result = subprocess.run([FURIOSA_LLM, "serve", "--devices", "npu:0"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "npu:0" in result.stderr and "not available" in result.stderr


def test_a_missing_artifact_is_a_clear_start_up_error(tmp_path):
    result = subprocess.run([FURIOSA_LLM, "serve", str(tmp_path / "nope.gguf")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_a_corrupt_artifact_stops_the_start_up_with_a_message_naming_it(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    result = subprocess.run([FURIOSA_LLM, "serve", str(bad), "--port", str(free_port())], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert str(bad) in result.stderr


def test_offline_inference_example():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "offline_inference.py")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("'The capital of France is' -> ") and "Paris" in lines[0]


def test_offline_chat_example():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "offline_chat.py")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "Paris" in out
