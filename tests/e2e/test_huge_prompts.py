"""A multi-megabyte prompt against the real `furiosa-llm serve`: refused with a 400, without
holding up /health meanwhile, and without the frontend keeping the memory it took."""

from __future__ import annotations

import json
import threading
import time

import httpx

from server import Server

HUGE_PROMPT = "lorem ipsum dolor sit amet " * 280_000  # 7.6 MB
MAX_HEALTH_LATENCY_S = 0.2


def frontend_rss_mb(server: Server) -> float:
    [pid] = [p for p in server.child_pids() if b"\0-m\0frontend\0" in open(f"/proc/{p}/cmdline", "rb").read()]
    with open(f"/proc/{pid}/status") as f:
        [line] = [line for line in f if line.startswith("VmRSS:")]
    return int(line.split()[1]) / 1024


def test_health_answers_while_huge_prompts_are_refused(server):
    rss_before_mb = frontend_rss_mb(server)
    results: list[httpx.Response] = []

    # Encoded once here: encoding 7.6 MB of JSON in a sender thread would hold this process's
    # GIL and delay the probes' own clock.
    bodies = [("/v1/completions", json.dumps({"prompt": HUGE_PROMPT}).encode()),
              ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": HUGE_PROMPT}]}).encode())]

    def post_huge_prompts() -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers={"content-type": "application/json"}) as client:
            for path, body in bodies * 3:
                results.append(client.post(path, content=body))

    senders = [threading.Thread(target=post_huge_prompts) for _ in range(2)]
    latencies_s: list[float] = []
    with httpx.Client(base_url=server.url, timeout=10) as probe:
        for sender in senders:
            sender.start()
        while any(sender.is_alive() for sender in senders):
            start = time.monotonic()
            response = probe.get("/health")
            latencies_s.append(time.monotonic() - start)
            assert response.status_code == 200
    for sender in senders:
        sender.join()

    assert len(results) == 12
    for response in results:
        assert response.status_code == 400, response.text
        assert "maximum context length" in response.json()["error"]["message"]
    assert len(latencies_s) >= 10  # probes ran the whole time the prompts were being refused
    assert max(latencies_s) < MAX_HEALTH_LATENCY_S, sorted(latencies_s)[-5:]
    # Tokenized whole, six such prompts grew the frontend from 148 MB to 1.95 GB.
    assert frontend_rss_mb(server) - rss_before_mb < 80
