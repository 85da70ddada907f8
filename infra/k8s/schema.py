"""Rendered manifests against their API schemas, strictly: what `kubectl apply --validate=strict`
refuses, offline.

A ray.io/v1 object is checked against its CRD's openAPIV3Schema as vendored in crds/ (KubeRay
v1.7.0, crds/README.md), read the way the API server reads a structural schema:

1. An object schema is closed unless it says otherwise: a field that neither `properties` nor
   `additionalProperties` names is an unknown field (the server would prune it, and strict
   validation refuses it), unless `x-kubernetes-preserve-unknown-fields: true` keeps it.
2. `x-kubernetes-int-or-string: true` takes an integer or a string ("50%"), nothing else.
3. `x-kubernetes-embedded-resource: true` is a whole object: apiVersion, kind and metadata are
   implied fields (metadata checked as ObjectMeta), apiVersion and kind required.
4. `x-kubernetes-list-type: map` lists have one item per value of their `x-kubernetes-list-map-keys`
   (defaults filled in), `set` lists no repeated item.
5. `format: int32|int64` bound the integer; `nullable` allows null, which is refused anywhere else
   (stricter than the server, which drops it: a null in a manifest is an empty value by mistake).
6. The top-level `metadata` is ObjectMeta, closed (its name rules: names.py and kuberay.py).

Core objects that the manifests carry beside them (Namespace, ConfigMap, Secret,
PersistentVolumeClaim) are checked against the small closed schemas in CORE_SCHEMAS, written for
the fields these manifests use; any other kind is refused as unknown, so nothing goes unchecked.
Every problem is one line, `path: message`, the path in the object (`spec.workerGroupSpecs[0].replicas`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema

CRD_DIR = Path(__file__).resolve().parent / "crds"

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}
_CORE_OBJECT = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": OBJECT_META}
_QUANTITIES = {"type": "object", "additionalProperties": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}
CORE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("v1", "Namespace"): {"type": "object", "properties": {**_CORE_OBJECT, "spec": {
        "type": "object", "properties": {"finalizers": {"type": "array", "items": {"type": "string"}}}}}},
    ("v1", "ConfigMap"): {"type": "object", "properties": {
        **_CORE_OBJECT, "data": _STRING_MAP, "binaryData": _STRING_MAP, "immutable": {"type": "boolean"}}},
    ("v1", "Secret"): {"type": "object", "properties": {
        **_CORE_OBJECT, "data": _STRING_MAP, "stringData": _STRING_MAP, "type": {"type": "string"},
        "immutable": {"type": "boolean"}}},
    ("v1", "PersistentVolumeClaim"): {"type": "object", "required": ["spec"], "properties": {**_CORE_OBJECT, "spec": {
        "type": "object", "required": ["accessModes", "resources"], "properties": {
            "accessModes": {"type": "array", "minItems": 1, "items": {
                "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            "resources": {"type": "object", "required": ["requests"], "properties": {
                "requests": _QUANTITIES, "limits": _QUANTITIES}},
            "storageClassName": {"type": "string"},
            "volumeMode": {"enum": ["Filesystem", "Block"]},
            "volumeName": {"type": "string"},
        }}}},
}  # fmt: skip

INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def load_crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD's openAPIV3Schema, from crds/*.json.gz."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.json.gz")):
        crd = json.loads(gzip.decompress(path.read_bytes()))
        schemas[(crd["apiVersion"], crd["kind"])] = crd["openAPIV3Schema"]
    if not schemas:
        raise ValueError(f"no CRD schemas in {crd_dir} (crds/README.md says how to make them)")
    return schemas


def strict_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD structural schema as JSON Schema, closed where the API server would prune (rules 1-5)."""
    nested = ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf")
    out = {key: value for key, value in node.items() if key not in nested}
    if "properties" in node:
        out["properties"] = {name: strict_schema(child) for name, child in node["properties"].items()}
    if "items" in node:
        out["items"] = strict_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict_schema(child) for child in node[key]]
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = strict_schema(additional)
    elif additional is not None:
        out["additionalProperties"] = additional
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        implied = {name: strict_schema(child) for name, child in _CORE_OBJECT.items()}
        out["properties"] = {**implied, **out.get("properties", {})}
        out["required"] = sorted({*out.get("required", ()), "apiVersion", "kind"})
    if node.get("type") == "object" and additional is None and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("properties", {})
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """Rule 4: one item per key tuple; a key left out counts as its default."""
    if not validator.is_type(instance, "array"):
        return
    properties = schema.get("items", {}).get("properties", {})
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(name, properties.get(name, {}).get("default")) for name in keys)
        if key in seen:
            shown = ", ".join(f"{name}={value}" for name, value in zip(keys, key))
            yield jsonschema.ValidationError(f"[{index}]: duplicate entry ({shown}), as [{seen[key]}]")
        seen[key] = index


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    for name, (low, high) in INT_RANGES.items():
        checker.checks(name)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return checker


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


class SchemaSet:
    """The strict validators of every kind we know, built once (the pod template schema is large)."""

    def __init__(self, crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.validators = {}
        for key, schema in crd_schemas.items():
            strict = strict_schema(schema)
            strict["properties"]["metadata"] = strict_schema(OBJECT_META)  # the CRD says only `type: object`
            self.validators[key] = self._validator(strict)
        for key, schema in CORE_SCHEMAS.items():
            self.validators[key] = self._validator(strict_schema(schema))

    @staticmethod
    def _validator(schema: dict[str, Any]) -> Any:
        return _Validator(schema, format_checker=_format_checker())

    def problems(self, obj: dict[str, Any]) -> list[str]:
        """Every schema problem of one object, `path: message`, sorted by path."""
        key = (obj.get("apiVersion"), obj.get("kind"))
        validator = self.validators.get(key)
        if validator is None:
            known = ", ".join(f"{api}/{kind}" for api, kind in sorted(self.validators))
            return [f"apiVersion/kind: {key[0]}/{key[1]} has no schema here (known: {known})"]
        problems = []
        for error in validator.iter_errors(obj):
            problems.extend(_describe(error))
        return sorted(set(problems))


def format_path(parts: Any) -> str:
    """("spec", "workerGroupSpecs", 0, "replicas") -> "spec.workerGroupSpecs[0].replicas"."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(object)"


def _describe(error: jsonschema.ValidationError) -> list[str]:
    path = format_path(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = error.schema.get("properties", {})
        return [f"{format_path([*error.absolute_path, name])}: unknown field" for name in error.instance if name not in known]
    if error.validator == "x-kubernetes-list-map-keys":
        return [f"{path}{error.message}"]
    return [f"{path}: {error.message}"]
