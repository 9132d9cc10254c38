"""Per-step cost of grammar masks: batch 32 decode steps of the default model, with none of the
requests constrained and with half of them constrained to a JSON schema.

    python scripts/bench_structured.py [--batch 32] [--steps 24] [--threads 1]

Both runs decode the same prompts greedily; only the decode steps are timed (prefill is done
first), and each run is repeated so a busy machine shows as spread rather than as a result.
Prints a table and one JSON line. The target: constrained steps under 10% slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from threadpoolctl import threadpool_limits

from engine_core.core import EngineCore
from engine_core.loader import load_artifact
from engine_core.structured_output import apply_grammar_masks
from frontend.default_model import default_model_path
from ipc.config import EngineConfig
from ipc.messages import EngineCoreRequest, SamplingParams, StructuredOutputKind, StructuredOutputSpec

# A long JSON output: at least 64 strings, so no constrained request ends while it is timed.
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 64}
SPEC = StructuredOutputSpec(StructuredOutputKind.JSON_SCHEMA, json.dumps(SCHEMA))
PROMPT_WORDS = "List the names of rivers, cities and mountains you know as a JSON array".split()


def make_core(model: str, weights) -> EngineCore:
    config = EngineConfig(model=model, served_model_name="bench", kv_cache_gib=0.5, max_num_seqs=64)
    return EngineCore(config, *weights)


def run(core: EngineCore, batch: int, num_constrained: int, steps: int, max_tokens: int) -> dict:
    """Median decode-step time with `num_constrained` of `batch` requests constrained."""
    for k in range(batch):
        prompt = [1, *range(300 + k, 300 + k + len(PROMPT_WORDS)), 2]  # distinct prompts, same length
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                structured_output=SPEC if k < num_constrained else None)
        core.add_request(EngineCoreRequest(f"r{k}", prompt, params, [2], time.time()))
    core.step()  # the whole batch's prefill (and first tokens)
    mask_times: list[float] = []
    step_times: list[float] = []

    def timed_masks(logits, seqs, _apply=apply_grammar_masks):
        start = time.perf_counter()
        _apply(logits, seqs)
        mask_times.append(time.perf_counter() - start)

    import engine_core.sampler as sampler_module

    sampler_module.apply_grammar_masks = timed_masks
    try:
        for _ in range(steps):
            start = time.perf_counter()
            outputs = core.step()
            step_times.append(time.perf_counter() - start)
            assert all(o.finish_reason is None for o in outputs), "a request ended while timed"
    finally:
        sampler_module.apply_grammar_masks = apply_grammar_masks
    core.abort_requests([f"r{k}" for k in range(batch)])
    core.step()
    return {"step_ms": statistics.median(step_times) * 1e3, "mask_ms": statistics.median(mask_times) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads, as the engine process uses")
    args = parser.parse_args()
    model = default_model_path()
    weights = load_artifact(model)
    core = make_core(model, weights)
    core.structured_output.matcher_for(SPEC)  # the vocabulary is read once, on first use
    half = args.batch // 2
    results: dict[int, list[dict]] = {0: [], half: []}
    with threadpool_limits(args.threads):
        for _ in range(args.repeats):
            for num_constrained in (0, half):  # interleaved, so drift hits both alike
                results[num_constrained].append(run(core, args.batch, num_constrained, args.steps, args.steps + 4))
    base = statistics.median(r["step_ms"] for r in results[0])
    constrained = statistics.median(r["step_ms"] for r in results[half])
    mask = statistics.median(r["mask_ms"] for r in results[half])
    overhead = (constrained - base) / base * 100
    print(f"{'constrained':>12} {'step ms (median)':>17} {'runs':>24} {'mask ms':>8}")
    for n, runs in results.items():
        spread = " ".join(f"{r['step_ms']:.1f}" for r in runs)
        print(f"{n:>5} of {args.batch:<3} {statistics.median(r['step_ms'] for r in runs):>17.2f} "
              f"{spread:>24} {statistics.median(r['mask_ms'] for r in runs):>8.3f}")
    print(f"overhead: {overhead:+.1f}% per step (mask alone {mask / base * 100:.1f}% of a step); target < 10%")
    print(json.dumps({
        "benchmark": "structured_output_mask", "batch": args.batch, "num_constrained": half,
        "step_ms_unconstrained": round(base, 3), "step_ms_constrained": round(constrained, 3),
        "mask_ms": round(mask, 3), "overhead_pct": round(overhead, 2), "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
