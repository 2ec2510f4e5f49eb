"""k8s/ manifests: schema validation (CRDs and core kinds), policies that must not rot, and local
simulations of the torchrun Indexed Job and the KubeRay RayJob that train for real."""

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
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, cli_env
from tests.k8s import schemas, simulate

K8S = ROOT / "k8s"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))
TRAINING_JOBS = ("rayjob.yaml", "torchrun-job.yaml")
CONFIG_MOUNT = "/etc/sft-dist"


def docs(name: str) -> list[dict[str, Any]]:
    return schemas.load_documents(K8S / name)


def one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    folder = schemas.schema_dir()
    if not folder.is_dir():
        pytest.skip(f"CRD schemas not found at {folder} (set {schemas.SCHEMA_ENV} to the k8s-schemas folder)")
    return folder


def job_doc(name: str) -> dict[str, Any]:
    """The Job or RayJob in a manifest file."""
    return next(d for d in docs(name) if d["kind"] in ("Job", "RayJob"))


def configmap_data() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for d in docs("configmap.yaml") if d["kind"] == "ConfigMap"}


def training_config() -> dict[str, Any]:
    return yaml.safe_load(configmap_data()["sft-dist-config"]["config.yaml"])


# --- what each training job runs -------------------------------------------------------------------

def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, pod spec) of every pod a Job or RayJob creates (the RayJob's submitter included)."""
    if doc["kind"] == "Job":
        yield "job", doc["spec"]["template"]["spec"]
    elif doc["kind"] == "RayJob":
        cluster = doc["spec"]["rayClusterSpec"]
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield f"worker:{group['groupName']}", group["template"]["spec"]
        if "submitterPodTemplate" in doc["spec"]:
            yield "submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def training_pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The pods that read the config or write the run: all but the RayJob's submitter."""
    return [(role, spec) for role, spec in pod_specs(doc) if role != "submitter"]


def gpu_pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(role, spec) for role, spec in pod_specs(doc) if role == "job" or role.startswith("worker:")]


def mounts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{mountPath: volume} of the pod's first (training / Ray) container."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in spec["containers"][0].get("volumeMounts", [])}


def train_overrides(doc: dict[str, Any]) -> dict[str, str]:
    """The `key=value` overrides on the job's `sft-dist train` command line, env references resolved."""
    if doc["kind"] == "RayJob":
        command, env = doc["spec"]["entrypoint"], {}
    else:
        container = doc["spec"]["template"]["spec"]["containers"][0]
        command = container["command"][2].replace("\\\n", " ")
        env = {e["name"]: simulate.expand(e["value"], {"JOB_NAME": doc["metadata"]["name"]})
               for e in container["env"] if "value" in e}
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


def checkpoint_dir(doc: dict[str, Any]) -> str:
    cfg, over = training_config(), train_overrides(doc)
    output_dir = over.get("output_dir", cfg["output_dir"])
    return over.get("checkpoint.dir") or (cfg.get("checkpoint") or {}).get("dir") or f"{output_dir}/checkpoints"


# --- schemas ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid(name, crd_dir):
    problems = []
    for doc in docs(name):
        if schemas.is_custom(doc):
            problems += [f"{doc['kind']}: {e}" for e in schemas.custom_resource_errors(doc, crd_dir)]
        else:
            for version in schemas.K8S_VERSIONS:
                problems += [f"{doc['kind']} (k8s {version}): {e}" for e in schemas.core_errors(doc, version)]
    assert not problems, "\n".join(problems)


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


# --- policies --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_gpus_requested_where_training_runs(name):
    doc = job_doc(name)
    for role, spec in pod_specs(doc):
        res = spec["containers"][0].get("resources", {})
        gpus = {k: res.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
        if (role, spec) in gpu_pods(doc):
            assert gpus["limits"] and gpus["requests"] == gpus["limits"], f"{role}: {gpus}"
            assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), role
        else:
            assert gpus == {"requests": None, "limits": None}, f"{role} should not hold GPUs"
    over = train_overrides(doc)
    if doc["kind"] == "RayJob":
        workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        gpu_total = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                        * g["replicas"] for g in workers)
        assert int(over["launcher.num_workers"]) * int(over["launcher.resources_per_worker.GPU"]) == gpu_total
        assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in workers)
        assert over["launcher.type"] == "ray"
    else:
        env = {e["name"]: e.get("value") for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
        limits = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(env["NPROC_PER_NODE"]) == int(limits["nvidia.com/gpu"])
        assert int(env["NNODES"]) == doc["spec"]["completions"] == doc["spec"]["parallelism"]
        assert over["launcher.type"] == "torchrun"


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_pods_are_locked_down_and_have_shm(name):
    doc = job_doc(name)
    stop_grace = training_config()["checkpoint"]["stop_grace_s"]
    for role, spec in pod_specs(doc):
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        assert spec["securityContext"].get("runAsUser", 1000) != 0, role
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{role}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{role}/{c['name']}"
            assert sc.get("privileged") is not True and "add" not in sc.get("capabilities", {})
            assert not c["image"].endswith(":latest") and ":" in c["image"], c["image"]
    for role, spec in training_pods(doc):
        shm = mounts(spec).get("/dev/shm")
        assert shm and shm.get("emptyDir", {}).get("medium") == "Memory", f"{role}: no memory-backed /dev/shm"
        # SIGTERM: every rank finishes its step and checkpoints within stop_grace_s, then exits.
        assert spec["terminationGracePeriodSeconds"] > stop_grace, role


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
    for doc in docs(name):
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


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_checkpoints_on_shared_storage_at_one_path(name):
    doc = job_doc(name)
    claims = {d["metadata"]["name"]: d for d in docs("pvc.yaml")}
    ckpt = checkpoint_dir(doc)
    assert ckpt.startswith("/mnt/sft-dist/runs/") or re.match(r"^(s3|gs|gcs|az|abfs)://", ckpt), ckpt
    pods = training_pods(doc)
    assert len(pods) >= 2 or doc["kind"] == "Job"
    for role, spec in pods:
        m = mounts(spec)
        config_map = m.get(CONFIG_MOUNT, {}).get("configMap", {}).get("name")
        assert "config.yaml" in configmap_data().get(config_map, {}), f"{role}: no config at {CONFIG_MOUNT}"
        if "://" in ckpt:
            continue
        shared = [(path, vol) for path, vol in m.items()
                  if "persistentVolumeClaim" in vol and ckpt.startswith(path.rstrip("/") + "/")]
        assert shared, f"{role}: {ckpt} is not on a mounted PersistentVolumeClaim"
        claim = shared[0][1]["persistentVolumeClaim"]["claimName"]
        assert claim in claims and "ReadWriteMany" in claims[claim]["spec"]["accessModes"], claim
    # Every pod sees the same volume at the same path.
    views = {json.dumps({p: v for p, v in mounts(s).items() if p != "/dev/shm"}, sort_keys=True) for _, s in pods}
    assert len(views) == 1, f"{name}: pods mount different volumes/paths: {views}"
    assert training_config()["training"]["save_strategy"] != "no"


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
