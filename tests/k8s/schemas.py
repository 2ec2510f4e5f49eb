"""Validate Kubernetes manifests offline: custom resources against their CRDs' openAPIV3 schemas, core
kinds (Job, Service, ConfigMap, ...) against the Kubernetes API schemas shipped by kubernetes-validate.

Both are strict about unknown fields. The API server prunes a field that a structural CRD schema does
not list, and drops (or, with `kubectl apply --validate=strict`, refuses) one that a core kind does not
have, so a misspelled `shutdownAfterJobFinish` would otherwise vanish without a word.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The oldest Kubernetes the manifests are written for (podFailurePolicy GA in 1.31, backoffLimitPerIndex
# GA in 1.33, podReplacementPolicy beta and on by default since 1.29) and the newest schema shipped.
K8S_VERSIONS = ("1.33", "1.37")
SCHEMA_ENV = "SFT_DIST_K8S_SCHEMAS"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRD files are 0.5-1.4 MB


def schema_dir() -> Path:
    """The CRD folder: $SFT_DIST_K8S_SCHEMAS, else ../shared/k8s-schemas beside the checkout."""
    env = os.environ.get(SCHEMA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "k8s-schemas"


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a manifest file."""
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d]


def to_json_schema(node: Any) -> Any:
    """A CRD's openAPIV3 schema as JSON Schema (draft 4 semantics), strict like the API server.

    - `nullable: true` adds "null" to the type;
    - `x-kubernetes-int-or-string` is integer or string;
    - an object that lists `properties` refuses other keys (`additionalProperties: false`) unless it
      says `x-kubernetes-preserve-unknown-fields` (the API server would prune them);
    - `x-kubernetes-embedded-resource` objects also take apiVersion/kind/metadata;
    - CEL rules (`x-kubernetes-validations`) and list/map-type hints are not evaluated.
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = to_json_schema(value)
        elif key.startswith("x-kubernetes-") or key in ("nullable", "description", "default", "example"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for name in ("apiVersion", "kind"):
            props.setdefault(name, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in node and "additionalProperties" not in node and \
            not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): JSON schema} for every served version of every CRD in `folder`."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in load_documents(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served", True):
                    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                    found[(f"{group}/{version['name']}", kind)] = schema
    return found


# ObjectMeta fields a manifest may set (the CRD schemas leave the top-level metadata open).
_METADATA_KEYS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}


def custom_resource_errors(doc: dict[str, Any], folder: Path) -> list[str]:
    """Every schema violation of a custom resource, as 'path: message' lines; [] when valid."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    schemas = crd_schemas(folder)
    if key not in schemas:
        known = ", ".join(f"{a} {k}" for a, k in sorted(schemas))
        return [f"no CRD schema for {key[0]} {key[1]} in {folder} (known: {known})"]
    validator = jsonschema.Draft4Validator(schemas[key])
    errors = [f"{_path(e)}: {e.message}" for e in validator.iter_errors(doc)]
    extra = set(doc.get("metadata") or {}) - _METADATA_KEYS
    errors += [f"metadata: unknown field {k!r}" for k in sorted(extra)]
    return sorted(errors)


def core_errors(doc: dict[str, Any], version: str) -> list[str]:
    """The first schema violation of a core kind in Kubernetes `version` (strict), or []."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def is_custom(doc: dict[str, Any]) -> bool:
    """Whether the document is a custom resource (its group is not a built-in Kubernetes API group;
    `*.x-k8s.io` groups, such as jobset.x-k8s.io, are Kubernetes SIG projects installed as CRDs)."""
    api = doc.get("apiVersion", "")
    group = api.split("/")[0] if "/" in api else ""
    return "." in group and (not group.endswith(".k8s.io") or group.endswith(".x-k8s.io"))


# --- structural checks for custom resources whose CRD is not in the schema folder ------------------
#
# JobSet (jobset.x-k8s.io/v1alpha2) and Kubeflow Trainer's TrainingRuntime (trainer.kubeflow.org/v1alpha1)
# are checked by hand-written JSON schemas of their own fields, transcribed from their Go API types
# (kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go @08dfbdf; kubeflow/trainer
# pkg/apis/trainer/v1alpha1/trainingruntime_types.go @8c0f505): every object refuses unknown keys, enums,
# required keys and minimums are those of the CRDs. Every replicatedJobs[].template, a batch/v1
# JobTemplateSpec, is validated as a Job with kubernetes-validate (strict, both K8S_VERSIONS), so the
# pod templates get the same checks as core pods.
# Not validated: CEL rules (e.g. startupPolicy InOrder vs dependsOn), immutability, the webhooks' checks
# (name lengths, ...; tests/k8s/test_manifests.py checks the generated pod hostnames itself), the contents
# of volumeClaimPolicies and of the Trainer's mpi/flux/volcano policies, which these manifests do not use.
# Where the folder does hold a CRD for these kinds, the tests validate against it as well.

def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


_STR, _BOOL, _OPEN = {"type": "string"}, {"type": "boolean"}, {"type": "object"}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_NONNEG = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRS = {"type": "array", "items": _STR}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_DNS1035 = {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
# The ObjectMeta a template may carry (JobTemplateSpec, JobSetTemplateSpec).
_TEMPLATE_META = _obj({"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP,
                       "finalizers": _STRS})

JOBSET_SPEC = _obj({
    "replicatedJobs": {"type": "array", "items": _obj({
        "name": _DNS1035,
        "groupName": _STR,
        "template": _obj({"metadata": _TEMPLATE_META, "spec": _OPEN}),  # spec: validated as a batch/v1 Job
        "replicas": _NONNEG,
        "dependsOn": {"type": "array", "maxItems": 5, "items": _obj(
            {"name": _STR, "status": {"enum": ["Ready", "Complete"]}}, ("name", "status"))},
    }, ("name", "template"))},
    "network": _obj({"enableDNSHostnames": _BOOL, "subdomain": _STR, "publishNotReadyAddresses": _BOOL}),
    "successPolicy": _obj({"operator": {"enum": ["All", "Any"]}, "targetReplicatedJobs": _STRS}, ("operator",)),
    "failurePolicy": _obj({
        "maxRestarts": _INT32,
        "restartStrategy": {"enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]},
        "rules": {"type": "array", "items": _obj({
            "name": _STR,
            "action": {"enum": ["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts",
                                "RestartJob", "RestartJobAndIgnoreMaxRestarts"]},
            "onJobFailureReasons": _STRS, "onJobFailureMessagePatterns": _STRS, "targetReplicatedJobs": _STRS,
        }, ("name", "action"))},
    }),
    "startupPolicy": _obj({"startupPolicyOrder": {"enum": ["AnyOrder", "InOrder"]}}, ("startupPolicyOrder",)),
    "suspend": _BOOL,
    "coordinator": _obj({"replicatedJob": _STR, "jobIndex": _INT32, "podIndex": _INT32}, ("replicatedJob",)),
    "managedBy": _STR,
    "ttlSecondsAfterFinished": _NONNEG,
    "volumeClaimPolicies": {"type": "array", "maxItems": 50},
})

TRAINING_RUNTIME_SPEC = _obj({
    "mlPolicy": _obj({
        "numNodes": _INT32,
        "torch": _obj({"envInjection": _obj({"targets": {"type": "array", "items": _obj(
            {"jobName": _STR, "containerNames": _STRS})}})}),
        "mpi": _OPEN, "flux": _OPEN, "jax": _obj({}), "xgboost": _obj({}),
    }),
    "podGroupPolicy": _obj({"coscheduling": _obj({"scheduleTimeoutSeconds": _INT32}), "volcano": _OPEN}),
    "template": _obj({"metadata": _TEMPLATE_META, "spec": JOBSET_SPEC}),
})


def _resource(spec_schema: dict[str, Any]) -> dict[str, Any]:
    return _obj({"apiVersion": _STR, "kind": _STR, "metadata": _OPEN, "spec": spec_schema}, ("spec",))


STRUCTURAL = {
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): (_resource(JOBSET_SPEC), lambda doc: doc["spec"]),
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"):
        (_resource(TRAINING_RUNTIME_SPEC), lambda doc: doc["spec"].get("template", {}).get("spec", {})),
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"):
        (_resource(TRAINING_RUNTIME_SPEC), lambda doc: doc["spec"].get("template", {}).get("spec", {})),
}


def structural_errors(doc: dict[str, Any], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Every violation of a JobSet or TrainingRuntime against its structural schema, and of each of its
    replicatedJobs' templates as a batch/v1 Job (kubernetes-validate, strict); [] when valid."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key not in STRUCTURAL:
        return [f"no structural schema for {key[0]} {key[1]} (known: {sorted(STRUCTURAL)})"]
    schema, jobset_spec = STRUCTURAL[key]
    errors = [f"{_path(e)}: {e.message}" for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]
    extra = set(doc.get("metadata") or {}) - _METADATA_KEYS
    errors += [f"metadata: unknown field {k!r}" for k in sorted(extra)]
    if errors:
        return sorted(errors)
    for rjob in jobset_spec(doc).get("replicatedJobs", []):
        template = rjob["template"]
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {**template.get("metadata", {}), "name": f"{doc['metadata']['name']}-{rjob['name']}-0"},
               "spec": template.get("spec", {})}
        for version in versions:
            errors += [f"replicatedJobs[{rjob['name']}] as a Job (k8s {version}): {e}"
                       for e in core_errors(job, version)]
    return errors


def _path(e: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in e.absolute_path) or "(root)"
