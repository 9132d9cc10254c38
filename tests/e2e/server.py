"""Start the real `furiosa-llm serve` command on a free loopback port, as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_engine_unless_asked(args: tuple[str, ...] | list[str]) -> list[str]:
    """`--data-parallel-size 1` unless `args` name a size: the command's default (auto) starts an
    engine per core, and the suite starts many servers on a small shared machine."""
    return [] if "--data-parallel-size" in args else ["--data-parallel-size", "1"]


class Server:
    """`default_engine_count=True` leaves --data-parallel-size out: the command's own default."""

    def __init__(self, *args: str, env: dict | None = None, default_engine_count: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        size = [] if default_engine_count else one_engine_unless_asked(args)
        command = [os.path.join(os.path.dirname(sys.executable), "furiosa-llm"), "serve", *args, *size,
                   "--host", "127.0.0.1", "--port", str(self.port), "--kv-cache-gib", "1"]
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"furiosa-e2e-{self.port}.log"), "w+")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self) -> "Server":
        """Poll /health until it answers 200 (bounded); fail with the server's log otherwise."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)  # polling an external process's readiness, bounded by the deadline
        raise RuntimeError(f"the server did not become ready:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def wait_until(predicate, timeout_s: float, what: str):
    """Bounded polling of a process's externally visible state (not a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def cmdline(pid: int) -> list[str]:
    """A process's argv, from /proc."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [part.decode() for part in f.read().split(b"\0") if part]


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


def data_events(lines) -> list[str]:
    """The payloads of an SSE stream's `data: ` lines."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def scrape(server: "Server") -> dict[str, float]:
    """/metrics samples as `name` or `name{label=value}` (model_name left out) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
