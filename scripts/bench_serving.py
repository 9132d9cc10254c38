#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server (like `vllm bench serve`).

Sends `--num-requests` streaming requests at each `--concurrency` level in turn (each level
after the previous one finishes), every request with `ignore_eos: true` and
`max_tokens = --output-len`, and reports per level: requests/s, output and total tokens/s,
time to first token (TTFT), inter-token latency (ITL, the gap between streamed chunks that
carry text), time per output token (TPOT, per request: (latency - TTFT) / (tokens - 1)) and
errors. A request whose `usage.completion_tokens` is not `--output-len` counts as an error.

Prompts (`--prompt-kind`):
  tokens  (completions only, the default there) random token ids sent as the `prompt`
          array of /v1/completions, so the prompt is exactly `--input-len` tokens;
  words   (the only choice for chat) `--input-len` random common English words, about one
          token each; the measured `usage.prompt_tokens` mean is reported.
No /tokenize call is made, so any OpenAI endpoint works.

With `--server-pid PID` (or `--start-server`), the CPU time (utime + stime from /proc) of PID
and all its descendants is read before and after each level and reported as cores used per
process (e.g. frontend 0.4, engine 1.0). The client's own CPU use is reported too.

Prints a table, then one JSON line with every number.

    python scripts/bench_serving.py --start-server --concurrency 1 8 64 --input-len 128 --output-len 32
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --server-pid 1234 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy process music market sense nation plan college interest "
    "death experience effect class control care field development role effort rate heart drug "
    "show leader light voice wife police mind price report decision son view relationship town "
    "road arm difference value building action model season society tax director position "
    "player record paper space ground form event official matter center couple site project "
    "activity star table need court oil situation cost industry figure street image phone data "
    "picture practice piece land product doctor wall patient worker news test movie north love "
    "support technology step baby computer type attention film tree source organization hair"
).split()


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API root, ending in /v1 (default: %(default)s)")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64],
                   help="requests in flight; several values run one after another (default: 1 8 64)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per concurrency level (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request (default: %(default)s)")
    p.add_argument("--prompt-kind", choices=("tokens", "words"),
                   help="random token ids (completions only) or random words (default: tokens for completions, words for chat)")
    p.add_argument("--token-id-range", type=int, nargs=2, default=[1000, 10000], metavar=("LO", "HI"),
                   help="token ids are drawn from [LO, HI) (default: 1000 10000, inside any vocabulary in use)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt generator (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--warmup-timeout", type=float, default=120.0,
                   help="seconds allowed for the warm-up request (default: %(default)s)")
    p.add_argument("--server-pid", type=int, help="report CPU use of this process and its descendants")
    p.add_argument("--start-server", action="store_true",
                   help="start `furiosa-llm serve` on a free 127.0.0.1 port, benchmark it, stop it (ignores --base-url)")
    p.add_argument("--server-args", default="", help='extra arguments for `furiosa-llm serve`, e.g. "--max-num-seqs 64"')
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for /health (default: %(default)s)")
    p.add_argument("--llama-server", metavar="PATH",
                   help="llama.cpp's llama-server binary: start our server and it in turn on the same GGUF "
                        "(--gguf) at each --threads count and compare them (scripts/bench_vs_llama_server.py)")
    p.add_argument("--gguf", help="with --llama-server: the GGUF both serve (default: the embedded model)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="with --llama-server (default: 1 2)")
    p.add_argument("--layout", nargs="+", choices=("threads", "engines"), default=["threads"],
                   help="with --llama-server: our server as one T-thread engine or T one-thread engines")
    args = p.parse_args(argv)
    args.prompt_kind = args.prompt_kind or ("tokens" if args.endpoint == "completions" else "words")
    if args.endpoint == "chat" and args.prompt_kind == "tokens":
        p.error("--prompt-kind tokens needs --endpoint completions (chat messages are text)")
    if min(args.concurrency) < 1 or args.num_requests < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--concurrency, --num-requests, --input-len and --output-len must be positive")
    return args


# ---------------------------------------------------------------- prompts and payloads


def make_prompt(rng: np.random.Generator, args: argparse.Namespace) -> str | list[int]:
    if args.prompt_kind == "tokens":
        lo, hi = args.token_id_range
        return rng.integers(lo, hi, size=args.input_len).tolist()
    return " ".join(rng.choice(WORDS, size=args.input_len).tolist())


def make_payload(args: argparse.Namespace, model: str, prompt: str | list[int], output_len: int) -> dict:
    payload = {
        "model": model,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    return payload


# ---------------------------------------------------------------- one request


@dataclass
class Result:
    expected_tokens: int
    start: float = 0.0
    ttft: float | None = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def check(self) -> None:
        if self.error is None and self.completion_tokens is None:
            self.error = "no usage in stream"
        elif self.error is None and self.completion_tokens != self.expected_tokens:
            self.error = f"completion_tokens {self.completion_tokens} != {self.expected_tokens}"
        elif self.error is None and self.ttft is None:
            self.error = "no text streamed"


def chunk_text(chunk: dict) -> str:
    parts = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        parts.append((delta.get("content") or "") if delta is not None else (choice.get("text") or ""))
    return "".join(parts)


def on_chunk(result: Result, chunk: dict, last: float) -> float:
    """Record one decoded SSE chunk; returns the time of the last text-bearing chunk."""
    now = time.perf_counter()
    if "error" in chunk:
        result.error = f"stream error: {str(chunk['error'].get('message', chunk['error']))[:80]}"
    if chunk.get("usage"):
        result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
        result.completion_tokens = chunk["usage"].get("completion_tokens")
    if not chunk_text(chunk):
        return last
    if result.ttft is None:
        result.ttft = now - result.start
    else:
        result.itls.append(now - last)
    return now


async def send_request(client: httpx.AsyncClient, url: str, payload: dict) -> Result:
    result = Result(expected_tokens=payload["max_tokens"], start=time.perf_counter())
    last = result.start
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:80]}"
                return result
            # read to the end of the body (not just to [DONE]) so the connection is reused
            async for line in response.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else "[DONE]"
                if data != "[DONE]":
                    last = on_chunk(result, json.loads(data), last)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:80]}"
    finally:
        result.latency = time.perf_counter() - result.start
    result.check()
    return result


# ---------------------------------------------------------------- CPU accounting via /proc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in ticks) of a live process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def process_label(pid: int, root: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid{pid}"
    if "-m engine_core" in cmdline:
        return "engine"
    if "-m frontend" in cmdline:
        return "frontend"
    return "launcher" if pid == root and "furiosa-llm" in cmdline else comm


def cpu_snapshot(root: int | None) -> dict[int, tuple[str, int]]:
    if root is None:
        return {}
    snap = {}
    for pid in descendants(root):
        if (stat := read_stat(pid)) is not None:
            snap[pid] = (process_label(pid, root), stat[1])
    return snap


def cpu_cores(before: dict, after: dict, wall: float) -> dict[str, float]:
    """Cores used per process between two snapshots (processes alive at the end)."""
    cores: dict[str, float] = {}
    for pid, (label, ticks) in after.items():
        delta = ticks - before.get(pid, (label, 0))[1]
        name = label if label not in cores else f"{label}[{pid}]"
        cores[name] = round(delta / CLK_TCK / wall, 3)
    return cores


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- one concurrency level


async def run_level(client: httpx.AsyncClient, url: str, payloads: list[dict], concurrency: int) -> tuple[list[Result], float]:
    queue = iter(payloads)
    results: list[Result] = []

    async def worker() -> None:
        for payload in queue:  # a shared iterator: each payload is taken once
            results.append(await send_request(client, url, payload))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(payloads)))))
    return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def summarize(results: list[Result], duration: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    itls = [gap for r in ok for gap in r.itls]
    tpots = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "concurrency": concurrency, "requests": len(results), "completed": len(ok),
        "errors": len(results) - len(ok), "error_kinds": errors, "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 3),
        "output_tok_s": round(out_tokens / duration, 2), "total_tok_s": round((in_tokens + out_tokens) / duration, 2),
        "mean_prompt_tokens": round(in_tokens / len(ok), 1) if ok else None,
        "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
        "itl_p50_ms": pct(itls, 50), "itl_p99_ms": pct(itls, 99),
        "tpot_mean_ms": round(float(np.mean(tpots)) * 1000, 2) if tpots else None,
        "tpot_p50_ms": pct(tpots, 50), "tpot_p99_ms": pct(tpots, 99),
        "latency_p50_ms": pct([r.latency for r in ok], 50),
    }


async def bench_level(client, url, payloads, concurrency, server_pid) -> dict:
    before, client_before = cpu_snapshot(server_pid), client_cpu_seconds()
    results, duration = await run_level(client, url, payloads, concurrency)
    row = summarize(results, duration, concurrency)
    row["server_cpu_cores"] = cpu_cores(before, cpu_snapshot(server_pid), duration) if server_pid else None
    row["client_cpu_cores"] = round((client_cpu_seconds() - client_before) / duration, 3)
    return row


# ---------------------------------------------------------------- output

COLUMNS = (
    ("conc", "concurrency", "{}"), ("req/s", "request_throughput", "{:.2f}"), ("out tok/s", "output_tok_s", "{:.1f}"),
    ("tot tok/s", "total_tok_s", "{:.1f}"), ("TTFT p50", "ttft_p50_ms", "{:.0f}"), ("TTFT p99", "ttft_p99_ms", "{:.0f}"),
    ("ITL p50", "itl_p50_ms", "{:.1f}"), ("ITL p99", "itl_p99_ms", "{:.1f}"), ("TPOT", "tpot_mean_ms", "{:.1f}"),
    ("errors", "errors", "{}"),
)


def cell(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


def print_table(rows: list[dict]) -> None:
    header = "  ".join(f"{name:>9}" for name, _, _ in COLUMNS) + "  server CPU (cores)"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        cpu = row["server_cpu_cores"]
        cpu_text = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) if cpu else "-"
        cells = "  ".join(f"{cell(fmt, row[key]):>9}" for _, key, fmt in COLUMNS)
        print(f"{cells}  {cpu_text}; client {row['client_cpu_cores']:.2f}")
        for kind, count in row["error_kinds"].items():
            print(f"{'':>11}error x{count}: {kind}")
    print("(times in ms; ITL = gap between text-bearing stream chunks; "
          "TPOT = mean per request of (latency - TTFT) / (tokens - 1))")


# ---------------------------------------------------------------- starting furiosa-llm serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    exe = Path(sys.executable).parent / "furiosa-llm"
    port = free_port()
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), *shlex.split(args.server_args)]
    log = Path(tempfile.mkstemp(prefix="bench_serving_server_", suffix=".log")[1])
    print(f"starting: {shlex.join(cmd)} (log: {log})", file=sys.stderr)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}/v1", log


async def wait_healthy(base_url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    health = base_url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy")
            try:
                if (await client.get(health)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{health} not healthy within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"server stopped (exit code {proc.returncode})", file=sys.stderr)


# ---------------------------------------------------------------- main


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(f"{base_url}/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def warm_up(client: httpx.AsyncClient, url: str, payload: dict, timeout: float) -> None:
    try:
        result = await asyncio.wait_for(send_request(client, url, payload), timeout)
    except asyncio.TimeoutError:
        raise RuntimeError(f"warm-up request took over {timeout:.0f} s") from None
    if not result.ok:
        raise RuntimeError(f"warm-up request failed: {result.error}")


async def benchmark(args: argparse.Namespace, base_url: str, server_pid: int | None) -> list[dict]:
    base_url = base_url.rstrip("/")
    url = f"{base_url}/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    rng = np.random.default_rng(args.seed)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or await first_model(client, base_url)
        print(f"model {model!r} at {url}; prompts: {args.input_len} random {args.prompt_kind}, "
              f"output {args.output_len} tokens (ignore_eos)", file=sys.stderr)
        warmup = make_payload(args, model, make_prompt(rng, args), min(args.output_len, 8))
        await warm_up(client, url, warmup, args.warmup_timeout)
        rows = []
        for concurrency in args.concurrency:
            payloads = [make_payload(args, model, make_prompt(rng, args), args.output_len) for _ in range(args.num_requests)]
            rows.append(await bench_level(client, url, payloads, concurrency, server_pid))
            print(f"concurrency {concurrency}: done in {rows[-1]['duration_s']} s", file=sys.stderr)
    return rows


def report(args: argparse.Namespace, base_url: str, rows: list[dict]) -> None:
    print_table(rows)
    config = {k: v for k, v in vars(args).items() if k != "api_key"} | {"base_url": base_url}
    print(json.dumps({"config": config, "results": rows}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.llama_server:
        import bench_vs_llama_server

        from frontend.default_model import default_model_path

        vs = argparse.Namespace(
            llama_server=args.llama_server, model=args.gguf or default_model_path(), threads=args.threads,
            concurrency=args.concurrency, input_len=args.input_len, output_len=args.output_len,
            min_requests=8, waves=max(1, args.num_requests // max(args.concurrency)), kv_cache_gib=2.0,
            layout=args.layout, server_args=args.server_args)
        return bench_vs_llama_server.compare(vs)
    proc, base_url, server_pid = None, args.base_url, args.server_pid
    try:
        if args.start_server:
            proc, base_url, log = start_server(args)
            server_pid = args.server_pid = proc.pid
            asyncio.run(wait_healthy(base_url, proc, args.server_timeout))
        rows = asyncio.run(benchmark(args, base_url, server_pid))
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"bench_serving: {exc}", file=sys.stderr)
        if proc is not None:
            print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
    report(args, base_url, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
