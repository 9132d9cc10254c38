"""The engine-core child of an `LLM`, and the event loop thread that talks to it.

The child is the same `python -m engine_core --config-json ...` that `furiosa-llm serve` starts,
on ipc:// sockets in a private temp directory, so the model never shares this process's GIL.
A start-up error arrives as the child's one line on `$NOTIFY_SOCKET` (ipc/notify.py).
`EngineProcess.stop` is idempotent; `LLM` registers it with `weakref.finalize`, which also runs
at interpreter exit, and the child gets SIGTERM if this process dies first (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine

from ipc.config import EngineConfig
from ipc.notify import STARTUP_ERROR_KEY, parse_state
from ipc.sockets import ipc_addresses, make_ipc_dir

STOP_TIMEOUT_S = 10.0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EngineProcess:
    """One engine-core child process and its socket directory."""

    def __init__(self, config: EngineConfig) -> None:
        self.ipc_dir = make_ipc_dir()
        config.input_address, config.output_address = ipc_addresses(self.ipc_dir)
        self.config = config
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify_path = os.path.join(self.ipc_dir, "notify.sock")
        self._notify.bind(self._notify_path)
        self._notify.setblocking(False)
        env = dict(os.environ, NOTIFY_SOCKET=self._notify_path)
        self.proc = subprocess.Popen([sys.executable, "-m", "engine_core", "--config-json", config.to_json()],
                                     start_new_session=True, preexec_fn=_die_with_parent, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def startup_error(self) -> str | None:
        """The child's own one-line reason for not starting, if it sent one."""
        while True:
            try:
                error = parse_state(self._notify.recv(65536)).get(STARTUP_ERROR_KEY)
            except (BlockingIOError, OSError):
                break
            if error:
                return error
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._notify.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


class LoopThread:
    """An asyncio event loop on a daemon thread: the engine client's sockets live on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine):
        return self.submit(coro).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT_S)
        if not self.thread.is_alive():
            self.loop.close()
