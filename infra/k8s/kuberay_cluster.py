"""KubeRay v1.7.0's checks of a RayClusterSpec (validation.go: ValidateRayClusterSpec), which a
RayCluster, a RayJob's rayClusterSpec and a RayService's rayClusterConfig all go through.
kuberay.py says which rules are here and which are left out, and why."""

from __future__ import annotations

import re
from typing import Any

from infra.k8s.names import check_labels

MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"


def containers_of(group: dict[str, Any]) -> list[dict[str, Any]]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def env_value(group: dict[str, Any], name: str) -> str | None:
    """The value of env var `name` in the group's Ray container (utils.RayContainerIndex: 0)."""
    containers = containers_of(group)
    for var in (containers[0].get("env") or []) if containers else []:
        if var.get("name") == name:
            return var.get("value", "")
    return None


def parse_version(text: str) -> tuple[int, ...] | None:
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(part or 0) for part in match.groups()) if match else None


def check_cluster_spec(spec: dict[str, Any], path: str, gates: dict[str, bool]) -> list[str]:
    head = spec.get("headGroupSpec") or {}
    autoscaling = spec.get("enableInTreeAutoscaling") is True  # utils.IsAutoscalingEnabled
    problems = []
    # validation.go: "headGroupSpec should have at least one container" (and the same of each worker group)
    if not containers_of(head):
        problems.append(f"{path}.headGroupSpec.template.spec.containers: headGroupSpec should have at least one container")
    problems += check_group(head, f"{path}.headGroupSpec", "Head")
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        group_path = f"{path}.workerGroupSpecs[{index}]"
        if not containers_of(group):
            problems.append(f"{group_path}.template.spec.containers: workerGroupSpec should have at least one container")
        problems += check_group(group, group_path, group.get("groupName", "?"))
        problems += check_worker_replicas(group, group_path, autoscaling)
        problems += check_worker_autoscaler_fields(group, group_path, spec)
    problems += check_autoscaler(spec, path, autoscaling)
    problems += check_auth(spec, path)
    problems += check_gated_fields(spec, path, gates)
    problems += check_managed_by(spec, path)
    if (head.get("rayStartParams") or {}).get("redis-username") or env_value(head, "REDIS_USERNAME") is not None:
        # validation.go: "cannot set redis username in rayStartParams or environment variables"
        problems.append(f"{path}.headGroupSpec: redis username goes in gcsFaultToleranceOptions.redisUsername")
    if spec.get("gcsFaultToleranceOptions") is None and env_value(head, "RAY_REDIS_ADDRESS") is not None:
        # validation.go: RAY_REDIS_ADDRESS "implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not set"
        problems.append(f"{path}.headGroupSpec: RAY_REDIS_ADDRESS is set without gcsFaultToleranceOptions")
    return problems


def check_group(group: dict[str, Any], path: str, name: str) -> list[str]:
    params = group.get("rayStartParams") or {}
    problems = []
    # validation.go: validateRayGroupResources, "resource fields should not be set in both rayStartParams and Resources"
    if any(params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        problems.append(f"{path}.resources: {name} group sets resources both here and in rayStartParams; use one")
    # validation.go: validateRayGroupLabels, "rayStartParams['labels'] is not supported"
    if "labels" in params:
        problems.append(f"{path}.rayStartParams.labels: not supported; use {path}.labels")
    return problems + check_labels(group.get("labels") or {}, f"{path}.labels")


def check_worker_replicas(group: dict[str, Any], path: str, autoscaling: bool) -> list[str]:
    low, high = group.get("minReplicas"), group.get("maxReplicas")
    # validation.go: "worker group %s must set both minReplicas and maxReplicas when autoscaling is disabled"
    if not autoscaling and (low is None or high is None):
        return [f"{path}: minReplicas and maxReplicas are both required when autoscaling is disabled"]
    # validation.go: "has negative minReplicas/maxReplicas", "minReplicas %d greater than maxReplicas %d"
    if (low is not None and low < 0) or (high is not None and high < 0):
        return [f"{path}: minReplicas and maxReplicas must not be negative"]
    if low is not None and high is not None and low > high:
        return [f"{path}.minReplicas: {low} is greater than maxReplicas {high}"]
    return []


def check_worker_autoscaler_fields(group: dict[str, Any], path: str, spec: dict[str, Any]) -> list[str]:
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2" or env_value(spec.get("headGroupSpec") or {}, AUTOSCALER_V2_ENV) in ("1", "true")
    problems = []
    # validation.go: validateWorkerGroupIdleTimeout, "idleTimeoutSeconds is set, but autoscaler v2 is not enabled"
    if group.get("idleTimeoutSeconds") is not None and not v2:
        problems.append(f"{path}.idleTimeoutSeconds: needs autoscaler v2 (autoscalerOptions.version: v2)")
    # validation.go: validateWorkerGroupPriority, Ray >= 2.56.0 and autoscaler v2
    if group.get("priority"):
        version = parse_version(spec.get("rayVersion", ""))
        if version is None or version < (2, 56, 0) or not v2:
            problems.append(f"{path}.priority: needs rayVersion >= 2.56.0 and autoscaler v2")
    # validation.go: "worker group %s cannot be suspended with Autoscaler enabled"
    if group.get("suspend") is True and spec.get("enableInTreeAutoscaling") is True:
        problems.append(f"{path}.suspend: a worker group cannot be suspended with the autoscaler enabled")
    return problems


def check_autoscaler(spec: dict[str, Any], path: str, autoscaling: bool) -> list[str]:
    options = spec.get("autoscalerOptions") or {}
    head = spec.get("headGroupSpec") or {}
    problems = []
    # validation.go: RAY_enable_autoscaler_v2 "cannot be set to '%s' when enableInTreeAutoscaling is false"
    if not autoscaling and env_value(head, AUTOSCALER_V2_ENV) in ("1", "true"):
        problems.append(f"{path}.headGroupSpec: {AUTOSCALER_V2_ENV} needs enableInTreeAutoscaling: true")
    # validation.go: "both .spec.autoscalerOptions.version and head Pod env var %s are set"
    if autoscaling and options.get("version") is not None and env_value(head, AUTOSCALER_V2_ENV) is not None:
        problems.append(f"{path}.autoscalerOptions.version: set either it or {AUTOSCALER_V2_ENV}, not both")
    # validation.go: "restartPolicy for head Pod should be Never or unset when using autoscaler V2"
    if autoscaling and options.get("version") == "v2":
        groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
        for group_path, group in groups:
            if ((group.get("template") or {}).get("spec") or {}).get("restartPolicy") not in (None, "", "Never"):
                problems.append(f"{path}.{group_path}.template.spec.restartPolicy: Never or unset with autoscaler v2")
    # validation.go: "autoscalerOptions.idleTimeoutSeconds must be non-negative"
    if (options.get("idleTimeoutSeconds") or 0) < 0:
        problems.append(f"{path}.autoscalerOptions.idleTimeoutSeconds: must not be negative")
    # validation.go: "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD"
    if any(var.get("name") == "KUBERAY_GEN_AUTOSCALER_START_CMD" for var in options.get("env") or []):
        problems.append(f"{path}.autoscalerOptions.env: KUBERAY_GEN_AUTOSCALER_START_CMD is KubeRay's")
    return problems


def check_auth(spec: dict[str, Any], path: str) -> list[str]:
    options = spec.get("authOptions") or {}
    k8s_auth = options.get("enableK8sTokenAuth") is True
    if options.get("mode") != "token":
        # validation.go: "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
        return [f"{path}.authOptions.enableK8sTokenAuth: needs mode: token"] if k8s_auth else []
    # validation.go: token mode needs "Ray version 2.52.0 or later" (2.55.0 for Kubernetes tokens)
    version = parse_version(spec.get("rayVersion", ""))
    needed = (2, 55, 0) if k8s_auth else (2, 52, 0)
    if version is None or version < needed:
        return [f"{path}.rayVersion: authOptions.mode token needs rayVersion >= {'.'.join(map(str, needed))}, got {spec.get('rayVersion')!r}"]
    if k8s_auth and options.get("secretName"):
        return [f"{path}.authOptions.secretName: not with enableK8sTokenAuth"]
    return []


def check_gated_fields(spec: dict[str, Any], path: str, gates: dict[str, bool]) -> list[str]:
    # validation.go: fields the operator refuses unless their feature gate is on
    gated = {"networkPolicy": "RayClusterNetworkPolicy", "tlsOptions": "RayClusterMTLS", "historyServerOptions": "RayClusterHistoryServer"}
    problems = [f"{path}.{field}: needs the operator's {gate} feature gate" for field, gate in gated.items() if spec.get(field) is not None and not gates[gate]]
    groups = spec.get("workerGroupSpecs") or []
    if not gates["RayJobDeletionPolicy"]:
        # validation.go: "worker group %s can be suspended only when the RayJobDeletionPolicy feature gate is enabled"
        problems += [f"{path}.workerGroupSpecs[{i}].suspend: needs the RayJobDeletionPolicy feature gate" for i, g in enumerate(groups) if g.get("suspend") is True]
    return problems


def check_managed_by(spec: dict[str, Any], path: str) -> list[str]:
    # CEL on spec.managedBy: "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']"
    value = spec.get("managedBy")
    return [f"{path}.managedBy: must be one of {', '.join(MANAGED_BY)}"] if value is not None and value not in MANAGED_BY else []
