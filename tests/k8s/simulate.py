"""Run the pods of k8s/ manifests as local processes, with the environment Kubernetes would give them.

What is taken from the manifests unchanged: the container command/args, the env list (values, `$(VAR)`
expansion, fieldRef/secretKeyRef resolution), the Indexed Job's per-pod facts (JOB_COMPLETION_INDEX,
hostname `<job>-<index>`, subdomain, the job-name/index labels and annotation), the ConfigMap's files, a
RayJob's entrypoint and the `ray start` parameters KubeRay derives from its groups.

What the controllers add is derived here the way their code does it (the upstream source is named at
each function): the Jobs, pod labels/annotations, hostnames, subdomain and headless Service of a JobSet
(`jobset_jobs`), and the JobSet that Kubeflow Trainer builds from a TrainJob and its TrainingRuntime,
with the PET_* variables and port of its torch plugin (`trainjob_jobset`).

What a laptop cannot have, and is stood in for (`Substitutions`, and the callers' own overrides):
- DNS: each pod's name under the headless Service (`<job>-<i>.<service>` and longer forms) -> 127.0.0.1,
  and each Service port (or, for a JobSet's port-less Service, each container port) on it -> a free
  local port;
- volumes: a mountPath -> a temp dir (a configMap volume's dir holds the ConfigMap's data as files; every
  pod mounting one PVC gets the same dir; a `medium: Memory` emptyDir at /dev/shm is the host's /dev/shm).
  Paths are rewritten wherever they appear: env values, command, args, the ConfigMap's files;
- the image: this venv (its bin/ first on PATH), HOME a temp dir; Secrets: what the test passes in;
  the read-only root filesystem is not enforced (tests/k8s checks that every path written is a mount);
- Ray pods (`ray_pod`): the caller's `ray start` parameters for a pod IP, free ports, a temp dir and
  no GPUs; the variables KubeRay adds (RAY_ADDRESS, and RAY_AUTH_* with token auth) are added here;
- torchrun's world without training (`exec_argv`, `torchrun_rendezvous`): the pod's command runs under
  bash unchanged, except that `exec` records the argv it is given instead of replacing the shell; each
  pod's torchrun arguments then go through torchrun's own parser and agent, which rendezvous with the
  other pods over loopback and assign the worker ranks, without starting the workers.
tests/k8s/test_manifests.py says, at each simulation, which overrides it appends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
ROOT = Path(__file__).resolve().parents[2]

# JobSet's pod labels and annotations (kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go).
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
JOBSET_REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
JOBSET_REPLICAS = "jobset.sigs.k8s.io/replicatedjob-replicas"
JOBSET_JOB_INDEX = "jobset.sigs.k8s.io/job-index"
JOBSET_GLOBAL_INDEX = "jobset.sigs.k8s.io/job-global-index"
JOBSET_JOB_KEY = "jobset.sigs.k8s.io/job-key"
JOBSET_RESTARTS = "jobset.sigs.k8s.io/restart-attempt"

# Kubeflow Trainer (kubeflow/trainer pkg/constants/constants.go).
TRAINER_ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_NODE = "node"          # the trainer's replicatedJob and container, as PET_MASTER_ADDR names them
TRAINER_PORT = 29500           # ContainerTrainerPort: PET_MASTER_PORT, added to the node container's ports


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of env values, command and args: a defined VAR is replaced, an
    undefined one is left as written, `$$` is a literal `$`; shell syntax such as `$VAR` passes through."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


def _field(pod: dict[str, Any], path: str) -> str:
    """A downward-API fieldRef (metadata.name / namespace / labels['k'] / annotations['k'])."""
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return meta.get(m.group(1), {})[m.group(2)]
    if path in ("metadata.name", "metadata.namespace"):
        return meta[path.split(".")[1]]
    if path == "status.podIP":
        return "127.0.0.1"
    raise NotImplementedError(f"fieldRef {path!r} is not simulated")


def container_env(container: dict[str, Any], pod: dict[str, Any], *,
                  secrets: Mapping[str, Mapping[str, str]], configmaps: Mapping[str, Mapping[str, str]]
                  ) -> dict[str, str]:
    """The container's environment as the kubelet builds it: in list order, each value expanded with the
    variables defined above it; a missing optional secret/configMap key leaves the variable unset."""
    if container.get("envFrom"):
        raise NotImplementedError("envFrom is not simulated")
    env = {"HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"]}
    for item in container.get("env", []):
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        src = item["valueFrom"]
        if "fieldRef" in src:
            env[name] = _field(pod, src["fieldRef"]["fieldPath"])
            continue
        kind, store = ("secretKeyRef", secrets) if "secretKeyRef" in src else ("configMapKeyRef", configmaps)
        if kind not in src:
            raise NotImplementedError(f"env {name}: {sorted(src)} is not simulated")
        ref = src[kind]
        value = store.get(ref["name"], {}).get(ref["key"])
        if value is not None:
            env[name] = value
        elif not ref.get("optional", False):
            # The kubelet would not start the container (CreateContainerConfigError).
            raise LookupError(f"env {name}: {kind} {ref['name']}/{ref['key']} does not exist")
    return env


@dataclass
class Substitutions:
    """(container text -> local text) replacements, made in one pass: at each position the longest
    match wins (a DNS name with its port before the bare name), only where it ends a name or path
    component, and a replacement is never rewritten again (the local /tmp dir standing in for /tmp
    is itself under /tmp)."""

    pairs: dict[str, str] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # a pod's port -> the free local port standing in

    def add(self, old: str, new: str) -> None:
        self.pairs[old] = new

    def port(self, port: int) -> int:
        """The local port standing in for `port` on every simulated pod (one per port number)."""
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def apply(self, text: str) -> str:
        if not self.pairs:
            return text
        keys = "|".join(re.escape(k) for k in sorted(self.pairs, key=len, reverse=True))
        return re.sub(f"(?:{keys})(?![A-Za-z0-9_-])", lambda m: self.pairs[m.group(0)], text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mount_volumes(pod_spec: dict[str, Any], container: dict[str, Any], root: Path, subs: Substitutions,
                  configmaps: Mapping[str, Mapping[str, str]]) -> None:
    """Give each of the container's mounts a local dir under `root` (one per volume source) and record
    the path substitution; configMap volumes get their data written after all paths are known."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        if "emptyDir" in vol and vol["emptyDir"].get("medium") == "Memory" and mount["mountPath"] == "/dev/shm":
            continue  # the host's /dev/shm
        if "configMap" in vol:
            local = root / "configmap" / vol["configMap"]["name"]
        elif "persistentVolumeClaim" in vol:
            local = root / "pvc" / vol["persistentVolumeClaim"]["claimName"]
        elif "emptyDir" in vol:
            local = root / "emptydir" / mount["name"]
        else:
            raise NotImplementedError(f"volume {vol['name']}: {sorted(vol)} is not simulated")
        local.mkdir(parents=True, exist_ok=True)
        subs.add(mount["mountPath"], str(local))


def write_configmaps(root: Path, configmaps: Mapping[str, Mapping[str, str]], subs: Substitutions) -> None:
    for name, data in configmaps.items():
        folder = root / "configmap" / name
        if folder.is_dir():
            for key, text in data.items():
                (folder / key).write_text(subs.apply(text), encoding="utf-8")


@dataclass
class SimPod:
    name: str
    argv: list[str]
    env: dict[str, str]  # the container's variables only
    index: int | None = None
    labels: dict[str, str] = field(default_factory=dict)  # as the controllers label the pod
    raw_env: dict[str, str] = field(default_factory=dict)  # `env` before the local substitutions
    hostname: str | None = None
    subdomain: str | None = None


def indexed_job_pods(job: dict[str, Any], service: dict[str, Any], *, root: Path, subs: Substitutions,
                     configmaps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
                     extra_args: list[str] = (), namespace: str = "default") -> list[SimPod]:
    """One SimPod per completion index of an Indexed Job, and the substitutions their pods need."""
    register_dns(job, service, subs=subs, namespace=namespace)
    return _indexed_pods(job, root=root, subs=subs, configmaps=configmaps, secrets=secrets,
                         extra_args=extra_args, namespace=namespace)


def job_pod_labels(job: dict[str, Any]) -> dict[str, str]:
    """The labels the Job controller gives a pod of `job` (besides the completion index)."""
    name = job["metadata"]["name"]
    return {**job["spec"]["template"].get("metadata", {}).get("labels", {}), JOB_NAME_LABEL: name, "job-name": name}


def register_dns(job: dict[str, Any], service: dict[str, Any], *, subs: Substitutions, namespace: str) -> None:
    """Map the DNS names of the Indexed Job's pods to loopback, and their ports to free local ports.

    A pod has a DNS name only when a headless Service named like its subdomain selects it: then
    `<hostname>.<subdomain>` (and the longer forms) resolve, on the Service's ports, or on any port when the
    Service lists none (as a JobSet's does) - the container ports stand in for those."""
    spec, name = job["spec"], job["metadata"]["name"]
    assert spec.get("completionMode") == "Indexed", "not an Indexed Job"
    template = spec["template"]
    subdomain = template["spec"].get("subdomain")
    selector = service["spec"].get("selector") or {}
    headless = service["spec"].get("clusterIP") == "None"
    if not (headless and subdomain == service["metadata"]["name"] and selector
            and selector.items() <= job_pod_labels(job).items()):
        return
    ports = [p["port"] for p in service["spec"].get("ports", [])] or [
        p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])]
    domain = f"{namespace}.svc.cluster.local"
    for i in range(spec["completions"]):
        host = f"{name}-{i}"
        for dns in (f"{host}.{subdomain}.{domain}", f"{host}.{subdomain}.{namespace}.svc",
                    f"{host}.{subdomain}.{namespace}", f"{host}.{subdomain}"):
            for port in ports:
                subs.add(f"{dns}:{port}", f"127.0.0.1:{subs.port(port)}")
            subs.add(dns, "127.0.0.1")


def _indexed_pods(job: dict[str, Any], *, root: Path, subs: Substitutions,
                  configmaps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
                  extra_args: list[str], namespace: str) -> list[SimPod]:
    spec, name = job["spec"], job["metadata"]["name"]
    template = spec["template"]
    container = template["spec"]["containers"][0]
    mount_volumes(template["spec"], container, root, subs, configmaps)
    write_configmaps(root, configmaps, subs)
    pods = []
    for i in range(spec["completions"]):
        meta = template.get("metadata", {})
        pod = {
            "metadata": {
                "name": f"{name}-{i}-sim",
                "namespace": namespace,
                "labels": {**job_pod_labels(job), COMPLETION_INDEX: str(i)},
                "annotations": {**meta.get("annotations", {}), COMPLETION_INDEX: str(i)},
            },
            "spec": {**template["spec"], "hostname": f"{name}-{i}"},
        }
        # The Job controller appends JOB_COMPLETION_INDEX after the template's env list, so variables
        # above it cannot refer to it; command and args can.
        with_index = {**container, "env": [*container.get("env", []), {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}}]}
        env = container_env(with_index, pod, secrets=secrets, configmaps=configmaps)
        argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", []), *extra_args]]
        pods.append(SimPod(pod["metadata"]["name"], [subs.apply(a) for a in argv],
                           {k: subs.apply(v) for k, v in env.items()}, index=i,
                           labels=pod["metadata"]["labels"], raw_env=env, hostname=f"{name}-{i}",
                           subdomain=template["spec"].get("subdomain")))
    return pods


# --- JobSet ----------------------------------------------------------------------------------------

def jobset_jobs(jobset: dict[str, Any], *, namespace: str = "default") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The Jobs and the headless Service the JobSet controller creates (jobset pkg/controllers/
    jobset_controller.go: constructJob, labelAndAnnotateObject, createHeadlessSvcIfNecessary, with the
    webhook's defaults: completionMode Indexed, enableDNSHostnames and publishNotReadyAddresses true).

    Job `<jobset>-<replicatedJob>-<i>` for each of a replicatedJob's `replicas`; its pod template gets the
    JobSet keys as labels and as annotations, and, with DNS hostnames on, subdomain = network.subdomain
    or the JobSet's name, which is also the Service's name; the Service selects the JobSet's pods."""
    name, spec = jobset["metadata"]["name"], jobset["spec"]
    network = spec.get("network") or {}
    dns = network.get("enableDNSHostnames", True)
    subdomain = network.get("subdomain") or name
    jobs, global_index = [], 0
    for rjob in spec["replicatedJobs"]:
        replicas = rjob.get("replicas", 1)
        for i in range(replicas):
            job_name = f"{name}-{rjob['name']}-{i}"
            keys = {JOBSET_NAME: name, JOBSET_REPLICATED_JOB: rjob["name"], JOBSET_REPLICAS: str(replicas),
                    JOBSET_JOB_INDEX: str(i), JOBSET_GLOBAL_INDEX: str(global_index), JOBSET_RESTARTS: "0",
                    JOBSET_JOB_KEY: hashlib.sha1(f"{namespace}/{job_name}".encode()).hexdigest()}
            global_index += 1
            job_spec = copy.deepcopy(rjob["template"]["spec"])
            job_spec.setdefault("completionMode", "Indexed")
            job_spec["template"].setdefault("spec", {}).setdefault("restartPolicy", "OnFailure")
            meta = job_spec["template"].setdefault("metadata", {})
            meta["labels"] = {**meta.get("labels", {}), **keys}
            meta["annotations"] = {**meta.get("annotations", {}), **keys}
            if dns:
                job_spec["template"]["spec"]["subdomain"] = subdomain
            job_spec.setdefault("completions", job_spec.get("parallelism", 1))
            jobs.append({"apiVersion": "batch/v1", "kind": "Job",
                         "metadata": {"name": job_name, "namespace": namespace,
                                      "labels": {**rjob["template"].get("metadata", {}).get("labels", {}), **keys}},
                         "spec": job_spec})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": subdomain, "namespace": namespace},
               "spec": {"clusterIP": "None", "selector": {JOBSET_NAME: name},
                        "publishNotReadyAddresses": network.get("publishNotReadyAddresses", True)}}
    return jobs, service


def jobset_pods(jobset: dict[str, Any], *, root: Path, subs: Substitutions,
                configmaps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
                extra_args: list[str] = (), namespace: str = "default") -> list[SimPod]:
    """One SimPod per pod of every Job of a JobSet, in job then completion-index order; every pod's DNS
    name is registered before any pod's environment is built, so a pod may name a pod of another Job."""
    jobs, service = jobset_jobs(jobset, namespace=namespace)
    for job in jobs:
        register_dns(job, service, subs=subs, namespace=namespace)
    return [pod for job in jobs for pod in _indexed_pods(job, root=root, subs=subs, configmaps=configmaps,
                                                         secrets=secrets, extra_args=extra_args,
                                                         namespace=namespace)]


# --- Kubeflow Trainer ------------------------------------------------------------------------------

def _upsert(items: list[dict[str, Any]], new: list[dict[str, Any]], same) -> None:
    """kubeflow/trainer pkg/apply: replace the first item `same` as a new one, else append it."""
    for item in new:
        for k, old in enumerate(items):
            if same(old, item):
                items[k] = copy.deepcopy(item)
                break
        else:
            items.append(copy.deepcopy(item))


def trainjob_jobset(trainjob: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The JobSet Kubeflow Trainer creates for a TrainJob on a (Cluster)TrainingRuntime with the torch ML
    policy (kubeflow/trainer @8c0f505: pkg/runtime/core/trainingruntime.go newRuntimeInfo,
    plugins/torch/torch.go EnforceMLPolicy, plugins/jobset/builder.go Trainer, jobset.go Build):

    - named like the TrainJob, from the runtime's template (its labels and annotations too);
    - the replicatedJob labelled `trainjob-ancestor-step: trainer`: replicas 1, parallelism = completions
      = trainer.numNodes (else mlPolicy.numNodes); its container `node` gets trainer.image/command/args,
      resourcesPerNode merged key by key into its requests/limits, trainer.env upserted, then PET_NNODES,
      PET_NPROC_PER_NODE (numProcPerNode, else "auto" with GPUs, else the CPU count), PET_NODE_RANK (the
      completion index), PET_MASTER_ADDR `<trainjob>-node-0-0.<trainjob>`, PET_MASTER_PORT 29500, and
      port 29500;
    - spec.suspend from the TrainJob.
    Not simulated (NotImplementedError): runtimePatches, initializers, other ML policies."""
    spec = trainjob["spec"]
    ref = spec["runtimeRef"]
    if (ref.get("kind", "ClusterTrainingRuntime"), ref["name"]) != (runtime["kind"], runtime["metadata"]["name"]):
        raise ValueError(f"the TrainJob runs on {ref.get('kind', 'ClusterTrainingRuntime')} {ref['name']}, "
                         f"not on {runtime['kind']} {runtime['metadata']['name']}")
    for unsupported in ("runtimePatches", "initializer"):
        if spec.get(unsupported):
            raise NotImplementedError(f"TrainJob spec.{unsupported} is not simulated")
    policy = runtime["spec"].get("mlPolicy") or {}
    if "torch" not in policy:
        raise NotImplementedError(f"only the torch ML policy is simulated, not {sorted(policy)}")
    name, trainer = trainjob["metadata"]["name"], spec.get("trainer") or {}
    template = copy.deepcopy(runtime["spec"]["template"])
    jobset_spec = template["spec"]
    for rjob in jobset_spec["replicatedJobs"]:
        if rjob["template"].get("metadata", {}).get("labels", {}).get(TRAINER_ANCESTOR) != "trainer":
            continue
        count = trainer.get("numNodes", policy.get("numNodes", 1))
        rjob["replicas"] = 1
        job = rjob["template"]["spec"]
        job["parallelism"] = job["completions"] = count
        node = next(c for c in job["template"]["spec"]["containers"] if c["name"] == TRAINER_NODE)
        for key in ("image", "command", "args"):
            if key in trainer:
                node[key] = copy.deepcopy(trainer[key])
        resources = node.setdefault("resources", {})
        for kind, values in (trainer.get("resourcesPerNode") or {}).items():
            resources[kind] = {**resources.get(kind, {}), **values}
        limits = {**resources.get("requests", {}), **resources.get("limits", {})}
        if "numProcPerNode" in trainer:
            nproc = str(trainer["numProcPerNode"])
        elif int(limits.get("nvidia.com/gpu", 0)):
            nproc = "auto"
        else:
            nproc = str(max(1, _cpus(limits.get("cpu", "1"))))
        env = node.setdefault("env", [])
        by_name = lambda a, b: a["name"] == b["name"]  # noqa: E731
        _upsert(env, trainer.get("env", []), by_name)
        _upsert(env, [{"name": "PET_NNODES", "value": str(count)},
                      {"name": "PET_NPROC_PER_NODE", "value": nproc},
                      {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                          "fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
                      {"name": "PET_MASTER_ADDR", "value": f"{name}-{TRAINER_NODE}-0-0.{name}"},
                      {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}], by_name)
        _upsert(node.setdefault("ports", []), [{"containerPort": TRAINER_PORT}],
                lambda a, b: a.get("containerPort") == b["containerPort"] or a.get("name") == b.get("name"))
    if "suspend" in spec:
        jobset_spec["suspend"] = spec["suspend"]
    meta = template.get("metadata", {})
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": name, "labels": dict(meta.get("labels", {})),
                         "annotations": dict(meta.get("annotations", {}))},
            "spec": jobset_spec}


# --- torchrun's world, without training ------------------------------------------------------------

# BASH_ENV is sourced by a non-interactive bash before the command's script: there `exec` becomes a
# function (bash looks functions up before builtins) that writes its arguments NUL-separated and exits.
_EXEC_RECORDER = 'exec() { printf "%s\\0" "$@" > "$SIM_EXEC_ARGV"; builtin exit 0; }\n'


def exec_argv(pod: SimPod, *, base_env: Mapping[str, str], workdir: Path) -> list[str]:
    """The argv the pod's bash command `exec`s (its launcher and the launcher's arguments), from running
    the command unchanged with the pod's environment, `exec` recorded instead of performed."""
    if Path(pod.argv[0]).name != "bash":
        raise NotImplementedError(f"{pod.name}: only bash commands are simulated, not {pod.argv[0]}")
    workdir.mkdir(parents=True, exist_ok=True)
    recorder, out = workdir / f"{pod.name}.bashenv", workdir / f"{pod.name}.argv"
    recorder.write_text(_EXEC_RECORDER)
    out.unlink(missing_ok=True)
    env = {**base_env, **pod.env, "BASH_ENV": str(recorder), "SIM_EXEC_ARGV": str(out)}
    r = subprocess.run(pod.argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0 or not out.is_file():
        raise AssertionError(f"{pod.name}: the command exited {r.returncode} without exec\n{r.stdout}{r.stderr}")
    return out.read_bytes().decode().split("\0")[:-1]


def torchrun_rendezvous(pods: list[tuple[SimPod, list[str]]], *, base_env: Mapping[str, str],
                        timeout_s: float = 180) -> dict[str, dict[str, Any]]:
    """Each pod's `torchrun <args>` (from `exec_argv`) as a process of its own with the pod's environment,
    running torchrun's parser and agent up to the rendezvous and rank assignment (`rendezvous_main`):
    {pod name: what the agent decided}. Raises with every pod's output if one fails or the time runs out."""
    procs = []
    for pod, argv in pods:
        if argv[0] != "torchrun":
            raise AssertionError(f"{pod.name} execs {argv[0]}, not torchrun")
        code = "import sys; from tests.k8s.simulate import rendezvous_main; rendezvous_main(sys.argv[1:])"
        procs.append((pod, subprocess.Popen([sys.executable, "-c", code, *argv[1:]], cwd=ROOT,
                                            env={**base_env, **pod.env}, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, start_new_session=True)))
    results, outputs = {}, []
    deadline = time.monotonic() + timeout_s
    try:
        for pod, proc in procs:
            try:
                stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stdout, stderr = "", f"(no answer in {timeout_s} s)"
            outputs.append(f"--- {pod.name} (exit {proc.returncode})\n{stdout[-2000:]}{stderr[-4000:]}")
            if proc.returncode == 0:
                results[pod.name] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if len(results) != len(procs):
        raise AssertionError("torchrun rendezvous failed:\n" + "\n".join(outputs))
    return results


def rendezvous_main(args: list[str]) -> None:
    """One pod's torchrun, up to the moment it would start the workers: parse `args` as torchrun does
    (PET_* variables included), build the agent as torch.distributed.launcher.api.launch_agent does, run
    its rendezvous and rank assignment (`SimpleElasticAgent._rendezvous`, the first step of `run`), print
    the result (and each worker's RANK, WORLD_SIZE, MASTER_ADDR... as torchrun would set them) as JSON."""
    from torch.distributed import run
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry
    from torch.distributed.launcher.api import _get_addr_and_port

    parsed = run.parse_args(args)
    config, entrypoint, entry_args = run.config_from_args(parsed)
    params = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint,
                                  run_id=config.run_id, min_nodes=config.min_nodes, max_nodes=config.max_nodes,
                                  local_addr=config.local_addr, **config.rdzv_configs)
    master_addr, master_port = _get_addr_and_port(params)
    spec = WorkerSpec(role=config.role, local_world_size=config.nproc_per_node, entrypoint=entrypoint,
                      args=tuple(entry_args), rdzv_handler=registry.get_rendezvous_handler(params),
                      max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
                      master_addr=master_addr, master_port=master_port, local_addr=config.local_addr)
    agent = LocalElasticAgent(spec=spec, logs_specs=config.logs_specs, start_method=config.start_method)
    group = agent._worker_group
    agent._rendezvous(group)
    is_host = params.get_as_bool("is_host", False)
    result = {
        "backend": config.rdzv_backend, "endpoint": config.rdzv_endpoint, "run_id": config.run_id,
        "min_nodes": config.min_nodes, "max_nodes": config.max_nodes, "nproc_per_node": config.nproc_per_node,
        "max_restarts": config.max_restarts, "rdzv_configs": {k: str(v) for k, v in config.rdzv_configs.items()},
        "is_host": is_host, "entrypoint": entrypoint, "args": list(entry_args),
        "group_rank": group.group_rank, "group_world_size": group.group_world_size,
        "workers": [{"RANK": w.global_rank, "LOCAL_RANK": w.local_rank, "GROUP_RANK": group.group_rank,
                     "ROLE_RANK": w.role_rank, "LOCAL_WORLD_SIZE": spec.local_world_size,
                     "WORLD_SIZE": w.world_size, "GROUP_WORLD_SIZE": group.group_world_size,
                     "MASTER_ADDR": group.master_addr, "MASTER_PORT": group.master_port,
                     "TORCHELASTIC_RUN_ID": spec.rdzv_handler.get_run_id()} for w in group.workers],
    }
    # The store lives in the host's agent: it leaves last, once every other agent has its result.
    store = group.store
    store.add("sim/done", 1)
    _wait_count(store, "sim/done", group.group_world_size)
    if is_host:
        _wait_count(store, "sim/left", group.group_world_size - 1)
    else:
        store.add("sim/left", 1)
    spec.rdzv_handler.shutdown()
    print(json.dumps(result), flush=True)


def _wait_count(store: Any, key: str, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {store.add(key, 0)} of {n} agents after {timeout_s} s")
        time.sleep(0.05)


def kuberay_start_params(group: dict[str, Any], *, head: bool) -> dict[str, str]:
    """`ray start` parameters as KubeRay derives them: rayStartParams, plus --num-cpus / --num-gpus /
    --memory from the Ray container's limits (requests if no limits) where rayStartParams do not say."""
    params = dict(group.get("rayStartParams") or {})
    res = group["template"]["spec"]["containers"][0].get("resources", {})
    limits = {**res.get("requests", {}), **res.get("limits", {})}
    if "cpu" in limits:
        params.setdefault("num-cpus", str(_cpus(limits["cpu"])))
    if "nvidia.com/gpu" in limits:
        params.setdefault("num-gpus", str(limits["nvidia.com/gpu"]))
    if "memory" in limits:
        params.setdefault("memory", str(_bytes(limits["memory"])))
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    return params


def kuberay_pod_labels(rayjob: dict[str, Any], role: str, cluster_name: str) -> dict[str, str]:
    """The labels KubeRay gives a RayJob's pods (ray-operator controllers/ray/common/pod.go labelPod;
    rayjob_controller.go for the submitter, which runs as a batch Job named like the RayJob). `role`:
    "head", "worker:<group>" or "submitter"; `cluster_name` stands in for the generated RayCluster name."""
    spec = rayjob["spec"]
    if role == "submitter":
        labels = {**spec["submitterPodTemplate"].get("metadata", {}).get("labels", {}),
                  "ray.io/originated-from-cr-name": rayjob["metadata"]["name"],
                  "ray.io/originated-from-crd": "RayJob", "app.kubernetes.io/created-by": "kuberay-operator"}
        return {**labels, JOB_NAME_LABEL: rayjob["metadata"]["name"], "job-name": rayjob["metadata"]["name"]}
    cluster = spec["rayClusterSpec"]
    if role == "head":
        node_type, group_name, template = "head", "headgroup", cluster["headGroupSpec"]["template"]
    else:
        group_name = role.split(":", 1)[1]
        node_type = "worker"
        template = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == group_name)["template"]
    fixed = {"ray.io/cluster": cluster_name, "ray.io/node-type": node_type, "ray.io/group": group_name}
    labels = {"ray.io/is-ray-node": "yes", **fixed, "ray.io/identifier": f"{cluster_name}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update((k, v) for k, v in template.get("metadata", {}).get("labels", {}).items() if k not in fixed)
    return labels


def _cpus(q: Any) -> int:
    s = str(q)
    return max(1, int(s[:-1]) // 1000) if s.endswith("m") else int(float(s))


def _bytes(q: Any) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", str(q))
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def ray_pod(group: dict[str, Any], *, head: bool, name: str, root: Path, subs: Substitutions,
            configmaps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
            gcs_address: str, auth: Mapping[str, Any] | None, local_params: Mapping[str, str],
            namespace: str = "default") -> SimPod:
    """A KubeRay head or worker pod: `ray start [--head] --block <params>`, `local_params` over the
    derived ones (the laptop's substitutions: loopback, free ports, no GPUs), and the variables the
    operator adds where the container does not set them: RAY_ADDRESS (the head's GCS) and, with
    `authOptions.mode: token`, RAY_AUTH_MODE and RAY_AUTH_TOKEN (the Secret's key `auth_token`)."""
    spec = group["template"]["spec"]
    container = copy.deepcopy(spec["containers"][0])
    names = {e["name"] for e in container.get("env", [])}
    added = [{"name": "RAY_ADDRESS", "value": gcs_address}]
    if auth and auth.get("mode") == "token":
        added += [{"name": "RAY_AUTH_MODE", "value": "token"},
                  {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": auth["secretName"],
                                                                            "key": "auth_token"}}}]
    container["env"] = [*container.get("env", []), *(e for e in added if e["name"] not in names)]
    mount_volumes(spec, container, root, subs, configmaps)
    pod = {"metadata": {"name": name, "namespace": namespace,
                        "labels": group["template"].get("metadata", {}).get("labels", {}), "annotations": {}},
           "spec": {**spec, "hostname": name}}
    env = container_env(container, pod, secrets=secrets, configmaps=configmaps)
    params = {**kuberay_start_params(group, head=head), **local_params}
    argv = ["ray", "start", *(["--head"] if head else []), "--block",
            *(f"--{k}={v}" for k, v in sorted(params.items()))]
    return SimPod(name, argv, {k: subs.apply(v) for k, v in env.items()})


@dataclass
class Running:
    pod: SimPod
    proc: subprocess.Popen
    log: Path


def start(pod: SimPod, *, base_env: Mapping[str, str], home: Path, logs: Path) -> Running:
    """Start the pod's command in a session (process group) of its own, output to logs/<name>.log."""
    env = {**base_env, **pod.env, "HOME": str(home)}
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{pod.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(pod.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Running(pod, proc, log)


def stop(running: Running, *, grace_s: float = 5.0) -> None:
    """SIGTERM the pod's process group, SIGKILL it after `grace_s` (Ray's head ignores SIGTERM)."""
    pgid = running.proc.pid
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if running.proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.2)
    running.proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def wait_all(pods: list[Running], *, timeout_s: float) -> dict[str, int | None]:
    """Wait until every pod's command exits (or one fails, or the timeout): {name: exit code or None}."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = {r.pod.name: r.proc.poll() for r in pods}
        if all(c is not None for c in codes.values()) or any(c not in (None, 0) for c in codes.values()):
            break
        time.sleep(0.5)
    return {r.pod.name: r.proc.poll() for r in pods}


def tail(running: Running, n: int = 60) -> str:
    lines = running.log.read_text(errors="replace").splitlines()
    return f"--- {running.pod.name} (last {n} lines) ---\n" + "\n".join(lines[-n:])
