"""Two real `furiosa-llm serve` replicas behind HAProxy, configured by the committed
deploy/haproxy/haproxy.cfg with only its listening addresses and server lines replaced by
loopback ports: a replica stopped with SIGTERM in the middle of traffic costs no request, and a
conversation's turns with an `X-Session-ID` header stay on one replica."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server import STARTUP_TIMEOUT_S, Server, free_port, wait_until

HAPROXY_CFG = pathlib.Path(__file__).parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "furiosa_llm"
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


class Replica(Server):
    """The default model on one engine core with a small KV cache (0.25 GiB) and a drain long
    enough for a loaded 2-core machine, so two replicas fit beside the rest of the suite."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [os.path.join(os.path.dirname(sys.executable), "furiosa-llm"), "serve",
                   "--host", "127.0.0.1", "--port", str(self.port), "--kv-cache-gib", "0.25",
                   "--shutdown-timeout", "120", "--data-parallel-size", "1"]
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"furiosa-replica-{self.port}.log"), "w+")
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)


def render_haproxy_cfg(port: int, stats_port: int, servers: dict[str, int]) -> str:
    """The committed config with its two binds on loopback ports and one server line per replica."""
    text = HAPROXY_CFG.read_text()
    text, num_binds = re.subn(r"^(\s*)bind :8080$", rf"\1bind 127.0.0.1:{port}", text, flags=re.M)
    text, num_stats = re.subn(r"^(\s*)bind 127\.0\.0\.1:8404$", rf"\1bind 127.0.0.1:{stats_port}", text, flags=re.M)
    server_lines = "".join(f"    server {name} 127.0.0.1:{p}\n" for name, p in servers.items())
    text, num_servers = re.subn(r"(^\s*server \S+ \S+\n)+", lambda _: server_lines, text, flags=re.M)
    assert (num_binds, num_stats, num_servers) == (1, 1, 1), "deploy/haproxy/haproxy.cfg changed shape"
    return text


class Balancer:
    """HAProxy in the foreground, with the rendered config."""

    def __init__(self, servers: dict[str, int], tmp_path: pathlib.Path):
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        assert os.path.exists(haproxy), "haproxy is not installed (scripts/run_tests.sh installs it)"
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / "haproxy.cfg"
        config.write_text(render_haproxy_cfg(self.port, self.stats_port, servers))
        self.log = open(tmp_path / "haproxy.log", "w+")
        self.process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers as HAProxy's stats page reports them (status, retries, ...)."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row for row in rows
                if row["pxname"] == BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")}

    def status(self, name: str) -> str:
        try:
            return self.servers()[name]["status"]
        except httpx.TransportError:
            assert self.process.poll() is None, self.output()
            return "not listening"

    def output(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.log.close()


@contextlib.contextmanager
def replicas_behind_haproxy(tmp_path: pathlib.Path):
    replicas = {"replica1": Replica(), "replica2": Replica()}
    balancer = None
    try:
        for replica in replicas.values():
            replica.wait_ready()
        balancer = Balancer({name: r.port for name, r in replicas.items()}, tmp_path)
        wait_until(lambda: all(balancer.status(name) == "UP" for name in replicas), 60, "both replicas UP")
        yield replicas, balancer
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas.values():
            if replica.process.poll() is None:
                replica.stop()


@dataclass
class Outcome:
    index: int
    started_s: float
    session_id: str | None = None
    served_by: str | None = None
    error: str | None = None


def complete(url: str, outcome: Outcome) -> Outcome:
    """One completion through the balancer (every other one streamed); an error is any
    status but 200, a transport failure, an error event or a short answer."""
    index = outcome.index
    headers = {"X-Session-ID": outcome.session_id} if outcome.session_id else {}
    body = {**COMPLETION, "stream": index % 2 == 1, "stream_options": {"include_usage": True}}
    if not body["stream"]:
        del body["stream_options"]
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=120) as response:
            outcome.served_by = response.headers.get("x-served-by")
            if response.status_code != 200:
                outcome.error = f"{response.status_code}: {response.read().decode()}"
            elif body["stream"]:
                events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
                chunks = [json.loads(e) for e in events[:-1]]
                if events[-1:] != ["[DONE]"] or any("error" in c for c in chunks) \
                        or chunks[-1]["usage"]["completion_tokens"] != COMPLETION["max_tokens"]:
                    outcome.error = f"stream: {events}"
            elif json.loads(response.read())["usage"]["completion_tokens"] != COMPLETION["max_tokens"]:
                outcome.error = f"short answer: {response.text}"
    except httpx.HTTPError as e:
        outcome.error = repr(e)
    return outcome


class LongStream(threading.Thread):
    """A long stream through the balancer, the first turn of session `SESSION_ID`;
    `first_event` is set once it is under way. Long enough (several times what the 50 short
    requests before the SIGTERM take, however loaded the machine) to be in flight at the SIGTERM;
    200 tokens once ended before it on a busy machine."""

    SESSION_ID = "stopped-conversation"
    NUM_TOKENS = 600

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.first_event = threading.Event()
        self.served_by: str | None = None
        self.events: list[str] = []
        self.last_event_s = 0.0

    def run(self) -> None:
        body = {**COMPLETION, "max_tokens": self.NUM_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", self.url + "/v1/completions", json=body,
                          headers={"X-Session-ID": self.SESSION_ID}, timeout=180) as response:
            self.served_by = response.headers.get("x-served-by")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[len("data: "):])
                    self.last_event_s = time.monotonic()
                    self.first_event.set()
        self.first_event.set()


def test_a_replica_stopped_with_sigterm_mid_traffic_costs_no_request(tmp_path):
    with replicas_behind_haproxy(tmp_path) as (replicas, balancer):
        # the replica to stop is the one serving a long stream, so a request is in flight on it
        stream = LongStream(balancer.url)
        stream.start()
        assert stream.first_event.wait(STARTUP_TIMEOUT_S) and stream.events, balancer.output()
        stopped = replicas[stream.served_by]
        [survivor_name] = [name for name in replicas if name != stream.served_by]

        # 100 requests, at most 8 at a time: SIGTERM before the 51st is sent; before the 76th,
        # wait until HAProxy's health check has taken the stopped replica out of the pool. The
        # last 50 continue the stream's session, so HAProxy sends them to the stopped replica
        # until it is out of the pool: they must be retried on the survivor.
        in_flight = threading.BoundedSemaphore(8)
        sigterm_s = out_of_pool_s = 0.0

        def send(outcome: Outcome) -> Outcome:
            try:
                return complete(balancer.url, outcome)
            finally:
                in_flight.release()

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = []
            for index in range(100):
                if index == 50:
                    sigterm_s = time.monotonic()
                    stopped.process.send_signal(signal.SIGTERM)
                if index == 75:
                    wait_until(lambda: balancer.status(stream.served_by).startswith("DOWN"), 60,
                               f"HAProxy to mark {stream.served_by} DOWN")
                    out_of_pool_s = time.monotonic()
                in_flight.acquire()
                session_id = LongStream.SESSION_ID if index >= 50 else None
                futures.append(pool.submit(send, Outcome(index, time.monotonic(), session_id)))
            outcomes = [f.result() for f in futures]
        stream.join(timeout=180)
        exit_code = stopped.process.wait(timeout=180)
        redispatched = {name: int(row["wredis"]) for name, row in balancer.servers().items()}
        log = balancer.output()

    failed = [o for o in outcomes if o.error]
    assert not failed, f"{failed}\nredispatched: {redispatched}\n{log}"
    assert sum(o.started_s > sigterm_s for o in outcomes) == 50
    # requests HAProxy sent to the closed port before its health check noticed went elsewhere
    assert redispatched[stream.served_by] > 0, redispatched
    # before the SIGTERM both replicas served; once out of the pool, only the survivor
    assert {o.served_by for o in outcomes[:50]} == set(replicas)
    after = [o for o in outcomes if o.started_s > out_of_pool_s]
    assert len(after) == 25 and {o.served_by for o in after} == {survivor_name}
    # the stream in flight on the stopped replica was drained to its end, after the SIGTERM
    assert exit_code == 0
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    chunks = [json.loads(e) for e in stream.events[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == LongStream.NUM_TOKENS
    assert stream.last_event_s > sigterm_s


def samples(replica: Replica, name: str) -> list:
    text = httpx.get(replica.url + "/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_a_conversations_turns_with_a_session_header_land_on_one_replica(tmp_path):
    with replicas_behind_haproxy(tmp_path) as (replicas, balancer):
        conversations = {f"conversation-{k}": [{"role": "user", "content": f"Name {k + 2} colours."}]
                         for k in range(4)}
        served_by: dict[str, list[str]] = {session: [] for session in conversations}
        for turn in range(3):
            for session, messages in conversations.items():
                response = httpx.post(balancer.url + "/v1/chat/completions", headers={"X-Session-ID": session},
                                      json={"messages": messages, "max_tokens": 8, "temperature": 0}, timeout=120)
                assert response.status_code == 200, response.text
                served_by[session].append(response.headers["x-served-by"])
                reply = response.json()["choices"][0]["message"]["content"]
                messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        without_header = [httpx.post(balancer.url + "/v1/completions", json=COMPLETION, timeout=120)
                          .headers["x-served-by"] for _ in range(4)]
        hits = {name: sum(s.value for s in samples(replica, "furiosa_llm:prefix_cache_hits_total"))
                for name, replica in replicas.items()}
        # the gauge deploy/kubernetes/ autoscales on
        waiting = samples(replicas["replica1"], "furiosa_llm:num_requests_waiting")

    assert all(len(set(names)) == 1 for names in served_by.values()), served_by
    # new conversations, like requests without the header, are spread over the replicas
    assert {names[0] for names in served_by.values()} == set(replicas), served_by
    assert set(without_header) == set(replicas), without_header
    # each replica found its conversations' earlier turns in its prefix cache
    assert all(h > 0 for h in hits.values()), hits
    assert [(set(s.labels), s.labels["engine"]) for s in waiting] == [({"model_name", "engine"}, "0")]
