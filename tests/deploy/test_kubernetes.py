"""deploy/kubernetes/: the built-in kinds validate against Kubernetes' own OpenAPI schemas
(kubernetes-validate, bundled offline, strict: an unknown field is an error); the custom
resources (ServiceMonitor, KEDA ScaledObject) and the Kustomization have no schema there, so
their required fields are checked here. Then the manifests must agree with each other and with
the server: its flags parse, selectors match, probes hit /health, the grace period covers the
drain, the CPU and memory limits hold the engines `--data-parallel-size auto` starts in the pod,
and the API key comes from a Secret."""

from __future__ import annotations

import pathlib
import re

import kubernetes_validate
import pytest
import yaml

from frontend.cli import ENGINE_STOP_TIMEOUT_S, FRONTEND_STOP_MARGIN_S, build_parser
from frontend.data_parallel import plan

KUBE_DIR = pathlib.Path(__file__).parents[2] / "deploy" / "kubernetes"
HELM_VALUES = "prometheus-adapter/values.yaml"  # values for a chart, not a manifest
BUILTIN_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
# the oldest release still widely run, and the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ["1.30", str(kubernetes_validate.utils.latest_version())]
WAITING_GAUGE = "furiosa_llm:num_requests_waiting"
GIB = 2 ** 30
MIB = 2 ** 20
LAUNCHER_BYTES = 100 * MIB  # the launcher's own use of the pod's memory when it plans
# measured with the default model (SmolLM2 Q4_1), auto's two engines at --kv-cache-gib 2, after 8
# requests: each engine 2368 MiB RSS (320 beyond its cache), the frontend 107, the launcher 23
MEASURED_ENGINE_BYTES = 320 * MIB
MEASURED_FRONTEND_BYTES = (107 + 23) * MIB


def load_manifests() -> dict[str, dict]:
    manifests = {}
    for path in sorted(KUBE_DIR.rglob("*.yaml")):
        name = path.relative_to(KUBE_DIR).as_posix()
        if name != HELM_VALUES:
            [manifests[name]] = list(yaml.safe_load_all(path.read_text()))  # one object a file
    return manifests


MANIFESTS = load_manifests()


def by_kind(kind: str) -> dict:
    [manifest] = [m for m in MANIFESTS.values() if m["kind"] == kind]
    return manifest


def container() -> dict:
    [main] = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def server_args():
    args = container()["args"]
    assert args[0] == "serve"
    return build_parser().parse_args(args)


def quantity_bytes(quantity: str) -> float:
    number, suffix = re.fullmatch(r"([0-9.]+)([KMGT]i)?", quantity).groups()
    return float(number) * 1024 ** ("_KMGT".index(suffix[0]) if suffix else 0)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", [n for n, m in MANIFESTS.items() if m["kind"] in BUILTIN_KINDS])
def test_builtin_manifests_validate_against_the_kubernetes_schemas(name, version):
    kubernetes_validate.validate(MANIFESTS[name], version, strict=True)


def test_a_misspelled_field_fails_validation():
    broken = {**by_kind("Service"), "spec": {**by_kind("Service")["spec"], "selecter": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_kind_is_there_once_and_kustomize_applies_all_but_the_keda_alternative():
    kinds = sorted(m["kind"] for m in MANIFESTS.values())
    assert kinds == sorted([*BUILTIN_KINDS, "ServiceMonitor", "ScaledObject", "Kustomization"])
    kustomization = by_kind("Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    applied = set(kustomization["resources"])
    assert applied == {n for n, m in MANIFESTS.items() if m["kind"] not in ("Kustomization", "ScaledObject")}
    # never two autoscalers on one Deployment
    assert not any(MANIFESTS[n]["kind"] == "ScaledObject" for n in applied)


def test_custom_resources_have_their_required_fields():
    monitor = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    assert monitor["spec"]["selector"]["matchLabels"] and monitor["spec"]["endpoints"]
    assert all(endpoint["port"] and endpoint["path"] == "/metrics" for endpoint in monitor["spec"]["endpoints"])
    scaled = by_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"]["name"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert {"serverAddress", "query", "threshold"} <= trigger["metadata"].keys()
    float(trigger["metadata"]["threshold"])  # KEDA wants a number in a string


def test_the_container_serves_the_model_volume_with_flags_the_server_accepts():
    args = server_args()
    assert args.model == "/model" and args.host == "0.0.0.0"
    assert [p["containerPort"] for p in container()["ports"]] == [args.port]
    [mount] = [m for m in container()["volumeMounts"] if m["mountPath"] == "/model"]
    assert mount["readOnly"] is True
    [volume] = [v for v in by_kind("Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"]
    # the image's user (Dockerfile: useradd --uid 10001)
    assert by_kind("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_the_api_key_comes_from_a_secret_and_no_secret_is_committed():
    [key] = [e for e in container()["env"] if e["name"] == "FURIOSA_LLM_API_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]
    assert "--api-key" not in container()["args"]
    assert not any(m["kind"] == "Secret" for m in MANIFESTS.values())


def test_probes_ask_health_and_the_grace_period_covers_the_drain():
    main = container()
    port_name = main["ports"][0]["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"] == {"path": "/health", "port": port_name}, probe
    # loading may take minutes: liveness starts only after the startup probe saw 200
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    [command, seconds] = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command == "sleep"
    worst_stop_s = int(seconds) + server_args().shutdown_timeout + FRONTEND_STOP_MARGIN_S + ENGINE_STOP_TIMEOUT_S
    assert by_kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= worst_stop_s


def pod_cgroup(root: pathlib.Path, resources: dict, node_memory_gib: int = 256) -> str:
    """The container's view of a pod with these limits (cgroup v2 with its own namespace, as on
    current nodes), on a node with far more memory, the launcher alone using its cgroup."""
    files = {"proc/self/cgroup": "0::/\n",
             "proc/meminfo": f"MemAvailable: {node_memory_gib * GIB // 1024} kB\n",
             "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
             "sys/fs/cgroup/cpu.max": f"{round(float(resources['cpu']) * 100000)} 100000\n",
             "sys/fs/cgroup/memory.max": f"{int(quantity_bytes(resources['memory']))}\n",
             "sys/fs/cgroup/memory.current": f"{LAUNCHER_BYTES}\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return str(root)


def test_requests_equal_limits_so_the_pod_gets_exactly_what_it_uses():
    resources = container()["resources"]
    # the KV caches are touched at start-up, so the need is known: reserve it all, allow no more;
    # the CPU limit is what --data-parallel-size auto reads as the pod's share of the node
    assert resources["requests"] == resources["limits"]
    assert float(resources["limits"]["cpu"]) >= 1


def test_auto_starts_one_engine_per_cpu_of_the_limit_and_they_fit_its_memory(tmp_path, default_model):
    args = server_args()
    assert args.data_parallel_size == "auto"
    limits = container()["resources"]["limits"]
    num_cpus = int(float(limits["cpu"]))
    node_cpus = list(range(32))  # the node's CPUs: without exclusive CPUs the pod may run on any
    chosen = plan(args.data_parallel_size, args.num_threads or 1, default_model, args.kv_cache_gib,
                  cpus=node_cpus, root=pod_cgroup(tmp_path, limits))
    assert chosen.size == num_cpus, chosen.reason  # memory is not what caps the count
    assert chosen.cpu_sets == [[]] * num_cpus  # a quota, not a CPU set: never pinned to the node's first CPUs
    # the kubelet's static CPU manager gives a Guaranteed pod CPUs of its own: one each
    exclusive = plan(args.data_parallel_size, 1, default_model, args.kv_cache_gib,
                     cpus=node_cpus[6:6 + num_cpus], root=pod_cgroup(tmp_path, limits))
    assert exclusive.cpu_sets == [[cpu] for cpu in node_cpus[6:6 + num_cpus]]
    # what the engines and the frontend were measured to use fits the limit too
    memory = quantity_bytes(limits["memory"])
    assert memory >= num_cpus * (args.kv_cache_gib * GIB + MEASURED_ENGINE_BYTES) + MEASURED_FRONTEND_BYTES


def test_a_pod_with_less_memory_gets_fewer_engines(tmp_path, default_model):
    args = server_args()
    limits = {**container()["resources"]["limits"], "memory": f"{args.kv_cache_gib + 1.5}Gi"}
    chosen = plan(args.data_parallel_size, 1, default_model, args.kv_cache_gib, cpus=list(range(32)),
                  root=pod_cgroup(tmp_path, limits))
    assert chosen.size == 1 and "memory fits 1" in chosen.reason


def test_selectors_and_ports_agree():
    deployment, service = by_kind("Deployment"), by_kind("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    monitor = by_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    target = by_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert by_kind("ScaledObject")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # a disruption may take one replica, and the autoscalers never go below two
    assert by_kind("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert by_kind("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    assert by_kind("ScaledObject")["spec"]["minReplicaCount"] >= 2


def test_both_autoscalers_read_the_servers_waiting_gauge():
    [rule] = yaml.safe_load((KUBE_DIR / HELM_VALUES).read_text())["rules"]["custom"]
    series = re.match(r"[\w:]+", rule["seriesQuery"]).group()
    assert series == WAITING_GAUGE
    # the adapter's rename (Go's ${1}) gives the name the HPA asks for
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${", r"\g<").replace("}", ">"), series)
    [metric] = by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == renamed
    [trigger] = by_kind("ScaledObject")["spec"]["triggers"]
    assert re.search(rf"\b{re.escape(WAITING_GAUGE)}\{{", trigger["metadata"]["query"])
