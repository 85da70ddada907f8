"""Kubernetes' rules for names, labels and annotations (k8s.io/apimachinery/pkg/util/validation),
which the API server applies to every object and KubeRay reuses for its own names.

Each check returns the problems as `path: message` lines; none means valid.
"""

from __future__ import annotations

import re
from typing import Any

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(_LABEL)  # IsDNS1123Label: at most 63
DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")  # IsDNS1123Subdomain: at most 253
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # IsDNS1035Label: at most 63
_QUALIFIED_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")  # at most 63
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")  # at most 63

# kind -> (rule, longest name): what the API server requires of the name of each kind we render.
# Custom resources need a DNS-1123 subdomain; KubeRay narrows its own (kuberay_rules.py).
NAME_RULES = {"Namespace": (DNS1123_LABEL, 63)}
DEFAULT_NAME_RULE = (DNS1123_SUBDOMAIN, 253)


def matches(rule: re.Pattern[str], value: str, longest: int) -> bool:
    return len(value) <= longest and rule.fullmatch(value) is not None


def check_qualified_name(key: str, path: str) -> list[str]:
    """IsQualifiedName: `[prefix/]name`, a DNS-1123 subdomain prefix and a 63-character name."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not matches(DNS1123_SUBDOMAIN, prefix, 253):
        return [f"{path}: key {key!r}: prefix {prefix!r} is not a DNS-1123 subdomain"]
    if not matches(_QUALIFIED_NAME_PART, name, 63):
        return [f"{path}: key {key!r}: {name!r} must be 63 characters or less, alphanumeric, '-', '_' or '.' inside"]
    return []


def check_labels(labels: dict[str, Any], path: str) -> list[str]:
    """Label keys are qualified names, values empty or 63 characters of the same alphabet."""
    problems = []
    for key, value in labels.items():
        problems += check_qualified_name(key, path)
        if not isinstance(value, str) or not matches(_LABEL_VALUE, value, 63):
            problems.append(f"{path}: value {value!r} of {key!r} is not a valid label value")
    return problems


def check_metadata(obj: dict[str, Any]) -> list[str]:
    """The name by its kind's rule, the namespace, label and annotation keys."""
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    problems = []
    rule, longest = NAME_RULES.get(obj.get("kind"), DEFAULT_NAME_RULE)
    if not name:
        problems.append("metadata.name: required")
    elif not matches(rule, name, longest):
        problems.append(f"metadata.name: {name!r} must match {rule.pattern} and be at most {longest} characters")
    namespace = meta.get("namespace")
    if namespace is not None and not matches(DNS1123_LABEL, namespace, 63):
        problems.append(f"metadata.namespace: {namespace!r} is not a DNS-1123 label")
    problems += check_labels(meta.get("labels") or {}, "metadata.labels")
    for key in meta.get("annotations") or {}:
        problems += check_qualified_name(key, "metadata.annotations")
    return problems
