"""Soak test of a running (or self-started) `furiosa-llm serve`: many requests, many clients,
a share of them walking away mid-stream, some invalid, some with stop strings, several choices,
beam search, nulls or a logit bias; then the server must be as it was.

    python scripts/soak.py                       # starts the default model on a free port
    python scripts/soak.py --url http://127.0.0.1:8000 --pid LAUNCHER_PID
    python scripts/soak.py --requests 300 --concurrency 32   # a shorter run

Phases: warm-up (the same mix, so allocator pools and caches are primed), RSS of the frontend
and each engine process (as many as `--data-parallel-size`, auto by default), the soak (`--requests` over `--concurrency` clients: chat and completions,
streamed or not; `--drop-fraction` of them dropped after a random number of events;
`--invalid-fraction` invalid bodies), then until the engine is idle: /metrics must show nothing
running or waiting and an empty KV cache, a new request must succeed, and RSS must be within
`--rss-tolerance` of the warm-up figure. Prints the numbers and a final JSON line; exits 1 if a
check failed. Not a unit test: it takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

INVALID_BODIES = [
    (b"{not json", "/v1/completions"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), "/v1/completions"),
    (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), "/v1/completions"),
    (json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(), "/v1/completions"),
    (json.dumps({"messages": []}).encode(), "/v1/chat/completions"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "/v1/chat/completions"),
    (json.dumps({"messages": "hi", "stream": True}).encode(), "/v1/chat/completions"),
    (json.dumps({"prompt": [1, "mixed"], "n": 2}).encode(), "/v1/completions"),
]
# The engine touches its whole KV cache at start-up, so the default size is soaked as it is
# served: its RSS is fixed from the first request, and any growth is a leak.
DEFAULT_SERVE_ARGS: list[str] = []
TOPICS = ["the sea", "a city at night", "prime numbers", "a cat", "the moon", "bread", "trains", "rain"]


@dataclass
class Tally:
    num_ok: int = 0
    num_dropped: int = 0
    num_invalid_rejected: int = 0
    num_overloaded: int = 0  # 503 + Retry-After: allowed, counted
    failures: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    num_completion_tokens: int = 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def server_processes(launcher_pid: int) -> dict[str, int]:
    """{"frontend": pid, "engine 0": pid, ...}: the launcher's children by their `-m` module,
    engines by their data-parallel rank (the last argument is each child's config JSON)."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    found = {}
    for pid in map(int, children):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [part for part in f.read().split(b"\0") if part]
        if b"engine_core" in argv:
            found[f"engine {json.loads(argv[-1]).get('data_parallel_rank', 0)}"] = pid
        elif b"frontend" in argv:
            found["frontend"] = pid
    if "frontend" not in found or "engine 0" not in found:
        raise SystemExit(f"soak: launcher {launcher_pid} has no frontend and engine children ({children})")
    return found


def engine_gauges(metrics: dict[str, float], name: str) -> list[float]:
    """One value per engine core (`engine="0"`, `"1"`, ...)."""
    values = [v for k, v in metrics.items() if k.startswith(f"furiosa_llm:{name}{{engine=")]
    if not values:
        raise SystemExit(f"soak: /metrics has no furiosa_llm:{name}")
    return values


def is_idle(metrics: dict[str, float]) -> bool:
    """Nothing running or waiting on any engine."""
    return not any(engine_gauges(metrics, "num_requests_running") + engine_gauges(metrics, "num_requests_waiting"))


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    text = (await client.get("/metrics", timeout=30)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def make_request(rng: random.Random, args) -> tuple[str, str, bytes, bool, int | None]:
    """(kind, path, body, stream, drop_after_events); kind is "invalid", "drop" or "ok"."""
    if rng.random() < args.invalid_fraction:
        body, path = rng.choice(INVALID_BODIES)
        return "invalid", path, body, b'"stream": true' in body, None
    drop = rng.random() < args.drop_fraction
    stream = drop or rng.random() < 0.5
    max_tokens = rng.randint(args.min_tokens, args.max_tokens)
    common = {"max_tokens": max_tokens, "stream": stream, "temperature": rng.choice([0, 0.7, 1.0]),
              "ignore_eos": rng.random() < 0.5, "seed": rng.randint(0, 2**31)}
    if rng.random() < 0.5:
        body = {"messages": [{"role": "user", "content": f"Write about {rng.choice(TOPICS)}."}], **common}
        path = "/v1/chat/completions"
    else:
        body = {"prompt": f"A short story about {rng.choice(TOPICS)}:", **common}
        path = "/v1/completions"
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    # the less common paths: stop strings (the frontend ends and aborts the choice), several
    # choices, beam search, explicit nulls, a logit bias
    if rng.random() < 0.2:
        body["stop"] = rng.choice([["e"], [" the", "."], ["\n"]])
    if rng.random() < 0.1:
        body["n"] = 2
    elif not stream and rng.random() < 0.05:
        body.update(use_beam_search=True, n=2, temperature=0)
    if rng.random() < 0.1:
        body.update(logprobs=None, echo=None, min_tokens=None, stop_token_ids=None)
    if rng.random() < 0.05:
        body["logit_bias"] = {"28": 5, "13": -100}
    drop_after = rng.randint(1, max(1, max_tokens // 2)) if drop else None
    return ("drop" if drop else "ok"), path, json.dumps(body).encode(), stream, drop_after


async def one_request(client: httpx.AsyncClient, rng: random.Random, args, tally: Tally) -> None:
    kind, path, body, stream, drop_after = make_request(rng, args)
    headers = {"content-type": "application/json"}
    start = time.monotonic()
    try:
        if stream:
            async with client.stream("POST", path, content=body, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    return check_error(kind, response, tally)
                events = 0
                last = ""
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events += 1
                    last = line[len("data: "):]
                    if '"error"' in last[:12]:
                        tally.failures.append(f"{path}: error event {last[:200]}")
                        return
                    if drop_after is not None and events >= drop_after:
                        tally.num_dropped += 1  # leaving the block closes the connection
                        return
                if last != "[DONE]":
                    tally.failures.append(f"{path}: stream ended without [DONE]")
                elif kind == "invalid":
                    tally.failures.append(f"{path}: an invalid request streamed to the end")
                else:  # a "drop" whose stream ended (EOS) before its turn to drop counts as ok
                    tally.num_ok += 1
                    tally.latencies_s.append(time.monotonic() - start)
        else:
            response = await client.post(path, content=body, headers=headers)
            if response.status_code != 200:
                return check_error(kind, response, tally)
            if kind != "ok":
                tally.failures.append(f"{path}: {kind} request answered 200")
                return
            tally.num_ok += 1
            tally.num_completion_tokens += response.json()["usage"]["completion_tokens"]
            tally.latencies_s.append(time.monotonic() - start)
    except httpx.HTTPError as exc:
        tally.failures.append(f"{path}: {type(exc).__name__}: {exc}")


def check_error(kind: str, response: httpx.Response, tally: Tally) -> None:
    try:
        error = response.json()["error"]
        is_envelope = set(error) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        is_envelope = False
    if not is_envelope:
        tally.failures.append(f"{response.status_code} without OpenAI's envelope: {response.text[:200]}")
    elif response.status_code == 503 and response.headers.get("retry-after"):
        tally.num_overloaded += 1
    elif kind == "invalid" and 400 <= response.status_code < 500:
        tally.num_invalid_rejected += 1
    else:
        tally.failures.append(f"{kind} request: {response.status_code} {error['message'][:200]}")


async def run_load(url: str, num_requests: int, args, seed: int, headers: dict) -> tuple[Tally, float]:
    tally = Tally()
    rng = random.Random(seed)
    remaining = iter(range(num_requests))
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits, headers=headers) as client:
        async def worker() -> None:
            for _ in remaining:
                await one_request(client, rng, args, tally)

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return tally, time.monotonic() - start


async def wait_idle(url: str, headers: dict, timeout_s: float) -> dict[str, float]:
    """Polls /metrics until every engine has nothing running or waiting and an empty KV cache."""
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            metrics = await scrape(client)
            if is_idle(metrics) and not any(engine_gauges(metrics, "kv_cache_usage_perc")):
                return metrics
            if time.monotonic() > deadline:
                return metrics
            await asyncio.sleep(0.5)


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [os.path.join(os.path.dirname(sys.executable), "furiosa-llm"), "serve", "--host", "127.0.0.1",
               "--port", str(port), *(args.serve_args or DEFAULT_SERVE_ARGS)]
    log = open(args.server_log, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"soak: the server exited with {process.returncode}; see {args.server_log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("soak: the server did not become ready")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="with --url: the launcher's pid, for RSS")
    parser.add_argument("--api-key", default=os.environ.get("FURIOSA_LLM_API_KEY"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup-requests", type=int, default=256)
    parser.add_argument("--drop-fraction", type=float, default=1 / 3)
    parser.add_argument("--invalid-fraction", type=float, default=0.05)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--rss-tolerance", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-log", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "furiosa-llm-soak.log"))
    parser.add_argument("serve_args", nargs="*",
                        help="flags for `furiosa-llm serve` when it is started here (after --; "
                             "default: none, the server's own defaults)")
    args = parser.parse_args()

    process = None
    if args.url:
        url, launcher_pid = args.url.rstrip("/"), args.pid
    else:
        process, url = start_server(args)
        launcher_pid = process.pid
        print(f"soak: started {url} (pid {launcher_pid}, log {args.server_log})", flush=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        return soak(args, url, launcher_pid, headers)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=120)
            print(f"soak: the server exited with {code} after SIGTERM", flush=True)


def soak(args, url: str, launcher_pid: int | None, headers: dict) -> int:
    pids = server_processes(launcher_pid) if launcher_pid else {}
    rss_start = {name: rss_kib(pid) for name, pid in pids.items()}  # ready, before any request
    print(f"soak: warm-up, {args.warmup_requests} requests", flush=True)
    warm, _ = asyncio.run(run_load(url, args.warmup_requests, args, args.seed + 1, headers))
    asyncio.run(wait_idle(url, headers, 120))
    rss_warm = {name: rss_kib(pid) for name, pid in pids.items()}
    print(f"soak: {args.requests} requests over {args.concurrency} clients", flush=True)
    tally, elapsed_s = asyncio.run(run_load(url, args.requests, args, args.seed, headers))
    idle_start = time.monotonic()
    metrics = asyncio.run(wait_idle(url, headers, 120))
    idle_s = time.monotonic() - idle_start
    probe = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, headers=headers, timeout=120)
    rss_after = {name: rss_kib(pid) for name, pid in pids.items()}

    checks = {
        "no_failed_requests": not tally.failures and not warm.failures,
        "nothing_running": is_idle(metrics),
        "kv_cache_empty": not any(engine_gauges(metrics, "kv_cache_usage_perc")),
        "server_answers": probe.status_code == 200 and probe.json()["usage"]["completion_tokens"] == 4,
        "rss_within_tolerance": all(abs(rss_after[n] - rss_warm[n]) <= args.rss_tolerance * rss_warm[n]
                                    for n in rss_warm),
    }
    result = {
        "requests": args.requests, "concurrency": args.concurrency, "elapsed_s": round(elapsed_s, 1),
        "requests_per_s": round(args.requests / elapsed_s, 2),
        "ok": tally.num_ok, "dropped": tally.num_dropped, "invalid_rejected": tally.num_invalid_rejected,
        "overloaded_503": tally.num_overloaded, "failed": len(tally.failures),
        "latency_p50_s": round(percentile(tally.latencies_s, 50), 3),
        "latency_p99_s": round(percentile(tally.latencies_s, 99), 3),
        "generation_tokens_total": metrics.get("furiosa_llm:generation_tokens_total"),
        "generation_tokens_after_disconnect_total": metrics.get("furiosa_llm:generation_tokens_after_disconnect_total"),
        "aborted_choices": metrics.get("furiosa_llm:request_success_total{finished_reason=abort}"),
        "seconds_to_idle": round(idle_s, 1),
        "rss_kib_at_start": rss_start, "rss_kib_after_warmup": rss_warm, "rss_kib_after_soak": rss_after,
        "rss_change_since_start_pct": {n: round(100 * (rss_after[n] - rss_start[n]) / rss_start[n], 2)
                                       for n in rss_start},
        "rss_change_pct": {n: round(100 * (rss_after[n] - rss_warm[n]) / rss_warm[n], 2) for n in rss_warm},
        "checks": checks,
    }
    for failure in (warm.failures + tally.failures)[:20]:
        print("FAILED:", failure)
    for key, value in result.items():
        print(f"{key:>42}: {value}")
    print(json.dumps(result), flush=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
