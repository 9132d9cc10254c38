#!/usr/bin/env python3
"""Served throughput and latency of `furiosa-llm serve` beside llama.cpp's `llama-server`, in one
run, on the same GGUF, thread count and machine.

For each `--threads` value T: starts our server in each `--layout` (`threads`: one engine core
with T threads, `--data-parallel-size 1 --num-threads T`; `engines`: T engine cores of one
thread each, `--data-parallel-size T --num-threads 1`, the same cores used another way; plus
`--server-args`), runs scripts/bench_serving.py at each `--concurrency` level (streamed
/v1/completions, random token-id prompts of `--input-len`, `--output-len` tokens with
ignore_eos), stops it; then the same against
llama-server (`-t T -tb T`, `--parallel` = the largest concurrency, a context holding them all,
continuous batching). Prints output tok/s and TTFT p50 of both and their ratios per level, then
one JSON line.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_vs_llama_server.py \\
        --llama-server ~/llama.cpp/build/bin/llama-server --threads 1 2 --concurrency 1 32 64

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which some machines here set, slow numpy; a user's machine
does not set them, so unset both for this command only (as above) for figures you quote.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy in {timeout:.0f} s")
        time.sleep(0.5)


def run_levels(base_url: str, pid: int, args: argparse.Namespace) -> list[dict]:
    """bench_serving.py against base_url; its per-level rows."""
    rows = []
    for concurrency in args.concurrency:
        # `--waves` requests per slot; at least --min-requests (a low concurrency runs few at once)
        requests = max(args.min_requests, args.waves * concurrency)
        cmd = [sys.executable, str(SCRIPTS / "bench_serving.py"), "--base-url", base_url + "/v1",
               "--server-pid", str(pid), "--concurrency", str(concurrency), "--num-requests", str(requests),
               "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--prompt-kind", "tokens"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.extend(json.loads(out.strip().splitlines()[-1])["results"])
    return rows


def measure(cmd: list[str], port: int, args: argparse.Namespace) -> list[dict]:
    """Start a server (cmd, listening on port), run the levels against it, stop it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        return run_levels(f"http://127.0.0.1:{port}", proc.pid, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def ours(model: str, threads: int, layout: str, args: argparse.Namespace) -> list[dict]:
    port = free_port()
    engines, per_engine = (1, threads) if layout == "threads" else (threads, 1)
    cmd = [str(Path(sys.executable).with_name("furiosa-llm")), "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--num-threads", str(per_engine), "--data-parallel-size", str(engines),
           "--max-num-seqs", str(max(args.concurrency)), "--kv-cache-gib", str(args.kv_cache_gib),
           *args.server_args.split()]
    return measure(cmd, port, args)


def theirs(binary: str, model: str, threads: int, args: argparse.Namespace) -> list[dict]:
    port = free_port()
    slots = max(args.concurrency)
    cmd = [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(slots), "-c", str(slots * (args.input_len + args.output_len + 16)), "--cont-batching"]
    return measure(cmd, port, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", required=True, metavar="PATH", help="llama.cpp's llama-server binary")
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--waves", type=int, default=2, help="requests per concurrency slot (default: %(default)s)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="per engine core (default: %(default)s)")
    parser.add_argument("--layout", nargs="+", choices=("threads", "engines"), default=["threads"],
                        help="how our server uses T threads: one engine with T threads, or T one-thread "
                             "engines (--data-parallel-size T); several run one after another (default: threads)")
    parser.add_argument("--server-args", default="", help='extra arguments for `furiosa-llm serve`, e.g. "--kv-cache-dtype bfloat16"')
    args = parser.parse_args()
    return compare(args)


def compare(args: argparse.Namespace) -> int:
    """The runs and the table; args as main's parser makes them (bench_serving.py --llama-server
    builds the same)."""
    if args.model is None:
        from frontend.default_model import default_model_path

        args.model = default_model_path()
    print("OPENBLAS_CORETYPE =", os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
          "OPENBLAS_L2_SIZE =", os.environ.get("OPENBLAS_L2_SIZE", "(unset)"), file=sys.stderr)
    table = []
    for threads in args.threads:
        b = theirs(args.llama_server, args.model, threads, args)
        for layout in args.layout:
            if layout == "engines" and threads == 1 and "threads" in args.layout:
                continue  # one one-thread engine either way
            a = ours(args.model, threads, layout, args)
            for x, y in zip(a, b):
                table.append({
                    "threads": threads, "ours": layout, "concurrency": x["concurrency"],
                    "ours_out_tok_s": x["output_tok_s"], "llama_out_tok_s": y["output_tok_s"],
                    "ratio": round(x["output_tok_s"] / y["output_tok_s"], 3) if y["output_tok_s"] else None,
                    "ours_ttft_p50_ms": x["ttft_p50_ms"], "llama_ttft_p50_ms": y["ttft_p50_ms"],
                    "ours_errors": x["errors"], "llama_errors": y["errors"],
                })
    print(f"{'threads':>7} {'ours as':>8} {'conc':>5} {'ours tok/s':>11} {'llama tok/s':>12} {'ratio':>6} "
          f"{'TTFT p50 ours/llama (ms)':>26}")
    for r in table:
        print(f"{r['threads']:>7} {r['ours']:>8} {r['concurrency']:>5} {r['ours_out_tok_s']:>11.1f} "
              f"{r['llama_out_tok_s']:>12.1f} {r['ratio'] or 0:>6.2f} {r['ours_ttft_p50_ms']:>12.0f} / "
              f"{r['llama_ttft_p50_ms']:<10.0f}")
    print(json.dumps({"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
                      "server_args": args.server_args, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                      "openblas_l2_size": os.environ.get("OPENBLAS_L2_SIZE"), "results": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
