"""k8s/, checked offline: the KubeRay manifests, the image recipe and the Grafana dashboard.

The RayCluster and RayJob validate against the KubeRay schema kept in k8s/schema (closed,
so a misspelt field fails), every pod template against the Kubernetes schema bundled by
kubernetes-validate (strict), the job's entrypoint against the job's own parser and
config, and every dashboard query against the metrics mapo-ray exports.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mapo_ray.config import PRESETS, load_config
from mapo_ray.job import job_parser
from mapo_ray.telemetry.catalog import RAY_METRICS, RayMetricSpec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The newest Kubernetes schema kubernetes-validate bundles.
KUBERNETES_VERSION = "1.37"
SHM = "/dev/shm"
GPU = "nvidia.com/gpu"


def load(name: str) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]
    assert len(docs) == 1, f"k8s/{name}: expected one document, found {len(docs)}"
    return docs[0]


CLUSTER = load("raycluster.yaml")
JOB = load("rayjob.yaml")
PVC = load("pvc.yaml")
DASHBOARD = json.loads((K8S / "grafana-dashboard.json").read_text())
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(name: str) -> dict[str, str]:
    lines = (ROOT / "constraints" / name).read_text().splitlines()
    return dict(line.split("==") for line in (ln.split("#")[0].strip() for ln in lines) if line)


# ---------------------------------------------------------------------------------------
# Schemas


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((K8S / "schema" / "kuberay-v1.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def kubernetes_errors(resource: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    """A pod template as the core/v1 PodTemplate object the Kubernetes schema knows."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def groups(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``head`` and each worker group of a RayCluster spec, by name."""
    out = {"head": cluster_spec["headGroupSpec"]}
    out.update({g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]})
    return out


def pod_templates() -> dict[str, dict[str, Any]]:
    out = {f"raycluster {name}": g["template"] for name, g in groups(CLUSTER["spec"]).items()}
    out.update({f"rayjob {name}": g["template"] for name, g in groups(JOB["spec"]["rayClusterSpec"]).items()})
    out["rayjob submitter"] = JOB["spec"]["submitterPodTemplate"]
    return out


def test_every_manifest_parses_and_names_its_kind():
    manifests = sorted(K8S.glob("*.yaml"))
    assert {p.name for p in manifests} >= {"raycluster.yaml", "rayjob.yaml", "pvc.yaml", "podmonitor.yaml"}
    for path in manifests:
        doc = load(path.name)
        assert {"apiVersion", "kind", "metadata", "spec"} <= doc.keys(), path.name
        assert doc["metadata"]["name"], path.name


@pytest.mark.parametrize("doc", [CLUSTER, JOB], ids=["raycluster", "rayjob"])
def test_ray_manifests_validate_against_the_kuberay_schema(doc):
    assert kuberay_errors(doc) == []


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[leaf] = value
    return doc


def _rename(doc: dict[str, Any], path: str, new_name: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[new_name] = node.pop(leaf)
    return doc


@pytest.mark.parametrize(
    ("mutated", "where"),
    [
        (_rename(CLUSTER, "spec.workerGroupSpecs.0.replicas", "replcas"), "'replcas' was unexpected"),
        (
            _set(CLUSTER, "spec.headGroupSpec.rayStartParams.metrics-export-port", 8080),
            "metrics-export-port: 8080 is not of type 'string'",
        ),
        (_set(CLUSTER, "spec.workerGroupSpecs.1.minReplicas", -1), "minReplicas: -1 is less than the minimum"),
        (_set(CLUSTER, "apiVersion", "ray.io/v1alpha1"), "apiVersion"),
        (
            _rename(JOB, "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinished"),
            "'shutdownAfterJobFinished' was unexpected",
        ),
        (_set(JOB, "spec.shutdownAfterJobFinishes", "yes"), "'yes' is not of type 'boolean'"),
        (_set(JOB, "spec.shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes: True was expected"),
        (_set(JOB, "spec.submissionMode", "K8sJob"), "submissionMode: 'K8sJob' is not one of"),
        (_set(JOB, "spec.rayClusterSpec.rayVersion", "latest"), "rayVersion: 'latest' does not match"),
    ],
    ids=[
        "misspelt-replicas",
        "unquoted-port",
        "negative-replicas",
        "old-api-version",
        "misspelt-shutdown",
        "string-for-bool",
        "ttl-without-shutdown",
        "unknown-submission-mode",
        "rayversion-not-a-release",
    ],
)
def test_the_kuberay_schema_rejects_typos_and_wrong_types(mutated, where):
    errors = kuberay_errors(mutated)
    assert errors, "the mutated manifest validated"
    assert any(where in error for error in errors), errors


@pytest.mark.parametrize("name", sorted(pod_templates()))
def test_pod_templates_validate_against_the_kubernetes_schema(name):
    assert kubernetes_errors(as_pod_template(pod_templates()[name])) == []


def test_the_persistent_volume_claim_validates_against_the_kubernetes_schema():
    assert kubernetes_errors(PVC) == []
    assert PVC["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes mount it"


def test_the_kubernetes_schema_rejects_a_broken_pod_template():
    head = CLUSTER["spec"]["headGroupSpec"]["template"]
    typo = _rename(head, "spec.containers.0.volumeMounts", "volumeMount")
    assert any("volumeMount" in e for e in kubernetes_errors(as_pod_template(typo)))
    wrong_type = _set(head, "spec.containers.0.ports.0.containerPort", "6379")
    assert any("is not of type 'integer'" in e for e in kubernetes_errors(as_pod_template(wrong_type)))


# ---------------------------------------------------------------------------------------
# The cluster's shape


def test_the_job_cluster_is_the_standalone_cluster():
    assert JOB["spec"]["rayClusterSpec"] == CLUSTER["spec"]


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env", [])}


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    # KubeRay runs Ray in the first container of each pod.
    return group["template"]["spec"]["containers"][0]


def test_head_has_no_gpu_and_serves_dashboard_and_metrics():
    head = CLUSTER["spec"]["headGroupSpec"]
    container = ray_container(head)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dashboard"] == 8265
    assert head["rayStartParams"]["num-cpus"] == "0", "tasks and actors stay off the head"
    for key in ("requests", "limits"):
        assert GPU not in container["resources"].get(key, {})


def test_each_group_exports_metrics_on_the_port_prometheus_scrapes():
    monitor = load("podmonitor.yaml")
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for name, group in groups(CLUSTER["spec"]).items():
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert "metrics" in scraped and "metrics" in ports, name
        assert group["rayStartParams"]["metrics-export-port"] == str(ports["metrics"]), name


def test_worker_groups_one_with_gpus_one_for_cpu_actors():
    workers = {g["groupName"]: g for g in CLUSTER["spec"]["workerGroupSpecs"]}
    assert set(workers) == {"gpu", "cpu"}
    for name, group in workers.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        limits = ray_container(group)["resources"]["limits"]
        assert (GPU in limits) == (name == "gpu"), name


def mounted(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The volume mounted at each path of ``group``'s Ray container."""
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in ray_container(group)["volumeMounts"]}


def shared_mount() -> str:
    """Where every Ray pod mounts the shared volume (the same path on each)."""
    paths = {
        path
        for group in groups(CLUSTER["spec"]).values()
        for path, volume in mounted(group).items()
        if "persistentVolumeClaim" in volume
    }
    assert len(paths) == 1, f"the shared volume is mounted at different paths: {paths}"
    return paths.pop()


@pytest.mark.parametrize("name", sorted(groups(CLUSTER["spec"])))
def test_every_ray_pod_has_memory_backed_shm_and_the_shared_volume(name):
    volumes = mounted(groups(CLUSTER["spec"])[name])
    assert volumes[SHM]["emptyDir"]["medium"] == "Memory"
    assert volumes[shared_mount()]["persistentVolumeClaim"]["claimName"] == PVC["metadata"]["name"]


def quantity_bytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity ("64Gi", "1G", "512") in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]i?)?", str(quantity))
    assert match, quantity
    unit = match[2] or ""
    scale = 1024 if unit.endswith("i") else 1000
    return float(match[1]) * scale ** ("KMGTP".index(unit[0]) + 1 if unit else 0)


@pytest.mark.parametrize("name", sorted(groups(CLUSTER["spec"])))
def test_the_object_store_fits_in_shm_with_room_to_spare(name):
    group = groups(CLUSTER["spec"])[name]
    shm = quantity_bytes(mounted(group)[SHM]["emptyDir"]["sizeLimit"])
    memory = quantity_bytes(ray_container(group)["resources"]["limits"]["memory"])
    store = float(group["rayStartParams"]["object-store-memory"])
    # Left to itself Ray takes 95% of /dev/shm, and NCCL and vLLM need shared memory too.
    assert store <= 0.8 * shm, f"{name}: object store {store / 2**30:.0f} GiB in a {shm / 2**30:.0f} GiB /dev/shm"
    # A memory-backed volume counts against the pod's memory limit.
    assert shm <= 0.5 * memory, name


def all_containers() -> dict[str, dict[str, Any]]:
    out = {}
    for name, template in pod_templates().items():
        for container in template["spec"]["containers"]:
            out[f"{name} {container['name']}"] = container
    return out


def test_nothing_secret_is_written_in_the_manifests():
    for path in sorted(K8S.glob("*.yaml")):
        assert load(path.name)["kind"] != "Secret", path.name
    secretish = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY", re.IGNORECASE)
    for name, container in all_containers().items():
        for var in container.get("env", []):
            if secretish.search(var["name"]):
                assert "value" not in var, f"{name}: {var['name']} is written in the manifest"
                assert "secretKeyRef" in var["valueFrom"], f"{name}: {var['name']} is not read from a Secret"


def test_every_ray_process_gets_the_token_from_one_secret():
    refs = set()
    for name, container in all_containers().items():
        variables = env(container)
        assert variables["RAY_AUTH_MODE"]["value"] == "token", name
        ref = variables["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional", False), f"{name}: a Ray process must not start without the token"
        refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, f"the pods read the Ray token from different Secrets: {refs}"


# ---------------------------------------------------------------------------------------
# The job


def entrypoint_problems(entrypoint: str, backoff_limit: int) -> list[str]:
    """What is wrong with a RayJob entrypoint: a script that is not there, arguments the
    job's own parser rejects, an unknown preset, a config that does not load, a run folder
    off the shared volume, or retries (``backoff_limit``) that would not resume."""
    argv = shlex.split(entrypoint)
    if argv[:1] != ["python"] or len(argv) < 2 or not (ROOT / argv[1]).is_file():
        return [f"{entrypoint}: not 'python <a script of this repository>'"]
    try:
        args = job_parser(argv[1]).parse_args(argv[2:])
    except SystemExit:
        return [f"{entrypoint}: {argv[1]}'s parser rejects its arguments"]
    problems = []
    if args.preset not in PRESETS:
        problems.append(f"unknown preset {args.preset!r}; presets: {sorted(PRESETS)}")
    if args.config is not None and not (ROOT / args.config).is_file():
        problems.append(f"no config file {args.config}")
    if not problems:
        try:
            load_config(ROOT / args.config if args.config else None, preset=args.preset, overrides=args.overrides)
        except ValueError as e:
            problems.append(f"the config does not load: {e}")
    if args.output is None or not args.output.is_relative_to(shared_mount()):
        problems.append(f"--output {args.output} is not on the volume every pod mounts ({shared_mount()})")
    if backoff_limit > 0 and args.resume != "auto":
        problems.append("a retry runs on a new cluster: without --resume auto it cannot continue the run")
    return problems


def job_args():
    argv = shlex.split(JOB["spec"]["entrypoint"])
    return job_parser(argv[1]).parse_args(argv[2:])


def test_the_entrypoint_runs_the_papers_preset_and_parses_with_the_jobs_parser():
    assert entrypoint_problems(JOB["spec"]["entrypoint"], JOB["spec"]["backoffLimit"]) == []
    args = job_args()
    assert Path(shlex.split(JOB["spec"]["entrypoint"])[1]) == Path("jobs/train_geo3k.py")
    assert args.preset == "geo3k-qwen25vl-7b"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("--preset geo3k-qwen25vl-7b", "--preset geo3k-qwen25vl-7B"), "unknown preset 'geo3k-qwen25vl-7B'"),
        (("--output", "--outptu"), "parser rejects its arguments"),
        (("jobs/train_geo3k.py", "jobs/train_geo3.py"), "not 'python <a script"),
        (("--output", "--config jobs/configs/absent.yaml --output"), "no config file"),
        (("/mnt/shared/runs/", "/tmp/runs/"), "is not on the volume every pod mounts"),
        (("--resume auto", ""), "without --resume auto"),
        (("--resume auto", "--resume auto --set rollout.enigne=vllm"), "the config does not load"),
    ],
    ids=[
        "unknown-preset",
        "misspelt-option",
        "missing-script",
        "missing-config",
        "local-output",
        "no-resume",
        "bad-override",
    ],
)
def test_the_entrypoint_check_catches_a_broken_entrypoint(change, expected):
    entrypoint = JOB["spec"]["entrypoint"]
    assert change[0] in entrypoint
    problems = entrypoint_problems(entrypoint.replace(change[0], change[1]), JOB["spec"]["backoffLimit"])
    assert any(expected in p for p in problems), problems


def test_the_model_cache_is_on_the_shared_volume():
    # The driver downloads the model; learners and rollout actors on other pods load it.
    for name, group in groups(CLUSTER["spec"]).items():
        hf_home = Path(env(ray_container(group))["HF_HOME"]["value"])
        assert hf_home.is_relative_to(shared_mount()), f"{name}: HF_HOME {hf_home}"


def job_config(*overrides: str):
    args = job_args()
    path = ROOT / args.config if args.config else None
    return load_config(path, preset=args.preset, overrides=[*args.overrides, *overrides])


def pod_resources(group: dict[str, Any]) -> tuple[float, int]:
    """(CPUs, GPUs) Ray sees on one pod of ``group``: KubeRay passes the container's limits."""
    limits = ray_container(group)["resources"]["limits"]
    cpu = str(limits["cpu"])
    cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return cpus, int(limits.get(GPU, 0))


def placement_problems(config, cluster_spec: dict[str, Any]) -> list[str]:
    """Whether the job's actors fit the cluster's worker pods, placed first fit as Ray must:
    each learner worker and rollout engine (its tensor-parallel GPUs on one pod) on a GPU
    pod, the reward and prompt-preparation actors on the CPU pods; and no GPU left idle."""
    pods = [list(pod_resources(g)) for g in cluster_spec["workerGroupSpecs"] for _ in range(g["replicas"])]
    gpu_pods, cpu_pods = [p for p in pods if p[1]], [p for p in pods if not p[1]]
    trainer, rollout = config.trainer, config.rollout
    demands = [("learner worker", gpu_pods, trainer.cpus_per_learner, 1)] * trainer.num_learners
    demands += [("rollout engine", gpu_pods, rollout.num_cpus_per_actor, rollout.tensor_parallel_size)] * (
        rollout.num_actors
    )
    demands += [("reward actor", cpu_pods, config.reward.cpus_per_worker, 0)] * config.reward.num_workers
    demands += [("prompt actor", cpu_pods, config.data.cpus_per_worker, 0)] * config.data.num_workers
    problems = []
    for what, candidates, cpus, gpus in sorted(demands, key=lambda d: -d[3]):
        pod = next((p for p in candidates if p[0] >= cpus and p[1] >= gpus), None)
        if pod is None:
            problems.append(f"a {what} ({cpus} CPUs, {gpus} GPUs) does not fit the pods left")
            continue
        pod[0] -= cpus
        pod[1] -= gpus
    if not problems and sum(p[1] for p in gpu_pods):
        problems.append(f"{sum(p[1] for p in gpu_pods)} GPUs left idle")
    return problems


def test_the_jobs_actors_fit_the_cluster():
    config = job_config()
    assert config.rollout.engine == "vllm" and config.rollout.device == "cuda" and config.trainer.use_gpu
    assert placement_problems(config, CLUSTER["spec"]) == []


def test_the_job_fits_two_four_gpu_nodes_too():
    # README: the gpu group as 2 pods of 4 GPUs, with half the CPUs and memory each.
    spec = copy.deepcopy(CLUSTER["spec"])
    gpu_group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpu_group.update(replicas=2, minReplicas=2, maxReplicas=2)
    for key in ("requests", "limits"):
        ray_container(gpu_group)["resources"][key].update({"cpu": "32", "memory": "256Gi", GPU: "4"})
    assert placement_problems(job_config(), spec) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["rollout.num_actors=5"], "a rollout engine (4.0 CPUs, 1 GPUs) does not fit"),
        (
            ["rollout.num_actors=1", "rollout.tensor_parallel_size=8"],
            "a learner worker (8.0 CPUs, 1 GPUs) does not fit",
        ),
        (["trainer.cpus_per_learner=16"], "does not fit"),
        (["reward.num_workers=40"], "a reward actor (1.0 CPUs, 0 GPUs) does not fit"),
        (["rollout.num_actors=3"], "1 GPUs left idle"),
    ],
    ids=["too-many-engines", "tp-group-too-large", "learners-too-hungry", "too-many-graders", "idle-gpu"],
)
def test_the_placement_check_catches_a_job_that_does_not_fit(overrides, expected):
    problems = placement_problems(job_config(*overrides), CLUSTER["spec"])
    assert any(expected in p for p in problems), problems


def test_the_runtime_env_uploads_the_images_repository():
    runtime_env = yaml.safe_load(JOB["spec"]["runtimeEnvYAML"])
    assert runtime_env == {"working_dir": dockerfile_workdir()}


# ---------------------------------------------------------------------------------------
# The image


def dockerfile() -> str:
    return (K8S / "Dockerfile").read_text()


def dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", dockerfile(), re.MULTILINE)
    return workdir


def image_problems(text: str) -> list[str]:
    """Where a Dockerfile strays from the GPU pins: a Ray other than constraints/gpu.txt's
    (or the manifests' rayVersion), a Python other than the project's, a CUDA other than
    the pinned torch wheels', or an install that ignores constraints/gpu.txt."""
    gpu = pins("gpu.txt")
    problems = []
    ray_version = re.findall(r"^ARG RAY_VERSION=(\S+)", text, re.MULTILINE)
    if ray_version != [gpu["ray"]] or gpu["ray"] != CLUSTER["spec"]["rayVersion"]:
        rayversion = CLUSTER["spec"]["rayVersion"]
        problems.append(f"Ray {ray_version}, but gpu.txt pins {gpu['ray']} and the manifests {rayversion}")
    base = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py(\d)(\d+)-cu(\d+)(\d)", base[0] if base else "")
    if not match:
        return [*problems, f"FROM {base}: not rayproject/ray:${{RAY_VERSION}}-pyXY-cuXYZ"]
    if PROJECT["requires-python"] != f">={match[1]}.{match[2]}":
        problems.append(f"{base[0]}: Python {match[1]}.{match[2]}, the project {PROJECT['requires-python']}")
    cuda = gpu["nvidia-cuda-runtime"].split(".")[:2]
    if [match[3], match[4]] != cuda:
        problems.append(f"{base[0]}: CUDA {match[3]}.{match[4]}, the pinned torch's {'.'.join(cuda)}")
    if 'pip install --no-cache-dir -c constraints/gpu.txt -e ".[vllm]"' not in text:
        problems.append("the package is not installed with -c constraints/gpu.txt")
    return problems


def test_the_image_is_pinned_to_the_gpu_constraints():
    assert image_problems(dockerfile()) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0"), "gpu.txt pins 2.60.0"),
        (("-py311-", "-py312-"), "Python 3.12"),
        (("-cu130", "-cu128"), "CUDA 12.8"),
        (("-cu130", "-gpu"), "not rayproject/ray"),
        (('-c constraints/gpu.txt -e ".[vllm]"', '-e ".[vllm]"'), "not installed with -c constraints/gpu.txt"),
    ],
    ids=["other-ray", "other-python", "other-cuda", "untagged-cuda", "unconstrained-install"],
)
def test_the_image_check_catches_a_stray_dockerfile(change, expected):
    assert change[0] in dockerfile()
    problems = image_problems(dockerfile().replace(change[0], change[1]))
    assert any(expected in p for p in problems), problems


def test_every_pod_runs_one_image_of_this_version():
    images = {container["image"] for container in all_containers().values()}
    assert len(images) == 1, images
    # The name may carry a registry (README: the image you pushed).
    assert images.pop().rsplit("/", 1)[-1] == f"mapo-ray:{PROJECT['version']}"


# ---------------------------------------------------------------------------------------
# The Grafana dashboard

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
PROMQL_WORDS |= {"and", "or", "unless"}
SPECS: dict[str, RayMetricSpec] = {spec.prometheus_name: spec for spec in RAY_METRICS}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_problems(expr: str) -> tuple[set[str], list[str]]:
    """The metrics ``expr`` reads, and what is wrong with it: a metric mapo-ray does not
    export, or a label that none of its metrics carries."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    problems, metrics = [], set()
    for name, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", text):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body):
            if name in SPECS and label not in SPECS[name].tag_keys:
                problems.append(f"{expr}: {name} has no label {label!r}")
    clauses = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text)
    grouping = [label.strip() for clause in clauses for label in clause.split(",")]
    bare = re.sub(r"\{[^}]*\}", " ", re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", text))
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        word, rest = match[0], bare[match.end() :].lstrip()
        if word in PROMQL_WORDS or rest.startswith("("):  # a keyword, or a function / aggregation
            continue
        metrics.add(word)
        if word not in SPECS:
            problems.append(f"{expr}: {word} is not a metric mapo-ray exports")
    labels = {tag for name in metrics if name in SPECS for tag in SPECS[name].tag_keys}
    for label in grouping:
        if label not in labels:
            problems.append(f"{expr}: groups by {label!r}, which none of its metrics has")
    if not metrics:
        problems.append(f"{expr}: reads no metric")
    return metrics, problems


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Every PromQL expression of the dashboard, by panel title (template variables too)."""
    out: dict[str, list[str]] = {}
    for panel in panels(dashboard):
        out[panel["title"]] = [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["query"]
            out[f"${variable['name']}"] = [f'{match[1]}{{{match[2]}=""}}']
    return out


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    return [p for exprs in dashboard_queries(dashboard).values() for expr in exprs for p in query_problems(expr)[1]]


def test_the_dashboard_queries_only_what_mapo_ray_exports():
    assert dashboard_problems(DASHBOARD) == []


def test_the_dashboard_check_catches_a_wrong_metric_or_label():
    dashboard = copy.deepcopy(DASHBOARD)
    target = next(p for p in panels(dashboard) if p.get("targets"))["targets"][0]
    for bad, expected in [
        ('max by (run) (ray_mapo_reward_mena{run=~"$run"})', "ray_mapo_reward_mena is not a metric"),
        ('max by (run) (mapo_reward_mean{run=~"$run"})', "mapo_reward_mean is not a metric"),
        ('max by (run, bin) (ray_mapo_reward_mean{run=~"$run"})', "groups by 'bin'"),
        ('max by (run) (ray_mapo_reward_mean{kind="timeout"})', "has no label 'kind'"),
    ]:
        target["expr"] = bad
        assert any(expected in p for p in dashboard_problems(dashboard)), bad


def test_the_dashboard_is_importable():
    assert DASHBOARD["title"] and DASHBOARD["uid"] and DASHBOARD["schemaVersion"] >= 36
    for field in ("id", "title"):
        values = [panel[field] for panel in panels(DASHBOARD)]
        assert len(values) == len(set(values)), f"panels share a {field}"
    for panel in panels(DASHBOARD):
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["gridPos"]["w"] <= 24, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# What the dashboard must show, as the metrics keys (mapo_ray/telemetry/catalog.py) of each.
TOPICS = {
    "reward": ["reward/mean"],
    "accuracy": ["reward/accuracy"],
    "certainty histogram": ["certainty/p_hist/"],
    "mean lambda": ["certainty/lambda_mean"],
    "tokens per second": ["perf/tokens_per_s"],
    "phase times": ["time/generate_s", "time/reward_s", "time/learner_s"],
    "sync time": ["time/sync_s"],
    "failures": ["reward/failed/"],
}


@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_the_dashboard_has_a_panel_for(topic):
    by_key = {spec.key: spec.prometheus_name for spec in RAY_METRICS}
    wanted = {by_key[key] for key in TOPICS[topic]}
    shown = [
        title
        for title, exprs in dashboard_queries(DASHBOARD).items()
        if wanted <= {m for expr in exprs for m in query_problems(expr)[0]}
    ]
    assert shown, f"no panel shows {topic} ({sorted(wanted)})"


def test_the_readme_names_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\b(k8s/[\w./-]+\.(?:yaml|json))\b", readme))
    named |= set(re.findall(r"\b(k8s/Dockerfile)\b", readme))
    assert named, "the README names none of k8s/"
    assert [name for name in sorted(named) if not (ROOT / name).exists()] == []
