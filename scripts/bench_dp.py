#!/usr/bin/env python3
"""Data parallelism against BLAS threads: output tok/s of `furiosa-llm serve` at one
concurrency for each server configuration, on a quiet machine and beside a CPU hog.

Configurations (`--configs`, default all three):
  dp1-t1  --data-parallel-size 1 --num-threads 1   (one engine, one thread: the old default)
  dp1-t2  --data-parallel-size 1 --num-threads 2   (one engine, two BLAS threads)
  dp2-t1  --data-parallel-size 2 --num-threads 1   (two engines, one thread and one CPU each)

Each runs `scripts/bench_serving.py --start-server` (random-token prompts of `--input-len`,
`--output-len` tokens with ignore_eos, `--num-requests` at `--concurrency`), first alone and then
with a hog: a `python -c "while True: pass"` process this script starts pinned to one CPU (the
last one the script may use, which is also the CPU of engine 1 under dp2-t1) and kills by pid
after the run. With `--llama-server PATH`, llama.cpp's server on the same GGUF with two threads
(`-t 2 -tb 2`, `--parallel` = the concurrency, continuous batching) runs the same load, alone and
beside the hog, as row `llama-t2`. Prints a table and one JSON line with every number.

    python scripts/bench_dp.py --concurrency 32 --num-requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "dp1-t1": "--data-parallel-size 1 --num-threads 1",
    "dp1-t2": "--data-parallel-size 1 --num-threads 2",
    "dp2-t1": "--data-parallel-size 2 --num-threads 1",
}
BENCH_SERVING = Path(__file__).with_name("bench_serving.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="per engine (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--no-hog", action="store_true", help="only the quiet runs")
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary: also run it with 2 threads")
    p.add_argument("--model", help="GGUF path (default: the embedded SmolLM2)")
    return p.parse_args(argv)


def start_hog(cpu: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, [cpu]))


def stop_hog(hog: subprocess.Popen) -> None:
    hog.kill()
    hog.wait()


def run_one(args: argparse.Namespace, server_args: str) -> dict:
    model = [args.model] if args.model else []
    return bench(args, ["--start-server", "--server-args", " ".join(model + [server_args, f"--kv-cache-gib {args.kv_cache_gib}"])])


def run_llama(args: argparse.Namespace) -> dict:
    """llama-server with two threads on the same GGUF, under the same load."""
    import bench_vs_llama_server as vs

    from frontend.default_model import default_model_path

    port = vs.free_port()
    slots = args.concurrency
    cmd = [args.llama_server, "-m", args.model or default_model_path(), "-t", "2", "-tb", "2", "--host", "127.0.0.1",
           "--port", str(port), "--parallel", str(slots), "-c", str(slots * (args.input_len + args.output_len + 16)),
           "--cont-batching"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        vs.wait_healthy(f"http://127.0.0.1:{port}", proc)
        return bench(args, ["--base-url", f"http://127.0.0.1:{port}/v1", "--server-pid", str(proc.pid)])
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def bench(args: argparse.Namespace, target: list[str]) -> dict:
    command = [sys.executable, str(BENCH_SERVING), *target,
               "--concurrency", str(args.concurrency), "--num-requests", str(args.num_requests),
               "--input-len", str(args.input_len), "--output-len", str(args.output_len),
               "--request-timeout", str(args.request_timeout), "--warmup-timeout", str(args.request_timeout)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-1000:]}
    [row] = json.loads(lines[-1])["results"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hog_cpu = sorted(os.sched_getaffinity(0))[-1]
    rows = []
    configs = list(args.configs) + (["llama-t2"] if args.llama_server else [])
    for with_hog in ([False] if args.no_hog else [False, True]):
        for name in configs:
            hog = start_hog(hog_cpu) if with_hog else None
            try:
                result = run_llama(args) if name == "llama-t2" else run_one(args, CONFIGS[name])
            finally:
                if hog is not None:
                    stop_hog(hog)
            rows.append({"config": name, "server_args": CONFIGS.get(name, "llama-server -t 2 -tb 2"),
                         "hog_cpu": hog_cpu if with_hog else None, **result})
            print(f"{name} {'with' if with_hog else 'without'} hog: {result.get('output_tok_s', result.get('error'))}",
                  file=sys.stderr, flush=True)
    print(f"{'config':8} {'hog':>4} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TPOT ms':>8} {'errors':>6}")
    for row in rows:
        print(f"{row['config']:8} {'yes' if row['hog_cpu'] is not None else 'no':>4} "
              f"{row.get('output_tok_s', float('nan')):>10} {row.get('ttft_p50_ms') or float('nan'):>12} "
              f"{row.get('tpot_mean_ms') or float('nan'):>8} {row.get('errors', '-'):>6}")
    print(json.dumps({"config": vars(args), "cpus": sorted(os.sched_getaffinity(0)), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
