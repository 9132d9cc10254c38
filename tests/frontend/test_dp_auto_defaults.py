"""`--data-parallel-size auto`, the default: the engine count from the cores and memory this
process may use, container limits included. Each test writes a fake machine (`proc/self/cgroup`,
`proc/meminfo`, cgroup v2 or v1 files) under tmp_path and points the planner's `root` at it."""

from __future__ import annotations

import pathlib

import pytest

from frontend.cli import DEFAULTS, build_parser, config_from_args
from frontend.data_parallel import (
    ENGINE_OVERHEAD_GIB,
    FRONTEND_GIB,
    GIB,
    cgroup_cpu_limit,
    cgroup_memory_room,
    memory_available_bytes,
    plan,
    weights_bytes,
)

MIB = 1024**2
V2_ONLY = "0::/\n"  # a container with its own cgroup namespace on a unified-hierarchy host
DEFAULTS_ARGS = build_parser().parse_args(["serve"])


def write(root: pathlib.Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return str(root)


def meminfo(available_gib: float) -> str:
    return f"MemTotal: 25165824 kB\nMemAvailable: {int(available_gib * GIB) // 1024} kB\n"


def v2_machine(root: pathlib.Path, *, cpu_max: str = "max 100000", memory_max: str = "max",
               current: int = 0, available_gib: float = 22.0, memory_stat: str = "") -> str:
    return write(root, {"proc/self/cgroup": V2_ONLY, "proc/meminfo": meminfo(available_gib),
                        "sys/fs/cgroup/cgroup.controllers": "cpu memory\n", "sys/fs/cgroup/cpu.max": cpu_max,
                        "sys/fs/cgroup/memory.max": memory_max, "sys/fs/cgroup/memory.current": str(current),
                        "sys/fs/cgroup/memory.stat": memory_stat})


@pytest.fixture
def model(tmp_path) -> str:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"x" * (100 * MIB))
    return str(path)


def per_engine_bytes(model: str, kv_cache_gib: float) -> float:
    return weights_bytes(model) + (kv_cache_gib + ENGINE_OVERHEAD_GIB) * GIB


# --- CPU quota -------------------------------------------------------------------------------


def test_a_v2_quota_of_one_and_a_half_cpus_is_one_cpu_and_one_engine(tmp_path, model):
    root = v2_machine(tmp_path, cpu_max="150000 100000\n")
    assert cgroup_cpu_limit(root) == 1.5
    chosen = plan("auto", 1, model, 1.0, cpus=[0, 1, 2, 3], root=root)
    assert chosen.size == 1
    assert "4 physical cores, 1 by the cgroup CPU quota of 1.5" in chosen.reason


def test_a_v2_quota_of_max_caps_nothing(tmp_path, model):
    root = v2_machine(tmp_path, cpu_max="max 100000\n")
    assert cgroup_cpu_limit(root) is None
    chosen = plan("auto", 1, model, 1.0, cpus=[0, 1, 2, 3], root=root)
    assert chosen.size == 4 and chosen.cpu_sets == [[0], [1], [2], [3]]


def test_a_quota_of_two_and_a_half_cpus_gives_two_single_thread_engines_or_one_of_two_threads(tmp_path, model):
    root = v2_machine(tmp_path, cpu_max="250000 100000")
    assert plan("auto", 1, model, 1.0, cpus=list(range(8)), root=root).size == 2
    assert plan("auto", 2, model, 1.0, cpus=list(range(8)), root=root).size == 1


def test_engines_under_a_quota_smaller_than_the_cpu_set_are_not_pinned(tmp_path, model):
    """A Kubernetes CPU limit is time on any of the node's CPUs: pinning every pod's engines to
    the node's first CPUs would pile them on the same cores."""
    root = v2_machine(tmp_path, cpu_max="200000 100000")
    chosen = plan("auto", 1, model, 1.0, cpus=list(range(16)), root=root)
    assert chosen.size == 2 and chosen.cpu_sets == [[], []]
    assert "not pinned: a cgroup CPU quota of 2" in chosen.reason
    assert plan(2, 1, model, 1.0, cpus=list(range(16)), root=root).cpu_sets == [[], []]
    # a quota as large as the CPU set (docker --cpus 2 --cpuset-cpus 4,5) keeps the pinning
    assert plan(2, 1, model, 1.0, cpus=[4, 5], root=root).cpu_sets == [[4], [5]]


def test_the_tightest_quota_along_the_cgroup_path_binds(tmp_path, model):
    root = write(tmp_path, {"proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
                            "sys/fs/cgroup/cgroup.controllers": "cpu\n",
                            "sys/fs/cgroup/kubepods/pod1/cpu.max": "100000 100000",
                            "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root) == 1.0


# --- memory limit ----------------------------------------------------------------------------


def test_a_memory_max_smaller_than_two_engines_gives_one(tmp_path, model):
    per_engine = per_engine_bytes(model, 1.0)
    limit = int(FRONTEND_GIB * GIB + 1.5 * per_engine)  # room for one engine and a half
    roomy = plan("auto", 1, model, 1.0, cpus=[0, 1], root=v2_machine(tmp_path / "a"))
    assert roomy.size == 2
    root = v2_machine(tmp_path / "b", memory_max=str(limit))
    assert memory_available_bytes(root) == limit  # below the 22 GiB MemAvailable
    tight = plan("auto", 1, model, 1.0, cpus=[0, 1], root=root)
    assert tight.size == 1 and "memory fits 1 at" in tight.reason


def test_the_room_is_the_limit_minus_the_usage_but_not_the_inactive_page_cache(tmp_path):
    root = v2_machine(tmp_path, memory_max=str(8 * GIB), current=3 * GIB,
                      memory_stat=f"anon {GIB}\nfile {2 * GIB}\nactive_file {GIB}\ninactive_file {GIB}\n")
    assert cgroup_memory_room(root) == 8 * GIB - (3 * GIB - GIB)
    assert memory_available_bytes(root) == 6 * GIB


def test_mem_available_binds_when_it_is_below_the_cgroup_room(tmp_path):
    root = v2_machine(tmp_path, memory_max=str(64 * GIB), available_gib=5.0)
    assert memory_available_bytes(root) == 5 * GIB


def test_memory_max_of_max_is_no_limit(tmp_path):
    root = v2_machine(tmp_path, memory_max="max\n")
    assert cgroup_memory_room(root) is None
    assert memory_available_bytes(root) == 22 * GIB


def test_one_engine_when_even_one_does_not_fit(tmp_path, model):
    root = v2_machine(tmp_path, memory_max=str(GIB))
    chosen = plan("auto", 1, model, 4.0, cpus=[0, 1], root=root)
    assert chosen.size == 1 and "memory fits 0" in chosen.reason


def test_the_kv_cache_is_counted_once_per_engine(tmp_path, model):
    """--kv-cache-gib is each engine's: a larger cache leaves room for fewer engines."""
    root = v2_machine(tmp_path, available_gib=12.0)
    assert plan("auto", 1, model, 1.0, cpus=list(range(8)), root=root).size == 6  # (12 - 0.5) // 1.7
    assert plan("auto", 1, model, 4.0, cpus=list(range(8)), root=root).size == 2  # (12 - 0.5) // 4.7


def test_a_two_core_24_gib_machine_with_the_default_model_and_flags_gets_two_engines(tmp_path, default_model):
    root = write(tmp_path, {"proc/self/cgroup": V2_ONLY, "proc/meminfo": meminfo(22.5)})
    chosen = plan(DEFAULTS_ARGS.data_parallel_size, 1, default_model, DEFAULTS["kv_cache_gib"], cpus=[0, 1], root=root)
    assert chosen.size == 2 and chosen.cpu_sets == [[0], [1]]


# --- cgroup v1 and hybrid hosts --------------------------------------------------------------


def v1_machine(root: pathlib.Path, *, quota_us: int, limit: int, usage: int = 0, inactive: int = 0,
               path: str = "/docker/abc") -> str:
    own = f"sys/fs/cgroup/memory{path}"
    return write(root, {
        "proc/self/cgroup": f"12:memory:{path}\n4:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n",
        "proc/meminfo": meminfo(30.0),
        f"sys/fs/cgroup/cpu,cpuacct{path}/cpu.cfs_quota_us": f"{quota_us}\n",
        f"sys/fs/cgroup/cpu,cpuacct{path}/cpu.cfs_period_us": "100000\n",
        f"{own}/memory.limit_in_bytes": f"{limit}\n",
        f"{own}/memory.usage_in_bytes": f"{usage}\n",
        f"{own}/memory.stat": f"cache 0\ninactive_file 1\ntotal_inactive_file {inactive}\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",  # the host root: no limit
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{20 * GIB}\n",
    })


def test_cgroup_v1_quota_and_memory_limit(tmp_path, model):
    root = v1_machine(tmp_path, quota_us=100000, limit=6 * GIB, usage=2 * GIB, inactive=GIB)
    assert cgroup_cpu_limit(root) == 1.0
    assert cgroup_memory_room(root) == 6 * GIB - GIB
    assert plan("auto", 1, model, 1.0, cpus=[0, 1, 2, 3], root=root).size == 1


def test_cgroup_v1_without_a_quota_or_a_limit_caps_nothing(tmp_path, model):
    root = v1_machine(tmp_path, quota_us=-1, limit=9223372036854771712)
    assert cgroup_cpu_limit(root) is None
    assert memory_available_bytes(root) == 30 * GIB  # MemAvailable
    assert plan("auto", 1, model, 1.0, cpus=[0, 1, 2, 3], root=root).size == 4


def test_a_container_without_its_own_cgroup_namespace_reads_its_mount_root(tmp_path):
    """/proc/self/cgroup names the host's path, but the container's mount holds only its own
    cgroup, at the mount's root."""
    root = write(tmp_path, {"proc/self/cgroup": "0::/system.slice/docker-abc.scope\n",
                            "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
                            "sys/fs/cgroup/cpu.max": "50000 100000\n",
                            "sys/fs/cgroup/memory.max": f"{2 * GIB}\n",
                            "sys/fs/cgroup/memory.current": f"{GIB}\n"})
    assert cgroup_cpu_limit(root) == 0.5
    assert cgroup_memory_room(root) == GIB


def test_a_hybrid_host_reads_v1_controllers_beside_an_empty_unified_hierarchy(tmp_path):
    root = write(tmp_path, {"proc/self/cgroup": "4:memory:/job\n1:cpu:/\n0::/\n",
                            "sys/fs/cgroup/unified/cgroup.controllers": "\n",
                            "sys/fs/cgroup/memory/job/memory.limit_in_bytes": f"{3 * GIB}\n",
                            "sys/fs/cgroup/memory/job/memory.usage_in_bytes": "0\n",
                            "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_memory_room(root) == 3 * GIB
    assert cgroup_cpu_limit(root) is None


def test_files_that_do_not_parse_cap_nothing_and_never_stop_the_start(tmp_path, model):
    root = v2_machine(tmp_path, cpu_max="garbage\n", memory_max="12x")
    (tmp_path / "proc/self/cgroup").write_text("not a cgroup line\n0::/\n")
    assert cgroup_cpu_limit(root) is None and cgroup_memory_room(root) is None
    assert plan("auto", 1, model, 1.0, cpus=[0, 1], root=root).size == 2


def test_no_cgroup_files_and_no_meminfo_leave_the_cores_to_decide(tmp_path, model):
    chosen = plan("auto", 1, model, 1.0, cpus=[0, 1, 2], root=str(tmp_path))
    assert chosen.size == 3 and "available memory unknown" in chosen.reason


# --- what the plan says, and the weights it counts -------------------------------------------


def test_every_plan_says_what_was_chosen_and_why(tmp_path, model):
    root = v2_machine(tmp_path)
    assert plan(1, 1, model, 1.0, cpus=[0, 1], root=root).reason == \
        "1 engine core (--data-parallel-size 1), not pinned"
    one = plan("auto", 2, model, 1.0, cpus=[0, 1], root=root)
    assert one.size == 1
    assert one.reason.startswith("1 engine core (auto: 2 physical cores / 2 threads each = 1; memory fits 12 at ")
    two = plan("auto", 1, model, 1.0, cpus=[0, 1], root=root)
    assert two.reason.startswith("2 engine cores (auto: 2 physical cores / 1 thread each = 2; memory fits 12 at ")
    assert two.reason.endswith("in 22.0 GiB available), pinned to CPUs 0 | 1")


def test_sibling_hyperthreads_are_one_core(tmp_path, model):
    files = {f"sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list": f"{cpu // 2 * 2}-{cpu // 2 * 2 + 1}"
             for cpu in range(4)}  # CPUs 0 and 1 share a core, and 2 and 3
    root = write(tmp_path, {"proc/self/cgroup": V2_ONLY, "proc/meminfo": meminfo(22.0), **files})
    chosen = plan("auto", 1, model, 1.0, cpus=[0, 1, 2, 3], root=root)
    assert chosen.size == 2 and chosen.cpu_sets == [[0], [2]]


def test_a_gguf_counts_a_little_more_than_its_file(model):
    assert weights_bytes(model) == int(1.2 * 100 * MIB)


def test_safetensors_count_once_and_other_files_not_at_all(tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "model-00001-of-00002.safetensors").write_bytes(b"x" * 3000)
    (model / "model-00002-of-00002.safetensors").write_bytes(b"x" * 1000)
    (model / "tokenizer.json").write_bytes(b"x" * 5000)
    assert weights_bytes(str(model)) == 4000


def test_serve_without_the_flag_plans_auto_and_one_goes_back_to_a_single_engine(default_model):
    assert DEFAULTS_ARGS.data_parallel_size == "auto"
    auto = config_from_args(build_parser().parse_args(["serve"]))
    assert auto.engine.data_parallel_size == plan("auto", 1, default_model, DEFAULTS["kv_cache_gib"]).size
    single = config_from_args(build_parser().parse_args(["serve", "--data-parallel-size", "1"]))
    assert single.engine.data_parallel_size == 1
