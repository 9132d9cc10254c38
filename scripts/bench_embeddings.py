#!/usr/bin/env python3
"""Embeddings per second of `furiosa-llm serve --runner pooling`, and of llama.cpp's
llama-server (`--embeddings --pooling last`) on the same GGUF and thread count when given.

Sends `--num-inputs` inputs of `--input-len` random token ids (the same ids to every server),
two ways: all of them in one /v1/embeddings request (one prefill batch in our engine), and one
input per request with `--concurrency` requests in flight. Each way runs `--repeats` times after
a warm-up, each time on fresh inputs (so that neither server's prompt cache helps); the
median wall time gives embeddings/s. Both servers pool the last token and
L2-normalize, so the cosine between their vectors for the same input is printed as a sanity
check (the weights are the same Q4_1 GGUF; small differences come from the kernels).

Prints a table, then one JSON line with every number.

    python scripts/bench_embeddings.py
    python scripts/bench_embeddings.py --llama-server /tmp/llama-server/llama.cpp/build/bin/llama-server --num-threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--num-inputs", type=int, default=64, help="inputs per run (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=128, help="tokens per input (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight when each request carries one input (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per way (default: %(default)s)")
    p.add_argument("--num-threads", type=int, default=1, help="compute threads of each server (default: %(default)s)")
    p.add_argument("--pooler-type", choices=("last", "mean"), default="last")
    p.add_argument("--llama-server", metavar="PATH", help="also run this llama-server binary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for /health")
    return p.parse_args(argv)


def default_gguf() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from frontend.default_model import default_model_path

    return default_model_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], name: str) -> tuple[subprocess.Popen, Path]:
    log = Path(tempfile.gettempdir()) / f"bench-embeddings-{name}-{os.getpid()}.log"
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not healthy after {timeout_s} s; log: {log}")


def furiosa_command(args: argparse.Namespace, gguf: str, port: int) -> list[str]:
    executable = Path(sys.executable).with_name("furiosa-llm")
    return [str(executable), "serve", gguf, "--runner", "pooling", "--pooler-type", args.pooler_type,
            "--host", "127.0.0.1", "--port", str(port), "--num-threads", str(args.num_threads), "--data-parallel-size", "1",
            "--kv-cache-gib", "1", "--disable-log-stats"]


def llama_command(args: argparse.Namespace, gguf: str, port: int) -> list[str]:
    # one slot per input of a concurrent run, each with room for an input; one ubatch holds a
    # whole input (pooling needs it) and a batch as many as fit
    slots = max(args.concurrency, 16)
    return [args.llama_server, "-m", gguf, "--embeddings", "--pooling", args.pooler_type,
            "--host", "127.0.0.1", "--port", str(port), "-t", str(args.num_threads), "-tb", str(args.num_threads),
            "-np", str(slots), "-c", str(slots * max(256, args.input_len * 2)), "-b", "2048", "-ub", "2048",
            "--no-webui", "--log-disable"]


async def embed(client: httpx.AsyncClient, url: str, inputs: list[list[int]]) -> list[list[float]]:
    response = await client.post(url + "/v1/embeddings", json={"input": inputs, "encoding_format": "float"})
    response.raise_for_status()
    data = sorted(response.json()["data"], key=lambda d: d["index"])
    if len(data) != len(inputs):
        raise RuntimeError(f"{len(inputs)} inputs gave {len(data)} vectors")
    return [d["embedding"] for d in data]


async def one_batch(client, url, inputs) -> list[list[float]]:
    return await embed(client, url, inputs)


async def one_per_request(client, url, inputs, concurrency: int) -> list[list[float]]:
    vectors: list[list[float] | None] = [None] * len(inputs)
    next_index = iter(range(len(inputs)))

    async def worker() -> None:
        for i in next_index:
            vectors[i] = (await embed(client, url, [inputs[i]]))[0]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return vectors


async def measure(url: str, runs: dict[str, list[list[list[int]]]], args: argparse.Namespace) -> dict:
    """runs: way -> the inputs of each repeat (fresh ones each time: no prefix cache helps)."""
    results = {}
    first_vectors = None
    async with httpx.AsyncClient(timeout=1800) as client:
        await embed(client, url, [[7] * args.input_len, [8] * args.input_len])  # warm-up
        for way, repeats in runs.items():
            times = []
            for inputs in repeats:
                start = time.perf_counter()
                if way == "one_request":
                    vectors = await one_batch(client, url, inputs)
                else:
                    vectors = await one_per_request(client, url, inputs, args.concurrency)
                times.append(time.perf_counter() - start)
                first_vectors = first_vectors or vectors
            median = statistics.median(times)
            results[way] = {"median_s": round(median, 3), "min_s": round(min(times), 3),
                            "embeddings_per_s": round(args.num_inputs / median, 2)}
    return {"ways": results, "vectors": first_vectors}


def cosine(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def bench_server(name: str, command: list[str], url: str, inputs, args) -> dict:
    proc, log = start(command, name)
    try:
        wait_healthy(url, proc, log, args.server_timeout)
        return asyncio.run(measure(url, inputs, args))
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gguf = args.model or default_gguf()
    rng = np.random.default_rng(args.seed)
    inputs = {way: [rng.integers(1000, 10000, size=(args.num_inputs, args.input_len)).tolist()
                    for _ in range(args.repeats)]
              for way in ("one_request", "one_input_per_request")}
    servers = {}
    port = free_port()
    servers["furiosa-llm"] = bench_server("furiosa", furiosa_command(args, gguf, port), f"http://127.0.0.1:{port}",
                                          inputs, args)
    if args.llama_server:
        port = free_port()
        servers["llama-server"] = bench_server("llama", llama_command(args, gguf, port), f"http://127.0.0.1:{port}",
                                               inputs, args)
    print(f"{args.num_inputs} inputs x {args.input_len} tokens, {args.num_threads} thread(s), "
          f"pooling {args.pooler_type}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'server':<14} {'way':<24} {'embeddings/s':>13} {'median s':>9} {'min s':>7}")
    for name, result in servers.items():
        for way, row in result["ways"].items():
            print(f"{name:<14} {way:<24} {row['embeddings_per_s']:>13.2f} {row['median_s']:>9.3f} {row['min_s']:>7.3f}")
    summary = {"num_inputs": args.num_inputs, "input_len": args.input_len, "num_threads": args.num_threads,
               "pooler_type": args.pooler_type, "concurrency": args.concurrency, "repeats": args.repeats,
               "load_average_1m": round(os.getloadavg()[0], 2),
               "servers": {name: result["ways"] for name, result in servers.items()}}
    if "llama-server" in servers:
        ours, theirs = servers["furiosa-llm"]["vectors"], servers["llama-server"]["vectors"]
        cosines = [cosine(a, b) for a, b in zip(ours, theirs)]
        summary["cosine_vs_llama_server_min"] = round(min(cosines), 6)
        print(f"cosine between the two servers' vectors: min {min(cosines):.6f}, "
              f"mean {sum(cosines) / len(cosines):.6f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
