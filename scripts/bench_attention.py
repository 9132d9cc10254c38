"""Microbenchmark of the fused paged decode attention (engine_core/kernels/attention.py).

    python scripts/bench_attention.py [--baseline OLD.py] [--repeat-s 0.3] [--quick]

Times paged_decode_attention for one sequence (contexts 256 and 2048; 256 also out of cache,
as a layer's keys and values are in the engine) and for 64 sequences (contexts 200-312), with SmolLM2-135M's head shapes (9 query heads, 3 KV heads, head_dim 64)
and an 8B model's (32, 8, 128), float32 and bfloat16 caches, on 1 and 2 kernel threads. Each
sequence's blocks are scattered over the cache (block size 16, the engine's default) as a busy
server leaves them. Prints microseconds per call (the fastest of interleaved rounds; the
median for the out-of-cache case) and one JSON line. Beside each, the read floor: a compiled
loop that only reads (and sums) the same keys and values through the same block tables, timed
the same way; the kernel's time over it says how far the attention is from the cost of its
memory traffic alone.

--baseline: another version of the module (e.g. `git show HEAD~1:engine_core/kernels/attention.py
> /tmp/attention_old.py`), timed in the same run, rounds interleaved with the current one, so that
the ratio holds on a machine shared with other work. Run it with OPENBLAS_* unset, as a user's
machine has them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

import numpy as np
from numba import njit, prange

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import engine_core.kernels as kernels  # noqa: E402
from engine_core.kernels import attention  # noqa: E402
from engine_core.kernels._numba import to_f32  # noqa: E402

BLOCK_SIZE = 16
SHAPES = {"smollm2": (9, 3, 64), "8b": (32, 8, 128)}  # query heads, KV heads, head_dim


@njit(parallel=True, fastmath=True, cache=True)
def _read_blocks(keys, values, table, lens, sink):
    """sink[b] = the sum of every key and value element of sequence b's blocks (whole blocks)."""
    bs = keys.shape[1]
    for b in prange(table.shape[0]):
        total = np.float32(0.0)
        for j in range((lens[b] + bs - 1) // bs):
            k = keys[table[b, j]].ravel()
            v = values[table[b, j]].ravel()
            for i in range(k.shape[0]):
                total += to_f32(k[i]) + to_f32(v[i])
        sink[b] = total


def read_floor(q, rows, keys, values, table, lens, out):
    """The attention's arguments, its memory traffic only (see the module docstring)."""
    _read_blocks(attention.kernel_view(keys), attention.kernel_view(values), table, lens, out[:, 0])


def load_module(path: str):
    """Another version of attention.py as a module, compiled afresh (numba's disk cache cannot
    find a kernel's module again when the module was loaded from a path)."""
    source = pathlib.Path(path).read_text().replace("cache=True", "cache=False")
    module = types.ModuleType("attention_baseline")
    module.__file__ = path
    sys.modules[module.__name__] = module
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def make_case(shape: str, dtype: str, lengths: list[int], rng):
    heads, kv_heads, head_dim = SHAPES[shape]
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 8
    cache_dtype = attention.KV_CACHE_DTYPES[dtype]
    shape4 = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    keys = attention.to_cache(rng.standard_normal(shape4, dtype=np.float32), cache_dtype)
    values = attention.to_cache(rng.standard_normal(shape4, dtype=np.float32), cache_dtype)
    order = rng.permutation(num_blocks)
    table = np.zeros((len(lengths), max(blocks_per_seq)), dtype=np.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = order[used : used + n]
        used += n
    q = (rng.standard_normal((len(lengths), heads, head_dim), dtype=np.float32) / np.sqrt(head_dim)).astype(np.float32)
    rows = np.arange(len(lengths))
    lens = np.array(lengths, dtype=np.int32)
    out = np.empty((len(lengths), heads * head_dim), dtype=np.float32)
    return q, rows, keys, values, table, lens, out


def time_cold_calls(fns, args, rounds: int = 25):
    """Median us of one call of each function right after 64 MB of other data went through the
    caches, as in the engine, where a layer's keys and values come back after every other
    layer's and the weights."""
    other = np.ones(16 << 20, dtype=np.float32)
    for fn in fns:
        fn(*args)
    per_call = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            other.sum()
            start = time.perf_counter()
            fn(*args)
            per_call[i].append((time.perf_counter() - start) * 1e6)
    return [float(np.median(x)) for x in per_call]


def time_calls(fns, args, repeat_s: float, rounds: int = 40):
    """Us per call of each function: the fastest of `rounds` rounds (each the mean of its calls),
    rounds interleaved, so that other processes' bursts on a shared machine count least."""
    for fn in fns:
        fn(*args)  # compile / warm
    per_call = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            n, start = 0, time.perf_counter()
            while True:
                fn(*args)
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= repeat_s / rounds:
                    break
            per_call[i].append(elapsed / n * 1e6)
    return [float(np.min(x)) for x in per_call]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="path of another attention.py to time in the same run")
    parser.add_argument("--repeat-s", type=float, default=1.5, help="seconds of calls per case and kernel")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shape, float32, one thread only")
    args = parser.parse_args()
    fns = [attention.paged_decode_attention, read_floor]
    if args.baseline:
        fns.append(load_module(args.baseline).paged_decode_attention)
    rng = np.random.default_rng(0)
    # "cold": one sequence whose keys and values are out of cache, as each layer's are in the engine
    cases = {"1x256": [256], "1x256cold": [256], "1x2048": [2048], "64x~256": rng.integers(200, 313, size=64).tolist()}
    results = []
    for threads in (1,) if args.quick else (1, 2):
        kernels.set_num_threads(threads)
        for shape in ("smollm2",) if args.quick else tuple(SHAPES):
            for dtype in ("float32",) if args.quick else ("float32", "bfloat16"):
                for name, lengths in cases.items():
                    case = make_case(shape, dtype, lengths, rng)
                    if args.baseline:  # both versions must agree before their times mean anything
                        outs = []
                        for fn in (fns[0], fns[2]):  # the current kernel and the baseline (not the floor)
                            out = case[-1].copy()
                            fn(*case[:-1], out)
                            outs.append(out)
                        diff = float(np.abs(outs[0] - outs[1]).max())
                        assert diff <= 1e-5, (shape, dtype, name, diff)
                    if name.endswith("cold"):
                        us = time_cold_calls(fns, case)
                    else:
                        us = time_calls(fns, case, args.repeat_s)
                    row = {"threads": threads, "shape": shape, "dtype": dtype, "case": name, "us": round(us[0], 1),
                           "read_floor_us": round(us[1], 1), "over_floor": round(us[0] / us[1], 2)}
                    line = (f"threads {threads}  {shape:8s} {dtype:9s} {name:9s} {us[0]:9.1f} us   read floor "
                            f"{us[1]:8.1f} us ({us[0] / us[1]:4.1f}x)")
                    if args.baseline:
                        row["baseline_us"] = round(us[2], 1)
                        row["speedup"] = round(us[2] / us[0], 2)
                        line += f"   baseline {us[2]:9.1f} us   speedup {us[2] / us[0]:5.2f}x"
                    print(line, flush=True)
                    results.append(row)
    print(json.dumps({"bench": "paged_decode_attention", "block_size": BLOCK_SIZE, "results": results}))


if __name__ == "__main__":
    main()
