"""float32 against int8 activations (`--activation-dtype`), in one run, on one thread:

1. the few-row matmul (kernels.matmul) on the default model's fused layer-0 weights (qkv, o,
   gate_up, down) and random 4096 x 4096 Q4_K / 1024 x 2048 Q4_0 weights, at 1..12 rows: the best
   of interleaved calls;
2. decode of the default model (256-token contexts): tokens per CPU-second of the engine step
   (process_time: time spent descheduled by other processes on a shared machine does not count)
   and per wall second, the best 16-step window of alternating rounds.

Run it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, as on a user's machine:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python scripts/bench_activation_dtype.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core import kernels  # noqa: E402
from engine_core.loader import load_artifact  # noqa: E402
from engine_core.model import LlamaModel  # noqa: E402
from frontend.default_model import default_model_path  # noqa: E402

import bench_engine  # noqa: E402  (scripts/ is on the path when run as a script)


def random_weight(qtype: str, rows: int, cols: int) -> kernels.QuantizedWeight:
    """Random codes and small-integer scales with sane float16 scales: a valid block of the format."""
    block, size, f16 = {"Q4_0": (32, 18, (0,)), "Q4_K": (256, 144, (0, 2))}[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in f16:
        scale = (rng.uniform(0.5, 2.0, (rows, cols // block)) * 1e-3).astype(np.float16)
        raw[..., offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return kernels.pack(qtype, kernels.unpack(qtype, raw.reshape(rows, -1), cols), rows, cols)


def best_call(f, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def bench_matmuls(model: LlamaModel, rows: list[int]) -> None:
    layer = model.layers[0]
    weights = [(name, layer[name][0]) for name in ("qkv", "o", "gate_up", "down")]
    weights += [("random", random_weight("Q4_K", 4096, 4096)), ("random", random_weight("Q4_0", 1024, 2048))]
    for name, w in weights:
        for m in rows:
            x = np.random.default_rng(m).standard_normal((m, w.cols)).astype(np.float32)
            for dtype in ("float32", "int8"):
                kernels.set_activation_precision(dtype)
                kernels.matmul(x, w)
            calls = max(20, int(0.02 / best_call(lambda: kernels.matmul(x, w), 3)))
            best = {"float32": float("inf"), "int8": float("inf")}
            for _ in range(15):
                for dtype in best:
                    kernels.set_activation_precision(dtype)
                    best[dtype] = min(best[dtype], best_call(lambda: kernels.matmul(x, w), calls))
            print(f"matmul {name:8s} {w.qtype} {w.rows}x{w.cols} rows {m:2d}: float32 {best['float32'] * 1e6:8.1f} us"
                  f"  int8 {best['int8'] * 1e6:8.1f} us  {best['float32'] / best['int8']:.2f}x", flush=True)


def bench_decode(core, batches: list[int], rounds: int) -> None:
    for batch in batches:
        rng = np.random.default_rng(batch)
        for i in range(batch):
            bench_engine.add(core, f"r{i}", rng.integers(100, 40_000, size=256).tolist(), 10_000)
        for _ in range(batch + 3):
            core.step()  # prefills (float32 either way: more than GEMV_MAX_ROWS rows) and a few decodes
        cpu = {"float32": float("inf"), "int8": float("inf")}
        wall = dict(cpu)
        for _ in range(rounds):
            for dtype in cpu:
                kernels.set_activation_precision(dtype)
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                for _ in range(16):
                    core.step()
                cpu[dtype] = min(cpu[dtype], time.process_time() - cpu_start)
                wall[dtype] = min(wall[dtype], time.perf_counter() - wall_start)
        tokens = 16 * batch
        print(f"decode batch {batch}: tok/s per CPU second float32 {tokens / cpu['float32']:.1f} int8 "
              f"{tokens / cpu['int8']:.1f} ({cpu['float32'] / cpu['int8']:.2f}x); per wall second float32 "
              f"{tokens / wall['float32']:.1f} int8 {tokens / wall['int8']:.1f} ({wall['float32'] / wall['int8']:.2f}x)",
              flush=True)
        core.abort_requests([f"r{i}" for i in range(batch)])
        core.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12], help="matmul rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="decode batch sizes")
    parser.add_argument("--rounds", type=int, default=10, help="alternating decode rounds per batch size")
    args = parser.parse_args()
    with threadpool_limits(1):
        kernels.set_num_threads(1)
        model_config, weights = load_artifact(default_model_path())
        settings = argparse.Namespace(model=default_model_path(), kv_cache_gib=0.5, activation_dtype="int8")
        core = bench_engine.make_core(model_config, weights, settings, max(args.batches))
        kernels.warm_up({w.qtype for w in weights.values() if isinstance(w, kernels.QuantizedWeight)})
        kernels.set_activation_precision("float32")
        kernels.warm_up({w.qtype for w in weights.values() if isinstance(w, kernels.QuantizedWeight)})
        bench_matmuls(core.runner.model, args.rows)
        bench_decode(core, args.batches, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
