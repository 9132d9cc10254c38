"""The engine-core process contract over real ZeroMQ sockets, as the frontend sees it.

`EngineCoreProc` runs in a thread (or `python -m engine_core` in a subprocess) on a tiny random
Llama; the test is the frontend: it connects to the two ipc:// sockets, reads `EngineReady`,
sends requests and aborts, and expects `EngineDead` when the engine fails. Every wait is a zmq
poll or an event with a timeout, never a sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import zmq

from engine_core.core import EngineCore
from engine_core.process import EngineCoreProc
from ipc.config import EngineConfig
from ipc.messages import (
    EngineCoreAbort,
    EngineCoreOutputs,
    EngineDead,
    EngineReady,
    FinishReason,
    decode_to_frontend,
    encode,
)
from ipc.notify import STARTUP_FAILED_EXIT_CODE
from ipc.sockets import ipc_addresses, make_ipc_dir, make_socket
from engine_helpers import collect, tiny_config, tiny_core, tiny_request, write_tiny_model

PROMPT = [0, 5, 77, 120, 255, 256, 3, 42]
TIMEOUT_S = 20  # generous: the machine is shared; a healthy engine answers in milliseconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama3", "llama3")


@pytest.fixture
def config(model_dir):
    ipc_dir = make_ipc_dir()
    input_address, output_address = ipc_addresses(ipc_dir)
    yield tiny_config(model_dir, input_address=input_address, output_address=output_address)
    shutil.rmtree(ipc_dir, ignore_errors=True)


class Frontend:
    """The frontend's side of the two pipes."""

    def __init__(self, config: EngineConfig):
        self.ctx = zmq.Context()
        self.to_engine = make_socket(self.ctx, zmq.PUSH, config.input_address, bind=False)
        self.from_engine = make_socket(self.ctx, zmq.PULL, config.output_address, bind=False)

    def send(self, message) -> None:
        self.to_engine.send(encode(message))

    def receive(self, timeout_s: float = TIMEOUT_S):
        assert self.from_engine.poll(int(timeout_s * 1000)), f"nothing from the engine in {timeout_s} s"
        return decode_to_frontend(self.from_engine.recv())

    def outputs_until_finished(self, request_id: str) -> list:
        """Every EngineCoreOutput of request_id, one received message at a time, to its final one."""
        outputs = []
        while not outputs or outputs[-1].finish_reason is None:
            message = self.receive()
            assert isinstance(message, EngineCoreOutputs), message
            outputs += [o for o in message.outputs if o.request_id == request_id]
        return outputs

    def close(self) -> None:
        self.ctx.destroy(linger=0)


class EngineThread:
    """EngineCoreProc.run() on a thread; exit_code is what a process would exit with."""

    def __init__(self, config: EngineConfig, core: EngineCore):
        self.proc = EngineCoreProc(config, core)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name="test-engine-core")
        self.thread.start()

    def _run(self) -> None:
        self.exit_code = self.proc.run()

    def join(self) -> int | None:
        self.thread.join(timeout=TIMEOUT_S)
        assert not self.thread.is_alive(), "the engine thread did not exit"
        return self.exit_code


@pytest.fixture
def frontend(config):
    client = Frontend(config)
    yield client
    client.close()


def greedy_tokens(model_dir: str, max_tokens: int) -> list[int]:
    core = tiny_core(model_dir)
    core.add_request(tiny_request("ref", PROMPT, temperature=0.0, max_tokens=max_tokens, eos_token_ids=[]))
    return [t for o in collect(core) for t in o.new_token_ids]


# ------------------------------------------------------------------ in a thread


def test_ready_first_then_requests_stream_and_finish(config, frontend, model_dir):
    engine = EngineThread(config, EngineCore.from_config(config))
    try:
        ready = frontend.receive()
        assert ready == EngineReady("tiny", max_model_len=256, vocab_size=300, num_kv_blocks=64, block_size=16, hidden_size=64)
        frontend.send(tiny_request("a", PROMPT, temperature=0.0, max_tokens=6, eos_token_ids=[]))
        frontend.send(tiny_request("b", PROMPT[:4], temperature=0.0, max_tokens=3, eos_token_ids=[], logprobs=2))
        outputs_a = frontend.outputs_until_finished("a")
        assert len(outputs_a) > 1  # streamed, one delta per step
        assert [t for o in outputs_a for t in o.new_token_ids] == greedy_tokens(model_dir, 6)
        assert outputs_a[-1].finish_reason == FinishReason.LENGTH and outputs_a[-1].num_generated_tokens == 6
        # an invalid request is answered with an error, and the engine lives on
        frontend.send(tiny_request("bad", [5, 300], max_tokens=2))
        (bad,) = frontend.outputs_until_finished("bad")
        assert bad.finish_reason == FinishReason.ERROR and "token ids" in bad.error
        frontend.send(tiny_request("c", PROMPT, temperature=0.0, max_tokens=2, eos_token_ids=[]))
        assert [t for o in frontend.outputs_until_finished("c") for t in o.new_token_ids] == greedy_tokens(model_dir, 2)
    finally:
        engine.proc.stop()
    assert engine.join() == 0


def test_abort_over_the_socket(config, frontend):
    """The engine waits, mid-request, until the abort is in its input queue: no race, no sleep."""
    core = EngineCore.from_config(config)
    abort_queued = threading.Event()
    engine = EngineThread(config, core)
    queue_put = engine.proc.input_queue.put

    def put(message, *args, **kwargs):
        queue_put(message, *args, **kwargs)
        if isinstance(message, EngineCoreAbort) and "long" in message.request_ids:
            abort_queued.set()

    engine.proc.input_queue.put = put
    core_step = core.step
    has_first_token = threading.Event()

    def step():
        if has_first_token.is_set():
            assert abort_queued.wait(TIMEOUT_S)
        outputs = core_step()
        if any(o.request_id == "long" and o.new_token_ids for o in outputs):
            has_first_token.set()
        return outputs

    core.step = step
    try:
        assert isinstance(frontend.receive(), EngineReady)
        frontend.send(tiny_request("long", PROMPT, max_tokens=200, eos_token_ids=[]))
        message = frontend.receive()
        assert [o.request_id for o in message.outputs] == ["long"] and message.outputs[0].finish_reason is None
        frontend.send(EngineCoreAbort(["long", "never-heard-of"]))
        frontend.send(EngineCoreAbort(["long"]))  # idempotent
        rest = frontend.outputs_until_finished("long")
        assert rest[-1].finish_reason == FinishReason.ABORT
        assert [o.finish_reason for o in rest].count(FinishReason.ABORT) == 1
        assert len(message.outputs[0].new_token_ids) + sum(len(o.new_token_ids) for o in rest) < 200
        # the engine goes on serving, and the aborted request gave its blocks back
        frontend.send(tiny_request("next", PROMPT, max_tokens=2, eos_token_ids=[]))
        assert frontend.outputs_until_finished("next")[-1].finish_reason == FinishReason.LENGTH
    finally:
        engine.proc.stop()
    assert engine.join() == 0
    assert core.kv.pool.num_free == core.kv.pool.num_blocks and not core.requests


def test_an_exception_mid_step_sends_dead_and_exits_non_zero(config, frontend):
    core = EngineCore.from_config(config)
    execute = core.runner.execute
    calls = []

    def failing_execute(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault in the model runner")
        return execute(*args, **kwargs)

    core.runner.execute = failing_execute
    engine = EngineThread(config, core)
    try:
        assert isinstance(frontend.receive(), EngineReady)
        frontend.send(tiny_request("doomed", PROMPT, max_tokens=50, eos_token_ids=[]))
        messages = [frontend.receive(), frontend.receive(), frontend.receive()]
    finally:
        engine.proc.stop()  # a no-op once the loop has died; stops it if the fault never came
    assert engine.join() == 1
    assert [type(m) for m in messages] == [EngineCoreOutputs, EngineCoreOutputs, EngineDead]
    assert [len(m.outputs[0].new_token_ids) for m in messages[:2]] == [1, 1]
    assert messages[2].reason == "RuntimeError: injected fault in the model runner"
    assert not frontend.from_engine.poll(100)  # nothing after the dead message


# ------------------------------------------------------------------ as a subprocess


def start_engine_process(config: EngineConfig) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine_core", "--config-json", config.to_json()],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},  # no launcher: it prints
    )


def wait_for_exit(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the engine process did not exit")
    return process.returncode, stderr.decode(errors="replace")


def test_engine_process_serves_and_exits_zero_on_sigterm(config, frontend, model_dir):
    process = start_engine_process(config)
    try:
        ready = frontend.receive(timeout_s=60)  # imports numpy and loads the model first
        assert isinstance(ready, EngineReady) and ready.vocab_size == 300
        frontend.send(tiny_request("a", PROMPT, temperature=0.0, max_tokens=4, eos_token_ids=[]))
        outputs = frontend.outputs_until_finished("a")
        assert [t for o in outputs for t in o.new_token_ids] == greedy_tokens(model_dir, 4)
        # SIGTERM in the middle of a long request
        frontend.send(tiny_request("long", PROMPT, max_tokens=240, eos_token_ids=[]))
        assert isinstance(frontend.receive(), EngineCoreOutputs)
        process.send_signal(signal.SIGTERM)
        code, stderr = wait_for_exit(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert process.poll() == 0  # reaped: nothing left running


def test_engine_process_that_cannot_load_the_model_sends_dead_and_says_why_in_one_line(config, frontend, tmp_path):
    """Run on its own (no launcher's notify socket), it prints the line itself; the traceback
    is for --log-level debug."""
    broken = EngineConfig.from_json(config.to_json())
    broken.model = str(tmp_path / "missing-model")
    process = start_engine_process(broken)
    try:
        dead = frontend.receive(timeout_s=60)
        code, stderr = wait_for_exit(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    line = f"furiosa-llm: cannot load {broken.model}: no such file or directory"
    assert isinstance(dead, EngineDead) and dead.reason == line
    assert code == STARTUP_FAILED_EXIT_CODE
    assert stderr == line + "\n"


@pytest.mark.parametrize("given", [None, "30"])
def test_the_engine_process_makes_openblas_threads_sleep_soon_unless_told_otherwise(given):
    """`python -m engine_core` imports the package first, which sets OPENBLAS_THREAD_TIMEOUT before
    numpy loads OpenBLAS (its threads otherwise spin a tenth of a second after each call, against
    the kernels' threads); a value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = "import os, engine_core, numpy; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (given or "4")
