"""Production operation of the real `furiosa-llm serve`: faults, signals, auth, admission
control, abandoned streams, and systemd's readiness protocol. Each test starts its own server
(the default model loads in ~10 s)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from server import STARTUP_TIMEOUT_S, Server, cmdline, data_events, is_alive, scrape, wait_until

LONG = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
API_KEY = "e2e-secret-key"


def engine_pid(server: Server) -> int:
    """The launcher's child running `python -m engine_core`."""
    [pid] = [p for p in server.child_pids() if "engine_core" in cmdline(p)]
    return pid


def stop_quietly(server: Server) -> None:
    if server.process.poll() is None:
        server.stop()


def test_engine_killed_mid_stream_ends_requests_with_errors_and_the_command_exits_non_zero():
    server = Server().wait_ready()
    try:
        children = server.child_pids()
        with ThreadPoolExecutor(1) as pool, httpx.stream(
            "POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30
        ) as stream:
            lines = stream.iter_lines()
            assert json.loads(data_events([next(lines)])[0])["choices"][0]["text"] is not None
            non_stream = pool.submit(httpx.post, server.url + "/v1/completions", json=LONG, timeout=30)
            wait_until(lambda: scrape(server)["furiosa_llm:num_requests_running{engine=0}"] == 2, 30, "both requests to run")
            os.kill(engine_pid(server), signal.SIGKILL)
            killed_at = time.monotonic()
            events = data_events(lines)
            stream_end_s = time.monotonic() - killed_at
            health = []
            while server.process.poll() is None and time.monotonic() - killed_at < 6:
                try:
                    health.append(httpx.get(server.url + "/health", timeout=1).status_code)
                except httpx.TransportError:
                    health.append(None)  # the frontend is already gone
            response = non_stream.result()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "engine_dead"
        assert stream_end_s < 3
        assert response.status_code in (500, 503) and response.json()["error"]["code"] == "engine_dead"
        assert 200 not in health and set(health) <= {503, None}
        assert server.process.wait(timeout=max(0.1, 5 - (time.monotonic() - killed_at))) != 0
        assert not any(is_alive(pid) for pid in children)
    finally:
        stop_quietly(server)


def test_frontend_killed_stops_the_engine_and_the_command_exits_non_zero():
    server = Server().wait_ready()
    try:
        engine = engine_pid(server)
        [frontend] = [p for p in server.child_pids() if p != engine]
        assert "frontend" in cmdline(frontend)
        os.kill(frontend, signal.SIGKILL)
        killed_at = time.monotonic()
        assert server.process.wait(timeout=5) != 0
        assert time.monotonic() - killed_at < 5
        assert not is_alive(engine)
    finally:
        stop_quietly(server)


def test_sigterm_drains_the_in_flight_request_and_exits_0_and_systemd_hears_ready_then_stopping(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(STARTUP_TIMEOUT_S)
        # a grace period far past what 60 tokens take, however loaded the machine
        server = Server("--shutdown-timeout", "300", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        try:
            ready = notify.recv(4096)
            # READY=1 comes only once the engine is ready and the socket listens
            assert ready.startswith(b"READY=1\n")
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
            children = server.child_pids()
            config = json.loads(cmdline(engine_pid(server))[-1])
            ipc_dir = os.path.dirname(config["input_address"][len("ipc://"):])
            assert os.path.isdir(ipc_dir)
            body = {**LONG, "max_tokens": 60, "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as stream:
                lines = stream.iter_lines()
                first = data_events([next(lines)])
                server.process.send_signal(signal.SIGTERM)
                assert notify.recv(4096).startswith(b"STOPPING=1")
                events = first + data_events(lines)
            assert server.process.wait(timeout=60) == 0
        finally:
            stop_quietly(server)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 60
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert not any(is_alive(pid) for pid in children)
    assert not os.path.exists(ipc_dir)


def test_a_stream_still_open_when_the_shutdown_grace_period_ends_gets_an_error_event_and_done():
    server = Server("--shutdown-timeout", "2").wait_ready()
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=120) as stream:
            lines = stream.iter_lines()
            first = data_events([next(lines)])
            server.process.send_signal(signal.SIGTERM)
            events = first + data_events(lines)
        assert server.process.wait(timeout=60) == 0
        log = server.output()
    finally:
        stop_quietly(server)
    assert events[-1] == "[DONE]"
    *chunks, last = [json.loads(e) for e in events[:-1]]  # every event whole, none cut mid-chunk
    assert last["error"]["code"] == "server_shutting_down", last
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # ended by the deadline
    assert "ERROR" not in log, log


def test_api_key_guards_every_route_but_health_and_metrics():
    server = Server(env={"FURIOSA_LLM_API_KEY": API_KEY}).wait_ready()
    try:
        good = {"Authorization": f"Bearer {API_KEY}"}
        document = httpx.get(server.url + "/schema/openapi.json", headers=good, timeout=10).json()
        routes = [(method.upper(), path.replace("{model_id}", "x"))
                  for path, item in document["paths"].items() for method in item]
        routes.append(("GET", "/schema/openapi.json"))
        assert ("POST", "/v1/chat/completions") in routes
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                response = httpx.request(method, server.url + path, headers=headers, timeout=10)
                if path in ("/health", "/metrics"):
                    assert response.status_code == 200, path
                else:
                    assert response.status_code == 401, (method, path, headers)
                    assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models", headers=good, timeout=10).status_code == 200
        completion = httpx.post(server.url + "/v1/completions", headers=good, timeout=60,
                                json={"prompt": "Hi", "max_tokens": 2})
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 2
        # the key is in no process's command line (where any local user could read it)
        for pid in [server.process.pid, *server.child_pids()]:
            assert not any(API_KEY in part for part in cmdline(pid))
    finally:
        server.stop()


def test_requests_past_the_queue_bound_get_503_with_retry_after():
    server = Server("--max-num-seqs", "1", "--max-waiting-requests", "1").wait_ready()
    try:
        with httpx.Client(timeout=60) as client:
            streams = [client.send(client.build_request("POST", server.url + "/v1/completions",
                                                        json={**LONG, "stream": True}), stream=True)
                       for _ in range(2)]
            try:
                wait_until(lambda: (lambda m: m["furiosa_llm:num_requests_running{engine=0}"] == 1
                                    and m["furiosa_llm:num_requests_waiting{engine=0}"] == 1)(scrape(server)),
                           30, "one request running and one waiting")
                refused = client.post(server.url + "/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                assert refused.status_code == 503
                assert int(refused.headers["retry-after"]) > 0
                error = refused.json()["error"]
                assert error["code"] == "server_overloaded" and set(error) == {"message", "type", "param", "code"}
            finally:
                for stream in streams:
                    stream.close()
            wait_until(lambda: scrape(server)["furiosa_llm:num_requests_running{engine=0}"] == 0, 30, "the aborts")
            again = client.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert again.status_code == 200
    finally:
        server.stop()


def test_clients_dropping_their_streams_leave_nothing_running():
    server = Server().wait_ready()

    def read_then_drop(k: int) -> int:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": f"Tell me story number {k}."}],
            "max_tokens": 1000, "ignore_eos": True, "stream": True,
        }) as stream:
            events = []
            for line in stream.iter_lines():
                events += data_events([line])
                if len(events) > 1 + k % 4:
                    return len(events)  # leaving the block closes the connection mid-stream
        raise AssertionError("the stream ended by itself")

    try:
        with ThreadPoolExecutor(8) as pool:
            assert all(n >= 2 for n in pool.map(read_then_drop, range(8)))
        metrics = wait_until(lambda: (lambda m: m if m["furiosa_llm:num_requests_running{engine=0}"] == 0
                                      and m["furiosa_llm:num_requests_waiting{engine=0}"] == 0
                                      and m["furiosa_llm:kv_cache_usage_perc{engine=0}"] == 0 else None)(scrape(server)),
                             30, "the engine to be empty")
        assert metrics["furiosa_llm:request_success_total{finished_reason=abort}"] == 8
        assert metrics["furiosa_llm:generation_tokens_after_disconnect_total"] >= 0
        completion = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 3
    finally:
        server.stop()

