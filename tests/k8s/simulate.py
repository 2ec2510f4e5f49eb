"""Run the pods of k8s/ manifests as local processes, with the environment Kubernetes would give them.

What is taken from the manifests unchanged: the container command/args, the env list (values, `$(VAR)`
expansion, fieldRef/secretKeyRef resolution), the Indexed Job's per-pod facts (JOB_COMPLETION_INDEX,
hostname `<job>-<index>`, subdomain, the job-name/index labels and annotation), the ConfigMap's files, a
RayJob's entrypoint and the `ray start` parameters KubeRay derives from its groups.

What a laptop cannot have, and is stood in for (`Substitutions`, and the callers' own overrides):
- DNS: each pod's name under the headless Service (`<job>-<i>.<service>` and longer forms) -> 127.0.0.1,
  and each Service port on it -> a free local port;
- volumes: a mountPath -> a temp dir (a configMap volume's dir holds the ConfigMap's data as files; every
  pod mounting one PVC gets the same dir; a `medium: Memory` emptyDir at /dev/shm is the host's /dev/shm).
  Paths are rewritten wherever they appear: env values, command, args, the ConfigMap's files;
- the image: this venv (its bin/ first on PATH), HOME a temp dir; Secrets: what the test passes in;
- Ray pods (`ray_pod`): the caller's `ray start` parameters for a pod IP, free ports, a temp dir and
  no GPUs; the variables KubeRay adds (RAY_ADDRESS, and RAY_AUTH_* with token auth) are added here.
tests/k8s/test_manifests.py says, at each simulation, which overrides it appends.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


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
    """Ordered (container text -> local text) replacements; longest first so a DNS name with its port
    is replaced before the bare name."""

    pairs: dict[str, str] = field(default_factory=dict)

    def add(self, old: str, new: str) -> None:
        self.pairs[old] = new

    def apply(self, text: str) -> str:
        for old in sorted(self.pairs, key=len, reverse=True):
            text = text.replace(old, self.pairs[old])
        return text


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


def indexed_job_pods(job: dict[str, Any], service: dict[str, Any], *, root: Path, subs: Substitutions,
                     configmaps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
                     extra_args: list[str] = (), namespace: str = "default") -> list[SimPod]:
    """One SimPod per completion index of an Indexed Job, and the substitutions their pods need."""
    spec, name = job["spec"], job["metadata"]["name"]
    assert spec.get("completionMode") == "Indexed", "not an Indexed Job"
    template = spec["template"]
    subdomain = template["spec"].get("subdomain")
    labels = {**template["metadata"].get("labels", {}), JOB_NAME_LABEL: name, "job-name": name}
    selector = service["spec"].get("selector") or {}
    # A pod has a DNS name only when a headless Service named like its subdomain selects it.
    if subdomain == service["metadata"]["name"] and selector and selector.items() <= labels.items():
        domain = f"{namespace}.svc.cluster.local"
        local_ports = {p["port"]: free_port() for p in service["spec"].get("ports", [])}
        for i in range(spec["completions"]):
            host = f"{name}-{i}"
            for dns in (f"{host}.{subdomain}.{domain}", f"{host}.{subdomain}.{namespace}.svc",
                        f"{host}.{subdomain}.{namespace}", f"{host}.{subdomain}"):
                for port, local in local_ports.items():
                    subs.add(f"{dns}:{port}", f"127.0.0.1:{local}")
                subs.add(dns, "127.0.0.1")
    container = template["spec"]["containers"][0]
    mount_volumes(template["spec"], container, root, subs, configmaps)
    write_configmaps(root, configmaps, subs)
    pods = []
    for i in range(spec["completions"]):
        pod = {
            "metadata": {
                "name": f"{name}-{i}-sim",
                "namespace": namespace,
                "labels": {**labels, COMPLETION_INDEX: str(i)},
                "annotations": {COMPLETION_INDEX: str(i)},
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
                           {k: subs.apply(v) for k, v in env.items()}, index=i))
    return pods


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
