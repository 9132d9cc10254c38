"""`--data-parallel-size`: how many engine cores the launcher starts, and which CPUs each gets.

Each engine core is a whole copy of the model with its own KV cache (`--kv-cache-gib` each) and
`--num-threads` threads. Engines share nothing, so two of them on two cores do not synchronise
the way two BLAS threads of one engine do at every matmul (those collapse 20x when another
process wants a core; an engine that loses its core only slows its own requests).

- `auto` (the default): one engine per physical core the launcher may use (its CPU affinity,
  capped by a cgroup CPU quota), divided by `--num-threads`, as many as fit in the memory it may
  use (MemAvailable, capped by a cgroup memory limit minus the cgroup's usage) at weights + KV
  cache + overhead each; at least one. `N`: N engines.
- CPU sets: with N > 1 and at least N x threads CPUs in the launcher's affinity, engine i is
  pinned to its own `threads` CPUs (one logical CPU per physical core first, siblings last), so
  engines never compete for a core. Not pinned: one engine (it may move away from a busy core),
  and any engines under a CPU quota smaller than the CPU set (a container's `--cpus` or a
  Kubernetes CPU limit: the quota is time on any CPU, and every container on the node would
  otherwise pin to the same first CPUs). The frontend is never pinned.
- Every file is read under `root` ("/" but for tests): `proc/self/cgroup` names the process's
  cgroup, whose limits and its ancestors' are read from the unified (v2) hierarchy at
  `sys/fs/cgroup` (or `sys/fs/cgroup/unified` on a hybrid host) and from the v1 `cpu` and
  `memory` hierarchies; the tightest limit along the path binds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

AUTO = "auto"
ENGINE_OVERHEAD_GIB = 0.6  # an engine's RSS beyond weights and KV cache (Python, numpy, numba, buffers)
FRONTEND_GIB = 0.5  # kept free for the frontend process
# a loaded GGUF's weights / its file: 1.12 for an 8B-shaped Q4_K_M (5.13 GiB of 4.58), 1.19 for
# SmolLM2 Q4_1 (112 MB of 94)
GGUF_IN_MEMORY = 1.2
GIB = 1024**3


@dataclass
class DataParallelPlan:
    size: int
    cpu_sets: list[list[int]]  # per engine, in rank order; [] means not pinned
    reason: str  # one line for the start-up log: what was chosen and why


def parse_size(text: str) -> int | str:
    """`auto` or a positive integer; raises ValueError otherwise."""
    if text == AUTO:
        return AUTO
    size = int(text)
    if size < 1:
        raise ValueError(text)
    return size


def plan(requested: int | str, num_threads: int, model: str, kv_cache_gib: float,
         cpus: list[int] | None = None, available_bytes: int | None = None, root: str = "/") -> DataParallelPlan:
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    max_cpus = cgroup_cpu_limit(root)
    if requested == AUTO:
        available = memory_available_bytes(root) if available_bytes is None else available_bytes
        size, why = _auto_size(_num_physical_cores(cpus, root), max_cpus, num_threads,
                               weights_bytes(model), kv_cache_gib, available)
    else:
        size, why = int(requested), f"--data-parallel-size {requested}"
    engines = f"{size} engine core{'s' * (size > 1)} ({why})"
    if size == 1:
        return DataParallelPlan(1, [[]], f"{engines}, not pinned")
    unpinned = [[] for _ in range(size)]
    if size * num_threads > len(cpus):
        return DataParallelPlan(size, unpinned, f"{engines}, not pinned: {size} x {num_threads} threads "
                                                f"> the {len(cpus)} CPUs available")
    if max_cpus is not None and max_cpus < len(cpus):
        return DataParallelPlan(size, unpinned, f"{engines}, not pinned: a cgroup CPU quota of {max_cpus:g}, "
                                                f"not a CPU set, limits this process")
    ordered = _one_per_core_first(cpus, root)
    cpu_sets = [ordered[i * num_threads:(i + 1) * num_threads] for i in range(size)]
    return DataParallelPlan(size, cpu_sets, f"{engines}, pinned to CPUs "
                            + " | ".join(",".join(map(str, s)) for s in cpu_sets))


def _auto_size(num_cores: int, max_cpus: float | None, num_threads: int, weights: int, kv_cache_gib: float,
               available: int) -> tuple[int, str]:
    """One engine per usable core / threads, as many as memory holds; at least one."""
    usable = num_cores if max_cpus is None else min(num_cores, max(1, math.floor(max_cpus)))
    cores = f"{num_cores} physical cores" + ("" if usable == num_cores else
                                             f", {usable} by the cgroup CPU quota of {max_cpus:g}")
    threads = f"{num_threads} thread{'s' * (num_threads > 1)}"
    by_cores = max(1, usable // num_threads)
    per_engine = weights + kv_cache_gib * GIB + ENGINE_OVERHEAD_GIB * GIB
    if not available:  # unknown: cores decide
        return by_cores, f"auto: {cores} / {threads} each = {by_cores}; available memory unknown"
    by_memory = int(max(0, available - FRONTEND_GIB * GIB) // per_engine)
    return max(1, min(by_cores, by_memory)), (
        f"auto: {cores} / {threads} each = {by_cores}; memory fits {by_memory} at "
        f"~{per_engine / GIB:.1f} GiB each (weights {weights / GIB:.1f} + KV cache {kv_cache_gib:g} + "
        f"overhead {ENGINE_OVERHEAD_GIB:g}) in {available / GIB:.1f} GiB available")


def weights_bytes(model: str) -> int:
    """The weights' size in memory. A GGUF stays at its stored precision (block formats, F16) but
    takes a little more than its file (`GGUF_IN_MEMORY`); a directory's safetensors count once
    (16-bit matrices stay 16-bit; only norms and biases, a negligible part, are widened)."""
    if os.path.isfile(model):
        return int(GGUF_IN_MEMORY * os.path.getsize(model))
    return sum(os.path.getsize(os.path.join(model, name)) for name in os.listdir(model)
               if name.endswith(".safetensors"))


def memory_available_bytes(root: str = "/") -> int:
    """What a new process may still allocate: MemAvailable, capped by the cgroup's room; 0 if
    neither is known."""
    known = [n for n in (_mem_available(root), cgroup_memory_room(root)) if n is not None]
    return min(known) if known else 0


def cgroup_cpu_limit(root: str = "/") -> float | None:
    """CPUs' worth of time the process's cgroup quota allows (quota / period, the tightest along
    the path), None without a quota."""
    limits = [q for q in map(_cpu_quota, cgroup_dirs(root, "cpu")) if q is not None]
    return min(limits, default=None)


def cgroup_memory_room(root: str = "/") -> int | None:
    """Bytes left under the process's cgroup memory limits (the tightest along the path), None
    without a limit."""
    rooms = [r for r in map(_memory_room, cgroup_dirs(root, "memory")) if r is not None]
    return min(rooms, default=None)


def _cpu_quota(path: str) -> float | None:
    """One cgroup's quota / period: v2 `cpu.max` ("max 100000" is none), v1 `cpu.cfs_quota_us`
    (-1 is none) / `cpu.cfs_period_us`. A file that does not parse counts as no quota."""
    try:
        v2 = (_read(path, "cpu.max") or "max").split()
        if v2[0] != "max":
            return int(v2[0]) / int(v2[1])
        v1 = int(_read(path, "cpu.cfs_quota_us") or -1)
        return v1 / int(_read(path, "cpu.cfs_period_us") or 100000) if v1 > 0 else None
    except (ValueError, IndexError, ZeroDivisionError):
        return None


def _memory_room(path: str) -> int | None:
    """One cgroup's limit minus its usage, where the usage leaves out the inactive page cache
    (the kernel reclaims it before it kills; the working set, as Kubernetes counts it): v2
    `memory.max` ("max" is none) and `memory.current`, v1 `memory.limit_in_bytes` (an unlimited
    cgroup shows a huge number, which never binds) and `memory.usage_in_bytes`."""
    for limit_name, usage_name, inactive_key in (("memory.max", "memory.current", "inactive_file"),
                                                 ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")):
        limit, usage = _read(path, limit_name), _read(path, usage_name)
        if limit is None or limit == "max" or usage is None:
            continue
        try:
            return max(0, int(limit) - max(0, int(usage) - _stat(path, inactive_key)))
        except ValueError:
            return None
    return None


def cgroup_dirs(root: str, controller: str) -> list[str]:
    """The directories of the process's cgroup and of each ancestor up to the hierarchy's root
    (a parent's limit binds its children), in the unified hierarchy and in `controller`'s v1
    one. A cgroup path that is not under the mount (a container without its own cgroup
    namespace sees its host path) leaves the mount's root, which is then the container's own."""
    text = _read(os.path.join(root, "proc/self"), "cgroup") or ""
    dirs = []
    for line in text.splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers:
            if controller not in controllers.split(","):
                continue
            bases = [os.path.join(root, "sys/fs/cgroup", name) for name in (controller, controllers)]
        else:
            bases = [os.path.join(root, "sys/fs/cgroup", name) for name in ("", "unified")]
            bases = [b for b in bases if os.path.isfile(os.path.join(b, "cgroup.controllers"))]
        base = next((b for b in bases if os.path.isdir(b)), None)
        if base is not None:
            parts = [p for p in path.split("/") if p]
            candidates = (os.path.join(base, *parts[:k]) for k in range(len(parts), -1, -1))
            dirs += [d for d in candidates if os.path.isdir(d)]
    return dirs


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def _stat(directory: str, key: str) -> int:
    """A `memory.stat` entry, 0 when absent."""
    for line in (_read(directory, "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _mem_available(root: str) -> int | None:
    for line in (_read(os.path.join(root, "proc"), "meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _core_of(cpu: int, root: str) -> str:
    siblings = _read(os.path.join(root, f"sys/devices/system/cpu/cpu{cpu}/topology"), "thread_siblings_list")
    return siblings or str(cpu)


def _num_physical_cores(cpus: list[int], root: str) -> int:
    return len({_core_of(cpu, root) for cpu in cpus})


def _one_per_core_first(cpus: list[int], root: str) -> list[int]:
    """Each physical core's first logical CPU, then the second of each, and so on."""
    seen: dict[str, int] = {}
    ranked = []
    for cpu in sorted(cpus):
        core = _core_of(cpu, root)
        ranked.append((seen.get(core, 0), cpu))
        seen[core] = seen.get(core, 0) + 1
    return [cpu for _, cpu in sorted(ranked)]
