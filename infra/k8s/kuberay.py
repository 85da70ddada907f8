"""KubeRay v1.7.0's own checks of its objects, the ones a JSON schema cannot express.

The operator runs ray-operator/controllers/ray/utils/validation.go on every object before it acts
(one that fails is marked invalid and nothing of it runs), and the API server runs the CRDs'
`x-kubernetes-validations` (CEL) on create. Each rule is a small function in kuberay_cluster.py
(RayClusterSpec) or kuberay_jobs.py (RayJob, RayService, RayCronJob) whose comment names the Go
rule or CEL expression it mirrors, with KubeRay's defaults for fields left out. Left out: rules
about status, CEL rules about changes to an existing object (`self == oldSelf`), and the details
of features that stay off here (GCS fault tolerance backends, TLS, network policy, the history
server): using a gated one is refused, as the operator refuses it without its gate. One rule is
ours, marked so: a RayJob with a clusterSelector must not carry a rayClusterSpec, which KubeRay
would ignore.

    check_kuberay(obj, load_feature_gates()) -> ["spec.ttlSecondsAfterFinished: ...", ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from infra.k8s.kuberay_cluster import check_cluster_spec
from infra.k8s.kuberay_jobs import check_cron_spec, check_initializing_timeout, check_job_spec, check_service_spec
from infra.k8s.names import DNS1035_LABEL, matches

# constant.go: MaxRayClusterNameLength and the lengths derived from it (a RayJob's or RayService's
# cluster is named `<name>-xxxxx`, a RayCronJob's RayJobs `<name>-<minutes since epoch>`).
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47, "RayCronJob": 36}
# features.go: the operator's feature gates and their defaults in v1.7.0; the Helm values the
# operator is installed with (kuberay-operator-values.yaml) override them.
DEFAULT_GATES = {
    "RayClusterStatusConditions": True, "RayJobDeletionPolicy": True, "RayMultiHostIndexing": True,
    "RayServiceIncrementalUpgrade": True, "RayCronJob": False, "SidecarSubmitterRestart": False,
    "RayClusterNetworkPolicy": False, "GCSFaultToleranceEmbeddedStorage": False, "RayClusterMTLS": False,
    "RayClusterHistoryServer": False, "KubernetesWAS": False,
}  # fmt: skip
VALUES_FILE = Path(__file__).resolve().parent / "kuberay-operator-values.yaml"


def load_feature_gates(values_file: Path = VALUES_FILE) -> dict[str, bool]:
    """The gates of an operator installed with this Helm values file."""
    gates = dict(DEFAULT_GATES)
    for gate in (yaml.safe_load(values_file.read_text()) or {}).get("featureGates", []):
        if gate["name"] not in DEFAULT_GATES:
            raise ValueError(f"{values_file}: featureGates: {gate['name']!r} is no KubeRay v1.7.0 gate")
        gates[gate["name"]] = bool(gate["enabled"])
    return gates


def check_kuberay(obj: dict[str, Any], gates: dict[str, bool]) -> list[str]:
    """KubeRay's problems with one ray.io/v1 object (none for other kinds), `path: message`."""
    kind, meta, spec = obj.get("kind"), obj.get("metadata") or {}, obj.get("spec") or {}
    if obj.get("apiVersion") != "ray.io/v1" or kind not in MAX_NAME:
        return []
    problems = check_name(kind, meta.get("name") or "")
    if kind == "RayCluster":
        return problems + check_cluster_spec(spec, "spec", gates)
    if kind == "RayJob":
        return problems + check_job_spec(spec, "spec", gates)
    if kind == "RayService":
        return problems + check_initializing_timeout(meta.get("annotations") or {}) + check_service_spec(spec, gates)
    return problems + check_cron_spec(spec, gates)


def check_name(kind: str, name: str) -> list[str]:
    # validation.go: ValidateRayClusterMetadata, ValidateRayJobMetadata, ValidateRayServiceMetadata
    # (length and DNS-1035 label); ValidateRayCronJobSpec (length: its RayJobs' names are checked)
    if len(name) > MAX_NAME[kind]:
        return [f"metadata.name: {kind} name {name!r} must be no more than {MAX_NAME[kind]} characters"]
    if kind != "RayCronJob" and not matches(DNS1035_LABEL, name, 63):
        return [f"metadata.name: {kind} name {name!r} must be a DNS-1035 label (a-z, 0-9 and '-', starting with a letter)"]
    return []
