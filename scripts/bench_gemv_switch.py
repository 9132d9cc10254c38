#!/usr/bin/env python3
"""Where the few-rows kernel stops paying: for each weight format, the time of a matmul of M
activation rows by the direct kernel (reads the codes, several rows sharing one read) and by
the many-rows path (dequantize chunks into a float32 buffer, multiply with BLAS), M = 1..--max-rows,
on one thread, and the largest M at which the kernel is still the faster: the value
engine_core.kernels.GEMV_MAX_ROWS_BY_FORMAT should hold for that format.

Times are the thread's CPU time (time.thread_time), the best of interleaved rounds, so that
other processes on a shared machine disturb the ratio less than they would wall time.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_gemv_switch.py

Prints a table per shape and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

import engine_core.kernels as kernels  # noqa: E402
from engine_core.kernels import formats  # noqa: E402

FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]


def random_weight(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> kernels.QuantizedWeight:
    """Random codes with small, finite scales (random bytes would make float16 scales inf/NaN)."""
    if qtype in formats.HALF_FORMATS:
        values = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.02)
        bits = (values.astype(np.float16).view(np.uint16) if qtype == "F16"
                else (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16))
        return formats.pack_half(qtype, bits)
    _, block, size = next(v for v in formats.BLOCK_FORMATS.values() if v[0] == qtype)
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # random bytes as float16 scales, replaced below
        parts = formats.unpack(qtype, raw, cols)
    for key in ("d", "dmin"):
        if parts.get(key) is not None:
            parts[key] = rng.random(parts[key].shape).astype(np.float32) * np.float32(0.01)
    return formats.pack(qtype, parts, rows, cols)


def cpu_seconds(work, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS)
    parser.add_argument("--shapes", nargs="+", default=["1536x576", "1536x512", "4096x4096"], help="ROWSxCOLS (out x in)")
    parser.add_argument("--max-rows", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    saved = kernels.GEMV_MAX_ROWS, dict(kernels.GEMV_MAX_ROWS_BY_FORMAT)
    results = []
    with threadpool_limits(1):
        kernels.set_num_threads(1)
        blas = [(i["internal_api"], i.get("architecture")) for i in threadpool_info()]
        for shape in args.shapes:
            rows, cols = map(int, shape.split("x"))
            print(f"{shape}: ms per matmul, kernel / dequantize+BLAS (one thread, CPU time)")
            for qtype in args.formats:
                block = next((v[1] for v in formats.BLOCK_FORMATS.values() if v[0] == qtype), 1)
                if cols % block:
                    continue  # the K-quants' 256-value blocks
                w = random_weight(qtype, rows, cols, rng)
                repeat = max(1, int(2e7 // (rows * cols)))
                times = []
                for m in range(1, args.max_rows + 1):
                    x = rng.standard_normal((m, cols)).astype(np.float32)
                    pair = []
                    for limit in (args.max_rows + 1, 0):  # the kernel, then the BLAS path
                        kernels.GEMV_MAX_ROWS = limit
                        kernels.GEMV_MAX_ROWS_BY_FORMAT[qtype] = limit
                        kernels.matmul(x, w)  # compile / warm
                        pair.append(cpu_seconds(lambda: [kernels.matmul(x, w) for _ in range(repeat)], args.rounds)
                                    / repeat)
                    times.append(pair)
                kernels.GEMV_MAX_ROWS, kernels.GEMV_MAX_ROWS_BY_FORMAT = saved[0], dict(saved[1])
                faster = [m for m, (k, b) in enumerate(times, start=1) if k <= b]
                # the switch point: the last M before the kernel first loses for good
                switch = 0
                for m, (k, b) in enumerate(times, start=1):
                    if k <= b:
                        switch = m
                    elif m > switch + 2:
                        break
                cells = " ".join(f"{m}:{k * 1e3:.2f}/{b * 1e3:.2f}" for m, (k, b) in enumerate(times, start=1)
                                 if m in (1, 2, 4, 6, 8, 10, 12, 14, 16, 20))
                print(f"  {qtype:>5}  kernel faster up to M={switch:<3} {cells}")
                results.append({"shape": shape, "format": qtype, "switch_rows": switch, "kernel_faster_at": faster,
                                "ms": [[round(k * 1e3, 4), round(b * 1e3, 4)] for k, b in times]})
    print(json.dumps({"blas": blas, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                      "openblas_l2_size": os.environ.get("OPENBLAS_L2_SIZE"), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
