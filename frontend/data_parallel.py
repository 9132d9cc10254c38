"""`--data-parallel-size`: how many engine cores the launcher starts, and which CPUs each gets.

Each engine core is a whole copy of the model with its own KV cache (`--kv-cache-gib` each) and
`--num-threads` threads. Engines share nothing, so two of them on two cores do not synchronise
the way two BLAS threads of one engine do at every matmul (those collapse 20x when another
process wants a core; an engine that loses its core only slows its own requests).

- `N`: N engines. `auto`: one engine per physical core the launcher may use (divided by
  `--num-threads`), as many as fit in the available memory (weights + KV cache + overhead
  each); the start-up line says what was chosen and why.
- CPU sets: with N > 1 and at least N x threads CPUs in the launcher's affinity, engine i is
  pinned to its own `threads` CPUs (one logical CPU per physical core first, siblings last), so
  engines never compete for a core. One engine is not pinned (as before: it may move away from a
  busy core). The frontend is never pinned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

AUTO = "auto"
ENGINE_OVERHEAD_GIB = 0.6  # an engine's RSS beyond weights and KV cache (Python, numpy, numba, buffers)
FRONTEND_GIB = 0.5  # kept free for the frontend process
GIB = 1024**3


@dataclass
class DataParallelPlan:
    size: int
    cpu_sets: list[list[int]]  # per engine, in rank order; [] means not pinned
    reason: str  # one line for the start-up log
    is_chosen: bool = True  # False: the default single engine, which needs no start-up line


def parse_size(text: str) -> int | str:
    """`auto` or a positive integer; raises ValueError otherwise."""
    if text == AUTO:
        return AUTO
    size = int(text)
    if size < 1:
        raise ValueError(text)
    return size


def plan(requested: int | str, num_threads: int, model: str, kv_cache_gib: float,
         cpus: list[int] | None = None, available_bytes: int | None = None) -> DataParallelPlan:
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    ordered = _one_per_core_first(cpus)
    num_cores = _num_physical_cores(cpus)
    if requested == AUTO:
        size, why = _auto_size(num_cores, num_threads, model, kv_cache_gib, available_bytes)
    else:
        size, why = int(requested), "--data-parallel-size"
    if size == 1:
        return DataParallelPlan(1, [[]], f"1 engine core ({why}), not pinned", is_chosen=requested == AUTO)
    if size * num_threads > len(cpus):
        return DataParallelPlan(size, [[] for _ in range(size)],
                                f"{size} engine cores ({why}), not pinned: {size} x {num_threads} threads "
                                f"> the {len(cpus)} CPUs available")
    cpu_sets = [ordered[i * num_threads:(i + 1) * num_threads] for i in range(size)]
    return DataParallelPlan(size, cpu_sets, f"{size} engine cores ({why}), pinned to CPUs "
                            + " | ".join(",".join(map(str, s)) for s in cpu_sets))


def _auto_size(num_cores: int, num_threads: int, model: str, kv_cache_gib: float,
               available_bytes: int | None) -> tuple[int, str]:
    by_cores = max(1, num_cores // num_threads)
    available = _available_bytes() if available_bytes is None else available_bytes
    per_engine = weights_bytes(model) + kv_cache_gib * GIB + ENGINE_OVERHEAD_GIB * GIB
    by_memory = max(1, int((available - FRONTEND_GIB * GIB) // per_engine)) if available else by_cores
    size = min(by_cores, by_memory)
    return size, (f"auto: {num_cores} physical cores / {num_threads} threads each = {by_cores}; "
                  f"memory fits {by_memory} at ~{per_engine / GIB:.1f} GiB each "
                  f"of {available / GIB:.1f} GiB available")


def weights_bytes(model: str) -> int:
    """The weights' size in memory, roughly: a GGUF stays at its stored precision; a directory's
    16-bit safetensors are widened to float32 (counted twice)."""
    if os.path.isfile(model):
        return os.path.getsize(model)
    total = 0
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            total += 2 * os.path.getsize(os.path.join(model, name))
    return total


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _core_of(cpu: int) -> str:
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
            return f.read().strip()
    except OSError:
        return str(cpu)


def _num_physical_cores(cpus: list[int]) -> int:
    return len({_core_of(cpu) for cpu in cpus})


def _one_per_core_first(cpus: list[int]) -> list[int]:
    """Each physical core's first logical CPU, then the second of each, and so on."""
    seen: dict[str, int] = {}
    ranked = []
    for cpu in sorted(cpus):
        core = _core_of(cpu)
        ranked.append((seen.get(core, 0), cpu))
        seen[core] = seen.get(core, 0) + 1
    return [cpu for _, cpu in sorted(ranked)]
