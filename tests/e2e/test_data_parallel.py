"""`furiosa-llm serve --data-parallel-size 2` on the default model: two engine cores behind one
frontend. Both get work under concurrent load, greedy outputs equal one engine's, a conversation's
turns find their earlier turns in the prefix cache about as often as with one engine, the death of
one engine fails the requests and stops the command within 5 s, and SIGTERM drains both. Without
the flag the command starts as many engines as `auto` plans from this machine."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from frontend.data_parallel import plan
from server import Server, cmdline, data_events, is_alive, scrape, wait_until

NUM_PROMPTS = 64
SUBJECTS = ["the sea", "a mountain", "bread", "winter", "a library", "trains", "the moon", "bees"]
LONG = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}


def engine_pids(server: Server) -> dict[int, int]:
    """data_parallel_rank -> pid of the launcher's `python -m engine_core` children."""
    pids = {}
    for pid in server.child_pids():
        argv = cmdline(pid)
        if "engine_core" in argv:
            pids[json.loads(argv[-1])["data_parallel_rank"]] = pid
    return pids


def prompts() -> list[str]:
    return [f"Write one sentence about {SUBJECTS[k % len(SUBJECTS)]} and the number {k}." for k in range(NUM_PROMPTS)]


def complete(server: Server, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def converse(server: Server, num_conversations: int = 8, num_turns: int = 4) -> int:
    """Interleaved conversations (each turn of all of them at once); the total cached prompt tokens."""
    conversations = [[{"role": "user", "content": f"Tell me about {subject}."}] for subject in SUBJECTS[:num_conversations]]

    def turn(messages: list[dict]) -> int:
        body = {"messages": messages, "max_tokens": 16, "temperature": 0}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        answer = response.json()
        messages += [answer["choices"][0]["message"], {"role": "user", "content": "Tell me more."}]
        return answer["usage"]["prompt_tokens_details"]["cached_tokens"]

    with ThreadPoolExecutor(num_conversations) as pool:
        return sum(sum(pool.map(turn, conversations)) for _ in range(num_turns))


@pytest.fixture(scope="module")
def one_engine():
    server = Server("--data-parallel-size", "1").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_engines():
    server = Server("--data-parallel-size", "2").wait_ready()
    yield server
    server.stop()


def test_concurrent_greedy_requests_equal_one_engines_outputs(one_engine, two_engines):
    sequential = [complete(one_engine, p) for p in prompts()]
    with ThreadPoolExecutor(NUM_PROMPTS) as pool:
        concurrent = list(pool.map(lambda p: complete(two_engines, p), prompts()))
    assert concurrent == sequential


def test_both_engines_run_sequences_under_concurrent_load(two_engines):
    assert set(engine_pids(two_engines)) == {0, 1}
    stop = threading.Event()

    def stream(k: int) -> int:
        body = {"prompt": f"Story number {k}:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", two_engines.url + "/v1/completions", json=body, timeout=300) as response:
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: ")
                if stop.is_set():
                    return chunks  # leaving closes the stream: the client is gone, the engine aborts
        return chunks

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, k) for k in range(8)]
        try:
            running = wait_until(lambda: (lambda m: m if all(m[f"furiosa_llm:num_requests_running{{engine={rank}}}"] >= 3
                                                             for rank in (0, 1)) else None)(scrape(two_engines)),
                                 120, "both engines to run several sequences")
        finally:
            stop.set()
        assert all(f.result() > 0 for f in futures)
    assert running["furiosa_llm:num_requests_running{engine=0}"] + running["furiosa_llm:num_requests_running{engine=1}"] <= 8
    wait_until(lambda: all(scrape(two_engines)[f"furiosa_llm:num_requests_running{{engine={rank}}}"] == 0
                           for rank in (0, 1)), 60, "the aborts")


def test_conversations_find_their_earlier_turns_cached_on_their_engine(one_engine, two_engines):
    cached_one = converse(one_engine)
    cached_two = converse(two_engines)
    assert cached_one > 0
    assert cached_two >= 0.9 * cached_one, (cached_two, cached_one)


def test_a_shared_prefix_request_goes_to_the_engine_that_cached_it(two_engines):
    prefix = "You are a careful assistant who answers in one short sentence. " * 6

    def ask(question: str, **fields) -> dict:
        body = {"prompt": prefix + f"Question: {question}", "max_tokens": 2, **fields}
        response = httpx.post(two_engines.url + "/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["usage"]

    def running() -> list[float]:
        metrics = scrape(two_engines)
        return [metrics[f"furiosa_llm:num_requests_running{{engine={rank}}}"] for rank in (0, 1)]

    with httpx.stream("POST", two_engines.url + "/v1/completions", json={**LONG, "stream": True}, timeout=300) as s1:
        lines1 = s1.iter_lines()  # kept: a dropped line iterator closes the stream
        next(lines1)
        assert running() == [1, 0]  # the long stream went to engine 0 ...
        first = ask("what is rain?")  # ... so this one went to engine 1, which now holds the prefix
        with httpx.stream("POST", two_engines.url + "/v1/completions", json={**LONG, "stream": True},
                          timeout=300) as s2:
            lines2 = s2.iter_lines()
            next(lines2)
            assert running() == [1, 1]
            # equal loads: by load alone this would go to engine 0; the prefix sends it to engine 1
            second = ask("what is snow?")
            salted = ask("what is hail?", cache_salt="other-tenant")
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] >= 0.5 * second["prompt_tokens"]
    assert salted["prompt_tokens_details"]["cached_tokens"] == 0  # another tenant finds nothing of it


def test_killing_one_engine_fails_in_flight_requests_and_the_command_exits_non_zero_within_5_s():
    server = Server("--data-parallel-size", "2").wait_ready()
    try:
        children = server.child_pids()
        pids = engine_pids(server)
        streams = [httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30)
                   for _ in range(2)]
        lines = []
        for stream in streams:  # sharing no prefix, one goes to each engine
            response = stream.__enter__()
            lines.append(response.iter_lines())
            assert json.loads(data_events([next(lines[-1])])[0])["choices"][0]["text"] is not None
        metrics = scrape(server)
        assert metrics["furiosa_llm:num_requests_running{engine=0}"] == 1
        assert metrics["furiosa_llm:num_requests_running{engine=1}"] == 1
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        events = [data_events(line_iter) for line_iter in lines]
        stream_end_s = time.monotonic() - killed_at
        health = []
        while server.process.poll() is None and time.monotonic() - killed_at < 6:
            try:
                health.append(httpx.get(server.url + "/health", timeout=1).status_code)
            except httpx.TransportError:
                health.append(None)  # the frontend is already gone
        for stream in streams:
            stream.__exit__(None, None, None)
        for stream_events in events:  # the request on the surviving engine fails too
            assert stream_events[-1] == "[DONE]"
            assert json.loads(stream_events[-2])["error"]["code"] == "engine_dead"
        assert stream_end_s < 3
        assert 200 not in health and set(health) <= {503, None}
        assert server.process.wait(timeout=max(0.1, 5 - (time.monotonic() - killed_at))) != 0
        assert not any(is_alive(pid) for pid in children)
    finally:
        if server.process.poll() is None:
            server.stop()


def test_sigterm_drains_both_engines_and_exits_0():
    server = Server("--data-parallel-size", "2", "--shutdown-timeout", "300").wait_ready()
    try:
        children = server.child_pids()
        body = {**LONG, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
        streams = [httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) for _ in range(2)]
        lines = []
        for stream in streams:
            lines.append(stream.__enter__().iter_lines())
            next(lines[-1])
        metrics = scrape(server)
        assert metrics["furiosa_llm:num_requests_running{engine=0}"] == 1
        assert metrics["furiosa_llm:num_requests_running{engine=1}"] == 1
        server.process.send_signal(signal.SIGTERM)
        events = [data_events(line_iter) for line_iter in lines]
        for stream in streams:
            stream.__exit__(None, None, None)
        assert server.process.wait(timeout=120) == 0
    finally:
        if server.process.poll() is None:
            server.stop()
    for stream_events in events:
        assert stream_events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in stream_events[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == 40
    assert not any(is_alive(pid) for pid in children)


def test_serve_without_the_flag_starts_the_engines_auto_plans_for_this_machine(default_model):
    """The default is auto: the engine count the planner derives from this machine's cores, CPU
    quota and memory (2 on an idle 2-core machine), said on stderr just before the serving line,
    with one `engine` label per engine in /metrics and each engine on its planned CPUs."""
    expected = plan("auto", 1, default_model, 1.0)  # the helper's --kv-cache-gib 1, this machine
    server = Server(default_engine_count=True).wait_ready()
    try:
        assert "--data-parallel-size" not in server.process.args
        lines = wait_until(lambda: (lambda out: out if any(" serving " in line for line in out) else None)(
            server.output().splitlines()), 30, "the serving line")
        [line] = [line for line in lines if line.startswith("furiosa-llm: data parallel: ")]
        assert lines.index(line) + 1 == next(k for k, text in enumerate(lines) if " serving " in text)
        engines = "engine core" if expected.size == 1 else "engine cores"
        assert line.startswith(f"furiosa-llm: data parallel: {expected.size} {engines} (auto: "), (line, expected)
        assert line.rsplit("), ", 1)[1] == expected.reason.rsplit("), ", 1)[1]  # "pinned to CPUs 0 | 1"
        labels = {key for key in scrape(server) if key.startswith("furiosa_llm:num_requests_running{engine=")}
        assert labels == {f"furiosa_llm:num_requests_running{{engine={rank}}}" for rank in range(expected.size)}
        pids = engine_pids(server)
        assert sorted(pids) == list(range(expected.size))
        for rank, cpu_ids in enumerate(expected.cpu_sets):
            assert sorted(os.sched_getaffinity(pids[rank])) == (cpu_ids or sorted(os.sched_getaffinity(0)))
        complete(server, "Say hello.")  # asserts a 200
    finally:
        server.stop()
