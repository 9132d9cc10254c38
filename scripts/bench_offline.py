"""Offline throughput: `LLM.generate` against the engine alone, at batch 64.

The engine alone is `EngineCore` stepped in this process (no sockets, no text); the API is
`furiosa_llm.LLM.generate` with the same token-id prompts, greedy, ignore_eos, prefix caching
off in both, the same BLAS thread count: its engine runs in a child process and this process
detokenizes, checks stop strings and assembles `RequestOutput`s. The difference is the API's
overhead (the target is under 5%). Each side runs once to warm up, then --repeats times; the
best run counts. Prints a table and one JSON line.

    python scripts/bench_offline.py [--model PATH] [--batch 64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import time

from threadpoolctl import threadpool_limits

from engine_core.process import DEFAULT_NUM_THREADS, load_engine_core
from frontend.default_model import default_model_path
from furiosa_llm import LLM, SamplingParams
from ipc.config import EngineConfig
from ipc.messages import EngineCoreRequest
from ipc.messages import SamplingParams as EngineSamplingParams


def prompts(batch: int) -> list[list[int]]:
    # ~32-token prompts, all different (no shared prefix to cache)
    return [[(17 * i + 5 * k) % 4000 + 100 for k in range(32)] for i in range(batch)]


def engine_alone(args, config: EngineConfig) -> float:
    threadpool_limits(config.num_threads or DEFAULT_NUM_THREADS)  # as the engine process does
    core = load_engine_core(config)

    def run(tag: str) -> float:
        start = time.perf_counter()
        params = EngineSamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(prompts(args.batch)):
            core.add_request(EngineCoreRequest(f"{tag}-{i}", prompt, params, [], time.time()))
        num_tokens = 0
        while core.has_unfinished_requests:
            num_tokens += sum(len(o.new_token_ids) for o in core.step())
        return num_tokens / (time.perf_counter() - start)

    run("warmup")
    return max(run(f"run{r}") for r in range(args.repeats))


def through_api(args, config: EngineConfig) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    settings = {k: getattr(config, k) for k in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_gib",
                                                 "enable_prefix_caching", "num_threads")}
    with LLM(args.model, **settings) as llm:
        def run() -> float:
            start = time.perf_counter()
            outputs = llm.generate(prompts(args.batch), params, use_tqdm=False)
            num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
            return num_tokens / (time.perf_counter() - start)

        run()
        return max(run() for _ in range(args.repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    args = parser.parse_args()
    args.model = args.model or default_model_path()
    config = EngineConfig(model=args.model, served_model_name="bench", max_num_seqs=max(args.batch, 1),
                          max_num_batched_tokens=max(2048, args.batch), kv_cache_gib=args.kv_cache_gib,
                          enable_prefix_caching=False, num_threads=args.num_threads)
    api = through_api(args, config)  # first, while this process has no model loaded
    alone = engine_alone(args, config)
    overhead = 1 - api / alone
    print(f"batch {args.batch}, {args.max_tokens} tokens each (output tok/s, best of {args.repeats})")
    print(f"  engine alone     {alone:8.1f}")
    print(f"  LLM.generate     {api:8.1f}   overhead {100 * overhead:.1f}%")
    print(json.dumps({"batch": args.batch, "max_tokens": args.max_tokens, "engine_tok_s": round(alone, 1),
                      "api_tok_s": round(api, 1), "api_overhead": round(overhead, 4)}))


if __name__ == "__main__":
    main()
