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
    """Whether the document is a custom resource (its group is not a built-in Kubernetes API group)."""
    api = doc.get("apiVersion", "")
    group = api.split("/")[0] if "/" in api else ""
    return "." in group and not group.endswith(".k8s.io")


def _path(e: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in e.absolute_path) or "(root)"
