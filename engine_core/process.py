"""EngineCoreProc: the engine-core process around `EngineCore`.

Three threads: an input thread (ZMQ -> decode -> queue), the busy loop on the main thread
(drain queue -> step -> outputs), and an output thread (queue -> encode -> ZMQ), so socket IO
overlaps the numpy work. The loop blocks on the input queue when there is nothing to do.
Any fatal error sends a `dead` message with the reason before the process exits non-zero.
A start-up failure (the artifact, a setting) is one line to the launcher (`ipc.notify`) and
the exit code `STARTUP_FAILED_EXIT_CODE`; its traceback is logged at debug level only.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback

import zmq

from engine_core.core import EngineCore
from engine_core.loader import ArtifactError, check_max_model_len, load_artifact
from ipc.config import EngineConfig
from ipc.messages import (
    EngineCoreAbort,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    decode_to_engine,
    encode,
)
from ipc.notify import report_startup_error
from ipc.sockets import make_socket

logger = logging.getLogger("furiosa_llm.engine")

_SHUTDOWN = object()  # sentinel on the input queue: stop the loop
IDLE_POLL_S = 1.0  # how often an idle loop wakes to check that its parent still lives
STATS_INTERVAL_S = 1.0  # scheduler stats reach the frontend at least this often while busy


class EngineCoreProc:
    def __init__(self, config: EngineConfig, core: EngineCore | None = None):
        self.config = config
        self.ctx = zmq.Context()
        # bind first, so a frontend that starts early queues its messages instead of failing
        self.input_socket = make_socket(self.ctx, zmq.PULL, config.input_address, bind=True)
        self.output_socket = make_socket(self.ctx, zmq.PUSH, config.output_address, bind=True)
        self.input_queue: queue.Queue = queue.Queue()
        self.output_queue: queue.Queue = queue.Queue()
        self.parent_pid = os.getppid()
        self.core = core
        self._stop = threading.Event()

    def run(self) -> int:
        output_thread = threading.Thread(target=self._output_loop, name="engine-output", daemon=True)
        output_thread.start()
        threading.Thread(target=self._input_loop, name="engine-input", daemon=True).start()
        try:
            if self.core is None:
                try:
                    self.core = load_engine_core(self.config)
                except Exception as e:
                    return self._fail_startup(e)
                if self._stop.is_set():  # stopped while loading: nothing to report
                    return 0
            self.output_queue.put(self.core.ready_message())
            logger.info("engine ready: %s", self.core.ready_message())
            self._busy_loop()
            return 0
        except BaseException as e:  # report any death to the frontend before exiting
            reason = f"{type(e).__name__}: {e}"
            logger.error("engine core died: %s\n%s", reason, traceback.format_exc())
            self.output_queue.put(EngineDead(reason))
            return 1
        finally:
            self.output_queue.put(_SHUTDOWN)
            output_thread.join(timeout=5)
            # each socket is closed by the thread that uses it; term() wakes the input thread
            self.ctx.term()

    def _fail_startup(self, error: Exception) -> int:
        line = startup_error_line(self.config.model, error)
        logger.debug("the engine core cannot start", exc_info=True)
        self.output_queue.put(EngineDead(line))
        return report_startup_error(line)

    def stop(self) -> None:
        self._stop.set()
        self.input_queue.put(_SHUTDOWN)

    def _busy_loop(self) -> None:
        core = self.core
        last_sent = 0.0
        while not self._stop.is_set():
            # 1) poll input: block while idle, drain without waiting while busy
            if not core.has_unfinished_requests:
                try:
                    message = self.input_queue.get(timeout=IDLE_POLL_S)
                except queue.Empty:
                    self._check_parent()
                    continue
                if message is _SHUTDOWN:
                    return
                self._apply(message)
            while True:
                try:
                    message = self.input_queue.get_nowait()
                except queue.Empty:
                    break
                if message is _SHUTDOWN:
                    return
                self._apply(message)
            # 2) step
            outputs = core.step()
            # 3) hand outputs to the output thread (stats go out at least every STATS_INTERVAL_S,
            #    so gauges stay current through long prefills and beam searches)
            now = time.time()
            if outputs or now - last_sent >= STATS_INTERVAL_S:
                self.output_queue.put(EngineCoreOutputs(outputs, core.stats(), now))
                last_sent = now

    def _apply(self, message) -> None:
        """A request or an abort goes to the core; an exception from the input thread is raised."""
        if isinstance(message, BaseException):
            raise message
        if isinstance(message, EngineCoreRequest):
            self.core.add_request(message)
        elif isinstance(message, EngineCoreAbort):
            self.core.abort_requests(message.request_ids, message.indices)

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            raise RuntimeError("the launcher process is gone")

    def _input_loop(self) -> None:
        try:
            while True:
                data = self.input_socket.recv()
                try:
                    message = decode_to_engine(data)
                except Exception as e:  # a malformed message is a bug on the other side; log it
                    logger.error("dropping undecodable message (%d bytes): %s", len(data), e)
                    continue
                self.input_queue.put(message)
        except zmq.ContextTerminated:
            pass
        except Exception as e:
            self.input_queue.put(e)
        finally:
            self.input_socket.close(linger=0)

    def _output_loop(self) -> None:
        try:
            while True:
                message = self.output_queue.get()
                if message is _SHUTDOWN:
                    return
                self.output_socket.send(encode(message))
        except zmq.ContextTerminated:  # our own teardown (run's finally), with outputs unsent
            logger.info("stopped sending to the frontend: the engine core is shutting down")
        except zmq.ZMQError as e:
            logger.error("cannot send to the frontend: %s", e)
        finally:
            self.output_socket.close(linger=2000)  # let a final "dead" message reach the frontend


def load_engine_core(config: EngineConfig) -> EngineCore:
    model_config, weights = load_artifact(config.model)
    check_max_model_len(model_config, config.max_model_len,
                        is_long_allowed=config.allow_long_max_model_len, where=config.model)
    return EngineCore(config, model_config, weights)


def startup_error_line(model: str, error: Exception) -> str:
    """One line for the operator: an ArtifactError's text already starts with the file at fault."""
    if isinstance(error, ArtifactError):
        return f"furiosa-llm: cannot load {error}"
    if isinstance(error, MemoryError):
        return f"furiosa-llm: cannot load {model}: out of memory (try a smaller --kv-cache-gib)"
    return (f"furiosa-llm: the engine core cannot start with {model}: {type(error).__name__}: {error} "
            "(--log-level debug shows where)")


# OpenBLAS threads synchronise at every matmul; when another process (the frontend, a client)
# takes the second core they collapse 20x (measured: a batch-8 decode step 2.4 s with 2 threads
# vs 0.11 s with 1 while the other core was busy). One thread is the default that stays fast.
DEFAULT_NUM_THREADS = 1


def run_engine_core(config: EngineConfig) -> int:
    from threadpoolctl import threadpool_limits

    threadpool_limits(config.num_threads or DEFAULT_NUM_THREADS)
    if config.data_parallel_size > 1:  # the launcher pinned this process before exec
        logger.info("engine core %d of %d, %d threads, on CPUs %s", config.data_parallel_rank,
                    config.data_parallel_size, config.num_threads or DEFAULT_NUM_THREADS,
                    sorted(os.sched_getaffinity(0)))
    proc = EngineCoreProc(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: proc.stop())
    return proc.run()
