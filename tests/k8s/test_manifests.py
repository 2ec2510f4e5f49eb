"""k8s/ manifests: schema validation (CRDs, structural checks, core kinds), policies that must not rot
(security, geometry, storage, /dev/shm, network isolation, the optional [rdma]/[hugepages]/[sched]
blocks), torchrun's world as each manifest's pods would form it, and local simulations of the torchrun
Indexed Job and the KubeRay RayJob that train for real."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import typing
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from tests.conftest import ROOT, cli_env
from tests.k8s import schemas, simulate

K8S = ROOT / "k8s"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))
TRAINING_JOBS = ("jobset.yaml", "rayjob.yaml", "torchrun-job.yaml", "trainjob.yaml")
TORCHRUN_JOBS = ("jobset.yaml", "torchrun-job.yaml", "trainjob.yaml")
CONFIG_MOUNT = "/etc/sft-dist"
OPTIONS = ("rdma", "hugepages", "sched")  # the tagged, commented-out blocks: `# [rdma] ...`
GiB = 2**30


def enable(text: str, *tags: str) -> str:
    """The manifest with the lines tagged `# [tag] ` uncommented, as a user turns an option on."""
    for tag in tags:
        text = re.sub(rf"^(\s*)# \[{tag}\] ", r"\1", text, flags=re.MULTILINE)
    return text


def docs(name: str, options: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    text = enable((K8S / name).read_text(), *options)
    return [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def one(name: str, kind: str, options: tuple[str, ...] = ()) -> dict[str, Any]:
    found = [d for d in docs(name, options) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    folder = schemas.schema_dir()
    if not folder.is_dir():
        pytest.skip(f"CRD schemas not found at {folder} (set {schemas.SCHEMA_ENV} to the k8s-schemas folder)")
    return folder


def job_doc(name: str, options: tuple[str, ...] = ()) -> dict[str, Any]:
    """The object a user applies to run the training: the Job, JobSet, TrainJob or RayJob."""
    return next(d for d in docs(name, options) if d["kind"] in ("Job", "JobSet", "TrainJob", "RayJob"))


def configmap_data() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for d in docs("configmap.yaml") if d["kind"] == "ConfigMap"}


def training_config() -> dict[str, Any]:
    return yaml.safe_load(configmap_data()["sft-dist-config"]["config.yaml"])


def quantity(q: Any) -> float:
    """A Kubernetes quantity (cpu or bytes) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)


# --- the pods each manifest makes ------------------------------------------------------------------

class Pod(NamedTuple):
    """The pods made from one template, with the labels the controllers give them."""

    role: str                   # "node-0" (a Job of a JobSet), "job", "head", "worker:gpu", "submitter"
    spec: dict[str, Any]        # the pod spec as created (a TrainJob's: the runtime's merged with the trainer)
    labels: list[dict[str, str]]  # one per pod: template labels + the controllers' (job name, index, ...)

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    @property
    def gpus(self) -> int:
        return int(self.container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def workload(name: str, options: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the controllers run: the Job, the JobSet, the JobSet Kubeflow Trainer builds from the
    TrainJob and the TrainingRuntime in the same file, or the RayJob."""
    doc = job_doc(name, options)
    if doc["kind"] == "TrainJob":
        return simulate.trainjob_jobset(doc, one(name, "TrainingRuntime", options))
    return doc


def _indexed(job: dict[str, Any]) -> list[dict[str, str]]:
    return [{**simulate.job_pod_labels(job), simulate.COMPLETION_INDEX: str(i)}
            for i in range(job["spec"]["completions"])]


def pods(name: str, options: tuple[str, ...] = ()) -> list[Pod]:
    doc = workload(name, options)
    if doc["kind"] == "Job":
        return [Pod("job", doc["spec"]["template"]["spec"], _indexed(doc))]
    if doc["kind"] == "JobSet":
        jobs, _ = simulate.jobset_jobs(doc)
        return [Pod(job["metadata"]["name"].removeprefix(doc["metadata"]["name"] + "-"),
                    job["spec"]["template"]["spec"], _indexed(job)) for job in jobs]
    cluster, out = doc["spec"]["rayClusterSpec"], []
    rc = f"{doc['metadata']['name']}-x7k2p"  # KubeRay names the RayCluster <rayjob>-<random suffix>
    out.append(Pod("head", cluster["headGroupSpec"]["template"]["spec"],
                   [simulate.kuberay_pod_labels(doc, "head", rc)]))
    for group in cluster["workerGroupSpecs"]:
        role = f"worker:{group['groupName']}"
        out.append(Pod(role, group["template"]["spec"],
                       [simulate.kuberay_pod_labels(doc, role, rc)] * group["replicas"]))
    out.append(Pod("submitter", doc["spec"]["submitterPodTemplate"]["spec"],
                   [simulate.kuberay_pod_labels(doc, "submitter", rc)]))
    return out


def training_pods(name: str, options: tuple[str, ...] = ()) -> list[Pod]:
    """The pods that read the config or write the run: all but the RayJob's submitter."""
    return [p for p in pods(name, options) if p.role != "submitter"]


def pod_specs_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every pod spec written anywhere in a document (any object with a `containers` list)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for v in node.values():
            yield from pod_specs_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from pod_specs_in(v)


def mounts(spec: dict[str, Any], container: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{mountPath: volume (with the mount's readOnly)} of a container (default: the first)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    container = container or spec["containers"][0]
    return {m["mountPath"]: {**volumes[m["name"]], "readOnly": m.get("readOnly", False)}
            for m in container.get("volumeMounts", [])}


def pod_env(pod: Pod, index: int = 0) -> dict[str, str]:
    """The training container's literal and fieldRef variables as the kubelet sets them for pod `index`."""
    labels = pod.labels[index]
    meta = {"name": f"{pod.role}-{index}", "labels": labels, "annotations": labels}  # JobSet: keys as both
    env = [e for e in pod.container.get("env", [])  # secrets are not needed here
           if not {"secretKeyRef", "configMapKeyRef"} & set(e.get("valueFrom", {}))]
    if simulate.COMPLETION_INDEX in labels:
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{simulate.COMPLETION_INDEX}']"}}})
    return simulate.container_env({**pod.container, "env": env}, {"metadata": meta, "spec": {}},
                                  secrets={}, configmaps={})


def train_overrides(name: str) -> dict[str, str]:
    """The `key=value` overrides on the job's `sft-dist train` command line, env references resolved."""
    doc = workload(name)
    if doc["kind"] == "RayJob":
        command, env = doc["spec"]["entrypoint"], {}
    else:
        pod = next(p for p in pods(name) if p.gpus)
        command, env = pod.container["command"][2].replace("\\\n", " "), pod_env(pod)
    words = shlex.split(command.split("sft-dist train", 1)[1])
    assert words and words[0] == f"{CONFIG_MOUNT}/config.yaml", words
    out = {}
    for word in words[1:]:
        if "=" not in word:
            assert word == "$@", word  # the container's args
            continue
        key, _, value = word.partition("=")
        out[key] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), value)
    return out


def checkpoint_dir(name: str) -> str:
    cfg, over = training_config(), train_overrides(name)
    output_dir = over.get("output_dir", cfg["output_dir"])
    return over.get("checkpoint.dir") or (cfg.get("checkpoint") or {}).get("dir") or f"{output_dir}/checkpoints"


def selects(selector: dict[str, Any], labels: dict[str, str], own: dict[str, str] | None = None) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) matched against a pod's labels; `matchLabelKeys`
    (topologySpreadConstraints) adds the key with the value it has on `own`, the pod being scheduled."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return all(labels.get(key) == (own or {}).get(key) for key in selector.get("matchLabelKeys") or [])


# --- schemas ---------------------------------------------------------------------------------------

def validation_errors(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    """Custom resources: the CRD in the schema folder, and for JobSet / TrainingRuntime (no CRD there)
    the structural schema in tests/k8s/schemas.py (also with a CRD, if one is added). Core kinds: strict
    kubernetes-validate for each of K8S_VERSIONS."""
    key = (doc["apiVersion"], doc["kind"])
    if not schemas.is_custom(doc):
        return [f"(k8s {v}) {e}" for v in schemas.K8S_VERSIONS for e in schemas.core_errors(doc, v)]
    errors = []
    if key in schemas.STRUCTURAL:
        errors += [f"(structural) {e}" for e in schemas.structural_errors(doc)]
    if key in schemas.crd_schemas(crd_dir) or key not in schemas.STRUCTURAL:
        errors += [f"(CRD) {e}" for e in schemas.custom_resource_errors(doc, crd_dir)]
    return errors


@pytest.mark.parametrize("options", [(), OPTIONS], ids=["as-shipped", "all-options-on"])
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid(name, options, crd_dir):
    problems = []
    for doc in docs(name, options):
        problems += [f"{doc['kind']} {doc['metadata']['name']}: {e}" for e in validation_errors(doc, crd_dir)]
    if job_doc_kind(name) == "TrainJob":  # what the Trainer makes of it is a valid JobSet too
        problems += [f"built JobSet: {e}" for e in validation_errors(workload(name, options), crd_dir)]
    assert not problems, "\n".join(problems)


def job_doc_kind(name: str) -> str | None:
    return next((d["kind"] for d in docs(name) if d["kind"] in ("Job", "JobSet", "TrainJob", "RayJob")), None)


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_every_option_is_offered_in_every_training_manifest(name):
    text = (K8S / name).read_text()
    for tag in OPTIONS:
        tagged = re.compile(rf"^\s*# \[{tag}\] ", re.MULTILINE)
        assert tagged.search(text), f"{name}: no [{tag}] block"
        assert not tagged.search(enable(text, tag))


def test_broken_manifests_are_rejected(crd_dir):
    rayjob = one("rayjob.yaml", "RayJob")
    bad = copy.deepcopy(rayjob)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    worker = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["replicas"] = "two"
    container = worker["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    errors = "\n".join(schemas.custom_resource_errors(bad, crd_dir))
    assert "'shutdownAfterJobFinish' was unexpected" in errors
    assert "workerGroupSpecs.0.replicas: 'two' is not of type 'integer'" in errors
    assert "containers.0: Additional properties are not allowed ('volumeMount' was unexpected)" in errors
    assert schemas.custom_resource_errors({**rayjob, "apiVersion": "ray.io/v2"}, crd_dir)[0].startswith(
        "no CRD schema for ray.io/v2 RayJob")

    job = one("torchrun-job.yaml", "Job")
    bad = copy.deepcopy(job)
    bad["spec"]["completionMod"] = bad["spec"].pop("completionMode")
    for version in schemas.K8S_VERSIONS:
        assert schemas.core_errors(bad, version) == [
            "spec: Additional properties are not allowed ('completionMod' was unexpected)"]
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}
    assert "'limit' was unexpected" in schemas.core_errors(bad, schemas.K8S_VERSIONS[0])[0]

    trainjob = one("trainjob.yaml", "TrainJob")
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["numProcPerNodes"] = bad["spec"]["trainer"].pop("numProcPerNode")
    bad["spec"]["trainer"]["numNodes"] = -1
    errors = "\n".join(schemas.custom_resource_errors(bad, crd_dir))
    assert "'numProcPerNodes' was unexpected" in errors and "trainer.numNodes: -1 is less than the minimum" in errors


def test_structural_checks_reject_what_the_crds_would():
    jobset = one("jobset.yaml", "JobSet")
    bad = copy.deepcopy(jobset)
    bad["spec"]["failurePolicy"]["restartStrategy"] = "Blocking"
    bad["spec"]["network"]["enableDNSHostname"] = bad["spec"]["network"].pop("enableDNSHostnames")
    bad["spec"]["replicatedJobs"][0]["replica"] = 1
    bad["spec"]["replicatedJobs"].append({"name": "Node_2", "template": {"spec": {}}})
    errors = "\n".join(schemas.structural_errors(bad))
    assert "failurePolicy.restartStrategy: 'Blocking' is not one of" in errors
    assert "('enableDNSHostname' was unexpected)" in errors
    assert "replicatedJobs.0: Additional properties are not allowed ('replica' was unexpected)" in errors
    assert "replicatedJobs.1.name: 'Node_2' does not match" in errors
    # The Job template inside is a batch/v1 Job, validated as one (strict): its pod template included.
    bad = copy.deepcopy(jobset)
    pod = bad["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    errors = schemas.structural_errors(bad, versions=schemas.K8S_VERSIONS[:1])
    assert len(errors) == 1 and errors[0].startswith("replicatedJobs[node] as a Job (k8s 1.33): ")
    assert "'readOnlyRootFileSystem' was unexpected" in errors[0]

    runtime = one("trainjob.yaml", "TrainingRuntime")
    bad = copy.deepcopy(runtime)
    bad["spec"]["mlPolicy"]["pytorch"] = bad["spec"]["mlPolicy"].pop("torch")
    bad["spec"]["template"]["spec"]["successPolicy"]["operator"] = "Every"
    errors = "\n".join(schemas.structural_errors(bad))
    assert "mlPolicy: Additional properties are not allowed ('pytorch' was unexpected)" in errors
    assert "successPolicy.operator: 'Every' is not one of ['All', 'Any']" in errors
    assert schemas.structural_errors({**jobset, "apiVersion": "jobset.x-k8s.io/v1"})[0].startswith(
        "no structural schema for jobset.x-k8s.io/v1 JobSet")


def test_crd_schema_conversion():
    node = {"type": "object", "properties": {
        "a": {"type": "string", "nullable": True},
        "q": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"x": {}}},
        "m": {"type": "object", "additionalProperties": {"type": "string"}}}}
    out = schemas.to_json_schema(node)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["type"] == ["string", "null"]
    assert "type" not in out["properties"]["q"]
    assert "additionalProperties" not in out["properties"]["open"]  # the API server keeps unknown keys here
    assert out["properties"]["m"]["additionalProperties"] == {"type": "string"}


def test_custom_resource_groups():
    kinds = {(d["apiVersion"], d["kind"]): schemas.is_custom(d) for name in MANIFESTS for d in docs(name)}
    assert kinds == {
        ("v1", "ConfigMap"): False, ("v1", "PersistentVolumeClaim"): False, ("v1", "Service"): False,
        ("batch/v1", "Job"): False, ("networking.k8s.io/v1", "NetworkPolicy"): False,
        ("jobset.x-k8s.io/v1alpha2", "JobSet"): True, ("ray.io/v1", "RayJob"): True,
        ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): True, ("trainer.kubeflow.org/v1alpha1", "TrainJob"): True}


# --- security --------------------------------------------------------------------------------------

RDMA_RESOURCE = re.compile(r"^(rdma/|nvidia\.com/(hostdev|mlnx|rdma)|mellanox\.com/)")


def rdma_resources(container: dict[str, Any]) -> dict[str, Any]:
    res = container.get("resources", {})
    return {k: v for kind in ("requests", "limits") for k, v in res.get(kind, {}).items() if RDMA_RESOURCE.match(k)}


@pytest.mark.parametrize("options", [(), OPTIONS], ids=["as-shipped", "all-options-on"])
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_pod_is_locked_down(name, options):
    """Every pod spec written in the manifest, and every pod the controllers make of it (a TrainJob's:
    the runtime's template merged with the trainer): non-root, RuntimeDefault seccomp, no service account
    token, no host namespaces; every container: no privilege escalation, read-only root filesystem, all
    capabilities dropped, IPC_LOCK added back only with an RDMA device, a pinned image."""
    # (spec, whether its containers carry their resources: a TrainingRuntime's get them from the TrainJob)
    specs = [(s, d["kind"] != "TrainingRuntime") for d in docs(name, options) for s in pod_specs_in(d)]
    if name in TRAINING_JOBS:
        specs += [(p.spec, True) for p in pods(name, options)]
        assert specs
    for spec, has_resources in specs:
        psc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, spec["containers"][0]["name"]
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"))
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            effective = {**psc, **sc}
            assert effective.get("runAsNonRoot") is True and effective.get("runAsUser", 1000) != 0, where
            assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("privileged") is not True and not sc.get("procMount"), where
            caps = sc.get("capabilities", {})
            assert caps.get("drop") == ["ALL"], where
            # RDMA registers (pins) buffers with the HCA: IPC_LOCK, and only where an RDMA device is.
            assert set(caps.get("add", [])) <= {"IPC_LOCK"}, where
            if has_resources:
                assert caps.get("add", []) == (["IPC_LOCK"] if rdma_resources(c) else []), (where, caps)
            assert re.fullmatch(r"[\w.-]+(:\d+)?/[\w./-]+:[\w.-]+", c["image"]) and not c["image"].endswith(
                ":latest"), c["image"]


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_every_written_path_is_a_writable_mount(name):
    """The root filesystem is read-only: /tmp, $HOME, the caches and the run directory must be mounts."""
    output_dir = train_overrides(name)["output_dir"]
    for pod in pods(name):
        m = mounts(pod.spec)
        writable = [path for path, vol in m.items() if not vol["readOnly"] and "configMap" not in vol]

        def under(path: str) -> bool:
            return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)

        assert "emptyDir" in m.get("/tmp", {}) and under("/tmp"), f"{pod.role}: no writable /tmp"
        env = pod_env(pod)
        assert "HOME" in env and "emptyDir" in m.get(env["HOME"], {}) and under(env["HOME"]), f"{pod.role}: HOME"
        for key, value in env.items():
            if value.startswith("/") and not value.startswith(CONFIG_MOUNT):
                assert under(value), f"{pod.role}: {key}={value} is not on a writable mount"
        if pod.role != "submitter":
            assert m[CONFIG_MOUNT]["readOnly"] is True and under(output_dir), pod.role


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY", re.IGNORECASE)
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|[A-Za-z0-9+/]{40})$")


def _walk_env(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for v in node.values():
            yield from _walk_env(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_env(v)


@pytest.mark.parametrize("name", MANIFESTS)
def test_no_literal_secrets(name):
    for doc in docs(name, OPTIONS):
        assert doc["kind"] != "Secret", f"{name}: create Secrets with kubectl, never commit them"
        for item in _walk_env(doc):
            if SECRET_NAME.search(item["name"]):
                assert "value" not in item and "secretKeyRef" in item.get("valueFrom", {}), item
            assert not SECRET_VALUE.match(str(item.get("value", ""))), item["name"]
    text = (K8S / name).read_text()
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}|\bAKIA[0-9A-Z]{16}", text)
    cfg = training_config()
    assert "hub_token" not in (cfg.get("training") or {}) and not (cfg.get("checkpoint") or {}).get("storage_options",
                                                                                                    {}).get("secret")


def job_pods_by_manifest(options: tuple[str, ...] = ()) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """{manifest: [(role, labels) of every pod it makes]}."""
    return {name: [(p.role, labels) for p in pods(name, options) for labels in p.labels] for name in TRAINING_JOBS}


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_network_policy_admits_only_the_jobs_own_pods(name):
    """Every pod of the job is selected by an Ingress policy (so all other ingress is dropped); the
    policies select no other job's pods; they let the job's pods reach each other on any port (the
    rendezvous, the workers' store, NCCL and Ray pick ports at run time), and admit nothing else but the
    KubeRay operator on the head's dashboard port."""
    everyone = job_pods_by_manifest()
    mine = everyone[name]
    others = [labels for other, ps in everyone.items() if other != name for _, labels in ps]
    policies = [d for d in docs(name) if d["kind"] == "NetworkPolicy"]
    assert policies, f"{name}: no NetworkPolicy"
    for policy in policies:
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        assert not any(selects(spec["podSelector"], labels) for labels in others)
    for role, labels in mine:
        assert any(selects(p["spec"]["podSelector"], labels) for p in policies), f"{role} is not isolated"
    intra = 0
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                if set(peer) == {"podSelector"}:
                    assert all(selects(peer["podSelector"], labels) for _, labels in mine), peer
                    assert not any(selects(peer["podSelector"], labels) for labels in others), peer
                    assert "ports" not in rule  # any port, between the job's own pods
                    intra += 1
                    continue
                # The only other peer: the KubeRay operator, to the head's dashboard.
                assert job_doc_kind(name) == "RayJob", (name, peer)
                assert peer == {"namespaceSelector": {},
                                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
                head = one(name, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]
                dashboard = next(p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
                                 if p["name"] == "dashboard")
                assert rule["ports"] == [{"protocol": "TCP", "port": dashboard}]
                selected = {role for role, labels in mine if selects(policy["spec"]["podSelector"], labels)}
                assert selected == {"head"}, selected
    assert intra >= 1


# --- geometry, storage, /dev/shm -------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_gpus_requested_where_training_runs(name):
    doc = workload(name)
    for pod in pods(name):
        res = pod.container.get("resources", {})
        gpus = {k: res.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
        if pod.role not in ("head", "submitter"):
            assert gpus["limits"] and gpus["requests"] == gpus["limits"], f"{pod.role}: {gpus}"
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.spec.get("tolerations", [])), pod.role
        else:
            assert gpus == {"requests": None, "limits": None}, f"{pod.role} should not hold GPUs"
    over = train_overrides(name)
    if doc["kind"] == "RayJob":
        workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        gpu_total = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                        * g["replicas"] for g in workers)
        assert int(over["launcher.num_workers"]) * int(over["launcher.resources_per_worker.GPU"]) == gpu_total
        assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in workers)
        assert over["launcher.type"] == "ray"
        return
    # torchrun: nodes x processes per node = the pods x their GPUs; OMP threads x processes = the CPUs.
    nodes = sum(len(p.labels) for p in pods(name))
    for pod in pods(name):
        env = pod_env(pod)
        nnodes, nproc = (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) if "PET_NNODES" in env else (
            env["NNODES"], env["NPROC_PER_NODE"])
        assert int(nnodes) == nodes and int(nproc) == pod.gpus, (pod.role, nnodes, nproc)
        limits = pod.container["resources"]["limits"]
        assert int(env["OMP_NUM_THREADS"]) * int(nproc) == quantity(limits["cpu"]), pod.role
    assert over["launcher.type"] == "torchrun"


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_shm_and_grace_period(name):
    stop_grace = training_config()["checkpoint"]["stop_grace_s"]
    for pod in training_pods(name):
        shm = mounts(pod.spec).get("/dev/shm")
        assert shm and shm.get("emptyDir", {}).get("medium") == "Memory", f"{pod.role}: no memory-backed /dev/shm"
        # tmpfs pages count against the memory limit: half of it at most stays for the processes.
        memory = quantity(pod.container["resources"]["limits"]["memory"])
        assert 1 * GiB <= quantity(shm["emptyDir"]["sizeLimit"]) <= memory / 2, pod.role
        # SIGTERM: every rank finishes its step and checkpoints within stop_grace_s, then exits.
        assert pod.spec["terminationGracePeriodSeconds"] > stop_grace, pod.role


def ray_default_object_store(memory: float, shm: float) -> float:
    """Ray 2.60's object store size when --object-store-memory is not given (ray/_private/utils.py
    resolve_object_store_memory): 30% of the available memory, capped at 200 GB and at 95% of /dev/shm
    (but not below 10 GB); with more than /dev/shm, it moves to /tmp (services.py)."""
    return min(0.3 * memory, 200e9, max(1e10, 0.95 * shm))


def test_ray_object_store_fits_in_shm():
    """Every Ray pod states object-store-memory, and the store leaves >= 2 GiB of /dev/shm free for
    NCCL's segments and the dataloader workers; Ray's default would not (or would not fit at all)."""
    cluster = one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"], True)] + [(g["groupName"], g, False)
                                                            for g in cluster["workerGroupSpecs"]]
    for role, group, head in groups:
        spec = group["template"]["spec"]
        shm = quantity(mounts(spec)["/dev/shm"]["emptyDir"]["sizeLimit"])
        memory = quantity(spec["containers"][0]["resources"]["limits"]["memory"])
        params = simulate.kuberay_start_params(group, head=head)  # what `ray start` is given
        store = int(params["object-store-memory"])
        assert 1 * GiB <= store <= shm - 2 * GiB, (role, store / GiB, shm / GiB)
        assert int(params["memory"]) == memory
        assert ray_default_object_store(memory, shm) > shm - 2 * GiB, role  # why it is set


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_checkpoints_on_shared_storage_at_one_path(name):
    claims = {d["metadata"]["name"]: d for d in docs("pvc.yaml")}
    ckpt = checkpoint_dir(name)
    assert ckpt.startswith("/mnt/sft-dist/runs/") or re.match(r"^(s3|gs|gcs|az|abfs)://", ckpt), ckpt
    tpods = training_pods(name)
    for pod in tpods:
        m = mounts(pod.spec)
        config_map = m.get(CONFIG_MOUNT, {}).get("configMap", {}).get("name")
        assert "config.yaml" in configmap_data().get(config_map, {}), f"{pod.role}: no config at {CONFIG_MOUNT}"
        if "://" in ckpt:
            continue
        shared = [(path, vol) for path, vol in m.items()
                  if "persistentVolumeClaim" in vol and ckpt.startswith(path.rstrip("/") + "/")]
        assert shared, f"{pod.role}: {ckpt} is not on a mounted PersistentVolumeClaim"
        claim = shared[0][1]["persistentVolumeClaim"]["claimName"]
        assert claim in claims and "ReadWriteMany" in claims[claim]["spec"]["accessModes"], claim
    # Every pod sees the same shared volumes at the same paths (emptyDirs are each pod's own scratch).
    views = {json.dumps({p: v for p, v in mounts(pod.spec).items() if "emptyDir" not in v}, sort_keys=True)
             for pod in tpods}
    assert len(views) == 1, f"{name}: pods mount different volumes/paths: {views}"
    assert training_config()["training"]["save_strategy"] != "no"


# --- the optional blocks ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_rdma_block(name):
    """[rdma] off (as shipped): no RDMA device, no added capability, NCCL left to pick TCP. On: every GPU
    container requests the RDMA device (requests == limits), gets IPC_LOCK, and NCCL is told to use
    the HCAs, with its TCP bootstrap on the pod network."""
    for options in ((), ("rdma",)):
        for pod in pods(name, options):
            c, env = pod.container, pod_env(pod)
            rdma = rdma_resources(c)
            caps = c["securityContext"]["capabilities"]
            if not pod.gpus:
                assert not rdma and "add" not in caps and "NCCL_IB_HCA" not in env, pod.role
                continue
            assert env["NCCL_DEBUG"] in ("WARN", "INFO"), pod.role
            if not options:
                assert not rdma and "add" not in caps and not any(k.startswith("NCCL_IB_") for k in env), pod.role
                continue
            res = c["resources"]
            assert rdma and all(res["requests"].get(k) == res["limits"].get(k) for k in rdma), (pod.role, res)
            assert caps == {"drop": ["ALL"], "add": ["IPC_LOCK"]}, pod.role
            assert env["NCCL_IB_DISABLE"] == "0" and env["NCCL_IB_HCA"] and env["NCCL_SOCKET_IFNAME"] == "eth0"


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_hugepages_block(name):
    for options in ((), ("hugepages",)):
        for pod in training_pods(name, options):
            res = pod.container["resources"]
            pages = {k: res[kind].get(k) for kind in ("requests", "limits") for k in res[kind]
                     if k.startswith("hugepages-")}
            hugepage_mounts = [v for v in mounts(pod.spec).values()
                               if v.get("emptyDir", {}).get("medium") == "HugePages"]
            if not options or not pod.gpus:
                assert not pages and not hugepage_mounts, pod.role
            else:  # huge pages: requests == limits, and a HugePages volume to map them from
                assert pages and res["requests"]["hugepages-2Mi"] == res["limits"]["hugepages-2Mi"]
                assert len(hugepage_mounts) == 1, pod.role


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_scheduling_hooks(name):
    """GPU tolerations always; with [sched]: the Kueue queue label on the object a user applies, a
    nodeSelector on the GPU pods, and a spread constraint that counts exactly this job's GPU pods."""
    assert "kueue.x-k8s.io/queue-name" not in job_doc(name)["metadata"]["labels"]
    assert not any("nodeSelector" in p.spec or "topologySpreadConstraints" in p.spec for p in pods(name))
    everyone = job_pods_by_manifest(("sched",))
    all_pods = [(other, role, labels) for other, ps in everyone.items() for role, labels in ps]
    assert job_doc(name, ("sched",))["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    for pod in pods(name, ("sched",)):
        if not pod.gpus:
            assert "nodeSelector" not in pod.spec and "topologySpreadConstraints" not in pod.spec
            continue
        assert pod.spec["nodeSelector"] and pod.spec["tolerations"], pod.role
        for constraint in pod.spec["topologySpreadConstraints"]:
            assert constraint["topologyKey"] == "kubernetes.io/hostname" and constraint["maxSkew"] == 1
            own = pod.labels[0]
            counted = {(other, role) for other, role, labels in all_pods
                       if selects({**constraint["labelSelector"],
                                   "matchLabelKeys": constraint.get("matchLabelKeys", [])}, labels, own)}
            gpu_roles = {(name, p.role) for p in pods(name) if p.gpus}
            assert counted == gpu_roles, (pod.role, counted)


# --- wiring of each kind ---------------------------------------------------------------------------

def test_indexed_job_wiring():
    svc, job = one("torchrun-job.yaml", "Service"), one("torchrun-job.yaml", "Job")
    spec, tmpl = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert tmpl["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {simulate.JOB_NAME_LABEL: job["metadata"]["name"]}
    assert tmpl["restartPolicy"] == "Never" and spec["podFailurePolicy"]["rules"]
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    env = {e["name"]: e for e in tmpl["containers"][0]["env"]}
    port = svc["spec"]["ports"][0]["port"]
    assert env["RDZV_ENDPOINT"]["value"] == f"$(JOB_NAME)-0.{svc['metadata']['name']}:{port}"
    assert "JOB_COMPLETION_INDEX" not in env  # the Job controller adds it (last)
    script = tmpl["containers"][0]["command"][2]
    for flag in ("--rdzv-backend c10d", '--rdzv-endpoint "$RDZV_ENDPOINT"', "--max-restarts", '"$@"'):
        assert flag in script


def test_jobset_wiring():
    jobset = one("jobset.yaml", "JobSet")
    spec, name = jobset["spec"], jobset["metadata"]["name"]
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    policy = spec["failurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate" and policy["maxRestarts"] >= 1
    assert policy["rules"] == [{"name": "disruptions-do-not-count", "action": "RestartJobSetAndIgnoreMaxRestarts",
                                "onJobFailureReasons": ["PodFailurePolicy"]}]
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert job["parallelism"] == job["completions"]
    assert job["podFailurePolicy"]["rules"] == [{"action": "FailJob", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    # The rendezvous: pod 0 of Job 0, under the Service the controller names like the JobSet.
    jobs, service = simulate.jobset_jobs(jobset)
    assert service["metadata"]["name"] == name and service["spec"]["selector"] == {simulate.JOBSET_NAME: name}
    container = job["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "rendezvous")
    assert env["RDZV_ENDPOINT"]["value"] == f"$(JOBSET_NAME)-{rjob['name']}-0-0.$(JOBSET_NAME):{port}"
    assert env["JOB_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        f"metadata.annotations['{simulate.JOBSET_JOB_INDEX}']")
    hostnames = [f"{j['metadata']['name']}-{i}" for j in jobs for i in range(j["spec"]["completions"])]
    assert all(len(h) <= 63 for h in hostnames), hostnames  # a pod hostname is one DNS label


def test_trainjob_wiring():
    runtime, trainjob = one("trainjob.yaml", "TrainingRuntime"), one("trainjob.yaml", "TrainJob")
    ref, trainer = trainjob["spec"]["runtimeRef"], trainjob["spec"]["trainer"]
    assert ref == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": runtime["metadata"]["name"]}
    assert "torch" in runtime["spec"]["mlPolicy"]
    # The torch plugin names pod 0 <trainjob>-node-0-0.<trainjob>: the Job is `node`, no own subdomain.
    template = runtime["spec"]["template"]["spec"]
    assert "subdomain" not in template["network"]
    (rjob,) = template["replicatedJobs"]
    assert rjob["name"] == simulate.TRAINER_NODE
    assert rjob["template"]["metadata"]["labels"] == {simulate.TRAINER_ANCESTOR: "trainer"}
    assert [c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]] == [simulate.TRAINER_NODE]
    # The Trainer refuses a TrainJob setting its reserved variables.
    assert not [e["name"] for e in trainer.get("env", []) if e["name"].startswith("PET_")]
    assert trainer["numProcPerNode"] == int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    built = workload("trainjob.yaml")
    (job,) = [r["template"]["spec"] for r in built["spec"]["replicatedJobs"]]
    assert job["parallelism"] == job["completions"] == trainer["numNodes"]
    node = job["template"]["spec"]["containers"][0]
    assert {"containerPort": simulate.TRAINER_PORT} in node["ports"]
    assert node["resources"] == trainer["resourcesPerNode"] and node["command"] == trainer["command"]
    script = trainer["command"][2]
    assert '--rdzv-endpoint "$PET_MASTER_ADDR:$PET_MASTER_PORT"' in script and "--nnodes" not in script


def test_trainjob_as_the_trainer_builds_it():
    """simulate.trainjob_jobset on a small pair: trainer fields replace the runtime's, resources merge
    key by key, trainer.env replaces a same-named runtime variable in place, PET_* come last."""
    runtime = {"kind": "TrainingRuntime", "metadata": {"name": "rt"}, "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"replicatedJobs": [
            {"name": "init", "template": {"spec": {"template": {"spec": {"containers": [{"name": "x"}]}}}}},
            {"name": "node", "template": {"metadata": {"labels": {simulate.TRAINER_ANCESTOR: "trainer"}}, "spec": {
                "template": {"spec": {"containers": [{
                    "name": "node", "image": "old", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                    "ports": [{"name": "metrics", "containerPort": 9090}],
                    "resources": {"limits": {"cpu": "2", "memory": "1Gi"}}}]}}}}}]}}}}
    trainjob = {"metadata": {"name": "tj"}, "spec": {
        "runtimeRef": {"kind": "TrainingRuntime", "name": "rt"}, "suspend": True,
        "trainer": {"numNodes": 3, "image": "new", "command": ["c"], "env": [{"name": "A", "value": "9"}],
                    "resourcesPerNode": {"limits": {"cpu": "4", "nvidia.com/gpu": 2}}}}}
    built = simulate.trainjob_jobset(trainjob, runtime)
    assert built["metadata"] == {"name": "tj", "labels": {"a": "b"}, "annotations": {}}
    assert built["spec"]["suspend"] is True
    init, node = built["spec"]["replicatedJobs"]
    assert "parallelism" not in init["template"]["spec"]
    assert node["replicas"] == 1 and node["template"]["spec"]["parallelism"] == 3
    c = node["template"]["spec"]["template"]["spec"]["containers"][0]
    assert (c["image"], c["command"]) == ("new", ["c"])
    assert c["resources"] == {"limits": {"cpu": "4", "memory": "1Gi", "nvidia.com/gpu": 2}}
    assert [(e["name"], e.get("value")) for e in c["env"]] == [
        ("A", "9"), ("B", "2"), ("PET_NNODES", "3"), ("PET_NPROC_PER_NODE", "auto"), ("PET_NODE_RANK", None),
        ("PET_MASTER_ADDR", "tj-node-0-0.tj"), ("PET_MASTER_PORT", "29500")]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090}, {"containerPort": 29500}]
    with pytest.raises(ValueError, match="runs on ClusterTrainingRuntime torch-distributed"):
        other = {**trainjob, "spec": {**trainjob["spec"], "runtimeRef": {"name": "torch-distributed"}}}
        simulate.trainjob_jobset(other, runtime)


def test_kubernetes_env_expansion():
    env = {"A": "x"}
    assert simulate.expand("$(A)-$(B)-$$(A)-$A-$(A", env) == "x-$(B)-$(A)-$A-$(A"
    container = {"env": [{"name": "B", "value": "$(C)/$(A)"}, {"name": "A", "value": "1"},
                         {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": True}}}]}
    pod = {"metadata": {"name": "p"}, "spec": {}}
    assert simulate.container_env(container, pod, secrets={}, configmaps={}) == {
        "HOSTNAME": "p", "B": "$(C)/$(A)", "A": "1"}
    container["env"][2]["valueFrom"]["secretKeyRef"]["optional"] = False
    with pytest.raises(LookupError):
        simulate.container_env(container, pod, secrets={}, configmaps={})


def test_substitutions_are_one_pass():
    subs = simulate.Substitutions()
    subs.add("/tmp", "/tmp/pytest-1/mounts/emptydir/tmp")
    subs.add("/mnt/data", "/tmp/pytest-1/mounts/pvc/data")
    subs.add("job-0.svc", "127.0.0.1")
    subs.add("job-0.svc:29400", "127.0.0.1:5555")
    text = "/mnt/data/runs /tmp/x job-0.svc:29400 job-0.svc /tmpfs job-0.svcx"
    assert subs.apply(text) == ("/tmp/pytest-1/mounts/pvc/data/runs /tmp/pytest-1/mounts/emptydir/tmp/x "
                                "127.0.0.1:5555 127.0.0.1 /tmpfs job-0.svcx")


# --- torchrun's world, as each manifest's pods form it ---------------------------------------------

def _jobset_two_jobs() -> dict[str, Any]:
    """jobset.yaml with its 2 nodes as 2 Jobs of 1 pod (replicas 2): pod 0 of Job 0 must still host."""
    jobset = one("jobset.yaml", "JobSet")
    job = jobset["spec"]["replicatedJobs"][0]
    job["replicas"], job["template"]["spec"]["parallelism"], job["template"]["spec"]["completions"] = 2, 1, 1
    return jobset


WORLDS = {
    "torchrun-job": lambda: ("torchrun-job.yaml", one("torchrun-job.yaml", "Job")),
    "jobset": lambda: ("jobset.yaml", one("jobset.yaml", "JobSet")),
    "jobset-2-jobs": lambda: ("jobset.yaml", _jobset_two_jobs()),
    "trainjob": lambda: ("trainjob.yaml", workload("trainjob.yaml")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(WORLDS))
def test_torchrun_world(case, tmp_path):
    """Each pod's command runs (bash, the pod's environment as the controllers and the kubelet make it);
    the torchrun it execs is parsed by torchrun itself, and every pod's agent rendezvouses with the
    others over loopback (DNS names -> 127.0.0.1): one world of nodes x GPUs ranks, each rank once,
    every node on the same endpoint and run id, the store hosted by pod 0 of Job 0, the one the
    endpoint names, and the Indexed Job's training command (trained for real in
    test_torchrun_job_runs_locally) with the job's own run directory."""
    name, doc = WORLDS[case]()
    subs = simulate.Substitutions()
    common = {"root": tmp_path / "mounts", "subs": subs, "configmaps": configmap_data(), "secrets": {}}
    if doc["kind"] == "Job":
        sim = simulate.indexed_job_pods(doc, one(name, "Service"), **common)
    else:
        sim = simulate.jobset_pods(doc, **common)
    for pod in sim:
        address = pod.env.get("RDZV_ENDPOINT") or pod.env["PET_MASTER_ADDR"]
        assert address.startswith("127.0.0.1"), f"{pod.name}: {address} is no pod's DNS name"
        if "PET_MASTER_PORT" in pod.env:  # the Trainer's fixed port: a free one here
            assert pod.env["PET_MASTER_PORT"] == str(simulate.TRAINER_PORT)
            pod.env["PET_MASTER_PORT"] = str(subs.port(simulate.TRAINER_PORT))
    argvs = [simulate.exec_argv(p, base_env=cli_env(), workdir=tmp_path / "exec") for p in sim]
    world = simulate.torchrun_rendezvous(list(zip(sim, argvs)), base_env=cli_env())
    results = [world[p.name] for p in sim]
    nodes, gpus = len(sim), next(p.gpus for p in pods(name) if p.gpus)
    assert nodes == 2
    assert {(r["backend"], r["endpoint"], r["run_id"], r["min_nodes"], r["max_nodes"]) for r in results} == {
        ("c10d", results[0]["endpoint"], doc["metadata"]["name"], nodes, nodes)}
    assert results[0]["endpoint"].startswith("127.0.0.1:")  # a pod's DNS name, substituted
    assert sorted(r["group_rank"] for r in results) == list(range(nodes))
    assert all(r["group_world_size"] == nodes and r["max_restarts"] == 3 for r in results)
    assert all(r["nproc_per_node"] == len(r["workers"]) == gpus for r in results)
    workers = [w for r in results for w in r["workers"]]
    assert sorted(w["RANK"] for w in workers) == list(range(nodes * gpus))
    assert {(w["WORLD_SIZE"], w["MASTER_ADDR"], w["MASTER_PORT"]) for w in workers} == {
        (nodes * gpus, workers[0]["MASTER_ADDR"], workers[0]["MASTER_PORT"])}
    # The store's host: exactly the first pod (job index 0, completion index 0), the one every pod names.
    assert [r["is_host"] for r in results] == [True] + [False] * (nodes - 1), case
    host = sim[0]
    for pod in sim:
        named = pod.raw_env.get("RDZV_ENDPOINT") or pod.raw_env["PET_MASTER_ADDR"]
        assert named.split(":")[0] == f"{host.hostname}.{host.subdomain}", (pod.name, named)
    # The training command: the Indexed Job's, but for the run directory named after the job.
    mounts_dir = tmp_path / "mounts"
    out = mounts_dir / "pvc" / "sft-dist-data" / "runs" / doc["metadata"]["name"]
    assert {(r["entrypoint"], tuple(r["args"])) for r in results} == {("sft-dist", (
        "train", str(mounts_dir / "configmap" / "sft-dist-config" / "config.yaml"),
        "launcher.type=torchrun", f"output_dir={out}"))}


# --- local simulations -----------------------------------------------------------------------------

def _metrics(out: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_trained(out: Path, *, steps: int, world_size: int, launched_by: str) -> None:
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == world_size and summary["launched_by"] == launched_by
    assert summary["global_step"] == steps
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == steps and all(isinstance(x, float) and math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    manifest = json.loads((out / "checkpoints" / f"checkpoint-{steps}" / "manifest.json").read_text())
    assert manifest["step"] == steps and manifest["world_size"] == world_size
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_torchrun_job_runs_locally(tmp_path):
    """The Indexed Job's 2 pods as 2 local process groups: torchrun's c10d rendezvous through the pod-0
    DNS name (-> 127.0.0.1:free port), 1 process each, 4 steps with a checkpoint at steps 2 and 4."""
    svc, job = one("torchrun-job.yaml", "Service"), one("torchrun-job.yaml", "Job")
    subs = simulate.Substitutions()
    pods = simulate.indexed_job_pods(
        job, svc, root=tmp_path / "mounts", subs=subs, configmaps=configmap_data(), secrets={},
        # The container's `args` (more overrides): a short run, checkpoints at 2 and 4.
        extra_args=["training.max_steps=4", "training.save_steps=2"])
    assert [p.env["JOB_COMPLETION_INDEX"] for p in pods] == ["0", "1"]
    assert [p.env["HOSTNAME"] for p in pods] == ["sft-dist-torchrun-0", "sft-dist-torchrun-1"]
    endpoint = pods[0].env["RDZV_ENDPOINT"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", endpoint) and endpoint != "127.0.0.1:29400"
    for pod in pods:
        pod.env["OMP_NUM_THREADS"] = "1"  # 2 cores here, not the pod's 8
    running = [simulate.start(p, base_env=cli_env(), home=tmp_path / "home", logs=tmp_path / "logs") for p in pods]
    try:
        codes = simulate.wait_all(running, timeout_s=300)
    finally:
        for r in running:
            simulate.stop(r)
    logs = "\n".join(simulate.tail(r) for r in running)
    assert codes == {p.name: 0 for p in pods}, f"exit codes {codes}\n{logs}"
    out = tmp_path / "mounts" / "pvc" / "sft-dist-data" / "runs" / job["metadata"]["name"]
    assert Path(pods[0].env["OUTPUT_DIR"]) == out
    _assert_trained(out, steps=4, world_size=2, launched_by="torchrun")


def _ray_launcher_available() -> bool:
    from sft_dist.config.schema import LauncherConfig

    kinds = typing.get_args(typing.get_type_hints(LauncherConfig)["type"])
    return "ray" in kinds and importlib.util.find_spec("sft_dist.distributed.ray_train") is not None


def _wait_http(url: str, *, timeout_s: float, procs: list[simulate.Running]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [r for r in procs if r.proc.poll() is not None]
        assert not dead, "exited early:\n" + "\n".join(simulate.tail(r) for r in dead)
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # up, and refusing us without the token
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout_s} s\n" + "\n".join(simulate.tail(r) for r in procs))


@pytest.mark.slow
def test_rayjob_runs_locally(tmp_path):
    """The RayJob's head and one worker pod as `ray start` process groups on loopback with token auth,
    then what KubeRay's submitter runs (`ray job submit ... -- <entrypoint>`, through bash) against the
    head's dashboard: 2 Ray Train workers (CPU), 4 steps, checkpoints at steps 2 and 4."""
    if not _ray_launcher_available():
        pytest.skip("launcher.type=ray not available")
    rayjob = one("rayjob.yaml", "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token"
    token = secrets.token_hex(32)
    secret_store = {auth["secretName"]: {"auth_token": token}}
    # Short: Ray's per-node socket paths must stay under 108 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="skr", dir="/tmp"))
    subs = simulate.Substitutions()
    root = tmp_path / "mounts"
    gcs, dash = simulate.free_port(), simulate.free_port()
    # Both pods' IP: 127.0.0.2. Ray 2.60 swaps 127.0.0.1 for the machine's outward address; any other
    # loopback address it keeps, so every connection stays on this machine.
    node_ip = "127.0.0.2"
    gcs_address = f"{node_ip}:{gcs}"

    def laptop(extra: dict[str, str]) -> dict[str, str]:
        ports = {k: str(simulate.free_port()) for k in ("dashboard-agent-listen-port", "metrics-export-port")}
        return {"node-ip-address": node_ip, "temp-dir": str(ray_tmp), "object-store-memory": "100000000",
                **ports, **extra}

    common = {"root": root, "subs": subs, "configmaps": configmap_data(), "secrets": secret_store,
              "gcs_address": gcs_address, "auth": auth}
    head = simulate.ray_pod(cluster["headGroupSpec"], head=True, name="sft-dist-ray-head", **common,
                            local_params=laptop({"port": str(gcs), "dashboard-host": "127.0.0.1",
                                                 "dashboard-port": str(dash),
                                                 "ray-client-server-port": str(simulate.free_port())}))
    worker = simulate.ray_pod(cluster["workerGroupSpecs"][0], head=False, name="sft-dist-ray-worker-0", **common,
                              local_params=laptop({"address": gcs_address, "num-gpus": "0", "num-cpus": "2"}))
    simulate.write_configmaps(root, configmap_data(), subs)
    assert head.env["RAY_AUTH_MODE"] == worker.env["RAY_AUTH_MODE"] == "token"
    assert head.env["RAY_AUTH_TOKEN"] == worker.env["RAY_AUTH_TOKEN"] == token
    for pod in (head, worker):
        pod.env["OMP_NUM_THREADS"] = "1"
        pod.env["RAY_USAGE_STATS_ENABLED"] = "0"  # no reports to the internet from a test
    # No GPUs here: the per-worker resources fall back to the default {CPU: 1}; a short run.
    entrypoint = subs.apply(rayjob["spec"]["entrypoint"]) + (
        " launcher.resources_per_worker=null training.max_steps=4 training.save_steps=2")
    home = tmp_path / "home"
    running = []
    try:
        for pod in (head, worker):  # the worker's `ray start` waits for the head's GCS, as in a cluster
            running.append(simulate.start(pod, base_env=cli_env(), home=home, logs=tmp_path / "logs"))
        _wait_http(f"http://127.0.0.1:{dash}/api/version", timeout_s=180, procs=running)
        # KubeRay's submitter: RAY_AUTH_MODE/RAY_AUTH_TOKEN injected from authOptions, the command run by bash.
        client_env = {**cli_env(), "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                      "RAY_USAGE_STATS_ENABLED": "0"}
        submit = subprocess.run(
            ["bash", "-c", (f"ray job submit --address http://127.0.0.1:{dash} --submission-id sft-dist-ray-sim"
                            f" -- {entrypoint}")],
            env=client_env, capture_output=True, text=True, timeout=420, check=False)
        (tmp_path / "logs" / "submit.log").write_text(submit.stdout + submit.stderr)
        logs = "\n".join(simulate.tail(r) for r in running)
        assert submit.returncode == 0, f"{submit.stdout[-4000:]}\n{submit.stderr[-3000:]}\n{logs}"
        with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on: no token, no access
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
    finally:
        for r in reversed(running):
            simulate.stop(r)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = root / "pvc" / "sft-dist-data" / "runs" / rayjob["metadata"]["name"]
    _assert_trained(out, steps=4, world_size=2, launched_by="ray")
