"""KubeRay v1.7.0's checks of RayJob, RayService and RayCronJob specs (validation.go:
ValidateRayJobSpec, ValidateRayServiceSpec, ValidateRayCronJobSpec) and the CRDs' CEL rules on
them. kuberay.py says which rules are here and which are left out, and why."""

from __future__ import annotations

import re
import zoneinfo
from typing import Any

import yaml

from infra.k8s.kuberay_cluster import check_cluster_spec, check_managed_by

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")  # rayjob_types.go
UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")  # rayservice_types.go
INITIALIZING_TIMEOUT = "ray.io/initializing-timeout"


def check_job_spec(spec: dict[str, Any], path: str, gates: dict[str, bool]) -> list[str]:
    shutdown = spec.get("shutdownAfterJobFinishes") is True  # default false
    problems = []
    # validation.go: "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    if spec.get("suspend") is True and not shutdown:
        problems.append(f"{path}.suspend: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
    problems += check_ttl(spec, path, shutdown)
    problems += check_deletion_strategy(spec, path, shutdown, gates)
    problems += check_cluster_choice(spec, path)
    problems += check_submission_mode(spec, path)
    cluster = spec.get("rayClusterSpec")
    if cluster is not None:
        # validation.go: "K8s token auth mode is currently not supported for RayJob"
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth") is True:
            problems.append(f"{path}.rayClusterSpec.authOptions.enableK8sTokenAuth: not supported for a RayJob")
        problems += check_cluster_spec(cluster, f"{path}.rayClusterSpec", gates)
    problems += check_runtime_env(spec, path)
    # validation.go: activeDeadlineSeconds and preRunningDeadlineSeconds "must be a positive integer",
    # backoffLimit not negative
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            problems.append(f"{path}.{field}: must be a positive integer, got {spec[field]}")
    if (spec.get("backoffLimit") or 0) < 0:
        problems.append(f"{path}.backoffLimit: must not be negative")
    return problems + check_managed_by(spec, path)


def check_ttl(spec: dict[str, Any], path: str, shutdown: bool) -> list[str]:
    ttl = spec.get("ttlSecondsAfterFinished") or 0
    # validation.go: "TTLSecondsAfterFinished must be a non-negative integer"
    if ttl < 0:
        return [f"{path}.ttlSecondsAfterFinished: must not be negative"]
    # validation.go, validateDeletionConfiguration: "a RayJob with shutdownAfterJobFinishes set to
    # false cannot have TTLSecondsAfterFinished" (the TTL counts down to that shutdown)
    if ttl > 0 and not shutdown:
        return [f"{path}.ttlSecondsAfterFinished: {ttl} needs shutdownAfterJobFinishes: true (the TTL delays that shutdown)"]
    return []


def check_deletion_strategy(spec: dict[str, Any], path: str, shutdown: bool, gates: dict[str, bool]) -> list[str]:
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return []
    where = f"{path}.deletionStrategy"
    # validation.go: "RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy"
    if not gates["RayJobDeletionPolicy"]:
        return [f"{where}: needs the RayJobDeletionPolicy feature gate"]
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = strategy.get("deletionRules") or []
    # CEL on deletionStrategy and validation.go: legacy policies and deletionRules exclude each
    # other; legacy needs both onSuccess and onFailure; rules exclude shutdownAfterJobFinishes
    if legacy and rules:
        return [f"{where}: onSuccess/onFailure and deletionRules cannot be used together"]
    if rules and shutdown:
        return [f"{where}.deletionRules: exclude shutdownAfterJobFinishes: true"]
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        return [f"{where}: needs both onSuccess and onFailure, or deletionRules"]
    problems = []
    for index, rule in enumerate(rules):
        condition = rule.get("condition") or {}
        # CEL on condition / validateDeletionCondition: exactly one of jobStatus, jobDeploymentStatus
        if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
            problems.append(f"{where}.deletionRules[{index}].condition: set exactly one of jobStatus, jobDeploymentStatus")
        # validateDeletionRules: DeleteCluster/DeleteWorkers "not supported when ClusterSelector is set"
        if spec.get("clusterSelector") and rule.get("policy") in ("DeleteCluster", "DeleteWorkers"):
            problems.append(f"{where}.deletionRules[{index}].policy: {rule['policy']} not with a clusterSelector")
    if legacy and shutdown and "DeleteNone" in (get_policy(strategy, "onSuccess"), get_policy(strategy, "onFailure")):
        # validateLegacyDeletionPolicies: "shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'"
        problems.append(f"{where}: DeleteNone contradicts shutdownAfterJobFinishes: true")
    return problems


def get_policy(strategy: dict[str, Any], when: str) -> str | None:
    return (strategy.get(when) or {}).get("policy")


def check_cluster_choice(spec: dict[str, Any], path: str) -> list[str]:
    selector = spec.get("clusterSelector") or {}
    if not selector:
        # validation.go: "one of RayClusterSpec or ClusterSelector must be set"
        return [] if spec.get("rayClusterSpec") is not None else [f"{path}: set rayClusterSpec or clusterSelector"]
    problems = []
    # validation.go: "cluster name in ClusterSelector should not be empty" (key ray.io/cluster)
    if not selector.get("ray.io/cluster"):
        problems.append(f"{path}.clusterSelector: needs ray.io/cluster: <RayCluster name>")
    # validation.go: "the ClusterSelector mode doesn't support the suspend operation"
    if spec.get("suspend") is True:
        problems.append(f"{path}.suspend: not with a clusterSelector")
    # validation.go: "BackoffLimit is incompatible with ClusterSelector mode"
    if (spec.get("backoffLimit") or 0) > 0:
        problems.append(f"{path}.backoffLimit: must be 0 with a clusterSelector (KubeRay retries only on a cluster of the job's own)")
    # Ours, not validation.go: with a clusterSelector KubeRay never reads rayClusterSpec
    # (rayjob_controller.go: getOrCreateRayClusterInstance takes the selected cluster), so a spec
    # beside it would only mislead its reader.
    if spec.get("rayClusterSpec") is not None:
        problems.append(f"{path}.rayClusterSpec: ignored with a clusterSelector; set one of the two")
    return problems


def check_submission_mode(spec: dict[str, Any], path: str) -> list[str]:
    mode = spec.get("submissionMode", "K8sJobMode")
    # rayjob_types.go: the JobSubmissionMode constants are all the controller knows (the schema has no enum)
    if mode not in SUBMISSION_MODES:
        return [f"{path}.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}"]
    problems = []
    # validation.go: "BackoffLimit is incompatible with InteractiveMode"
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        problems.append(f"{path}.backoffLimit: must be 0 in InteractiveMode")
    if mode == "SidecarMode":
        # validation.go: "ClusterSelector is not supported in SidecarMode", "SidecarMode doesn't
        # support SubmitterPodTemplate / SubmitterConfig", head restartPolicy Never or unset
        problems += [f"{path}.{field}: not with submissionMode SidecarMode"
                     for field in ("clusterSelector", "submitterPodTemplate", "submitterConfig") if spec.get(field)]  # fmt: skip
        head = ((spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}).get("template") or {}
        if (head.get("spec") or {}).get("restartPolicy") not in (None, "", "Never"):
            problems.append(f"{path}.rayClusterSpec.headGroupSpec.template.spec.restartPolicy: Never or unset in SidecarMode")
    return problems


def check_runtime_env(spec: dict[str, Any], path: str) -> list[str]:
    # validation.go: dashboardclient.UnmarshalRuntimeEnvYAML, runtimeEnvYAML must be YAML of a mapping
    text = spec.get("runtimeEnvYAML")
    if not text:
        return []
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"{path}.runtimeEnvYAML: not YAML: {str(exc).splitlines()[0]}"]
    return [] if isinstance(parsed, dict) else [f"{path}.runtimeEnvYAML: must be a mapping, got {type(parsed).__name__}"]


def check_initializing_timeout(annotations: dict[str, str]) -> list[str]:
    # validation.go: validateInitializingTimeout, a positive Go duration ("30m") or integer seconds
    value = annotations.get(INITIALIZING_TIMEOUT)
    if not value:
        return []
    is_duration = re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", value)
    amounts = [float(amount) for amount in re.findall(r"(\d+(?:\.\d+)?)(?:ns|us|µs|ms|s|m|h)", value)]
    if (is_duration and any(amounts)) or (value.isdigit() and int(value) > 0):
        return []
    return [f"metadata.annotations.{INITIALIZING_TIMEOUT}: {value!r} must be a positive duration (5m, 1h) or seconds"]


def check_service_spec(spec: dict[str, Any], gates: dict[str, bool]) -> list[str]:
    cluster = spec.get("rayClusterConfig") or {}
    problems = []
    # validation.go: "K8s token auth mode is currently not supported for RayService"
    if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth") is True:
        problems.append("spec.rayClusterConfig.authOptions.enableK8sTokenAuth: not supported for a RayService")
    problems += check_cluster_spec(cluster, "spec.rayClusterConfig", gates)
    # validation.go: "spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set"
    if (((cluster.get("headGroupSpec") or {}).get("headService") or {}).get("metadata") or {}).get("name"):
        problems.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
    upgrade = spec.get("upgradeStrategy") or {}
    # validation.go: "Spec.UpgradeStrategy.Type value %s is invalid"; incremental upgrades need the
    # autoscaler and clusterUpgradeOptions with a gatewayClassName (ValidateClusterUpgradeOptions)
    if upgrade.get("type") is not None and upgrade["type"] not in UPGRADE_TYPES:
        problems.append(f"spec.upgradeStrategy.type: {upgrade['type']!r} is not one of {', '.join(UPGRADE_TYPES)}")
    if upgrade.get("type") == "NewClusterWithIncrementalUpgrade" and gates["RayServiceIncrementalUpgrade"]:
        options = upgrade.get("clusterUpgradeOptions") or {}
        if cluster.get("enableInTreeAutoscaling") is not True or not options.get("gatewayClassName"):
            problems.append("spec.upgradeStrategy: NewClusterWithIncrementalUpgrade needs the autoscaler and clusterUpgradeOptions.gatewayClassName")
    # validation.go: "Spec.RayClusterDeletionDelaySeconds should be a non-negative integer"
    if (spec.get("rayClusterDeletionDelaySeconds") or 0) < 0:
        problems.append("spec.rayClusterDeletionDelaySeconds: must not be negative")
    return problems + check_managed_by(cluster, "spec.rayClusterConfig") + check_serve_config(spec)


def check_serve_config(spec: dict[str, Any]) -> list[str]:
    # The operator hands serveConfigV2 to Ray's dashboard as YAML (rayservice_controller.go); one that
    # does not parse into applications leaves the RayService failing, so it is refused here.
    try:
        config = yaml.safe_load(spec.get("serveConfigV2") or "")
    except yaml.YAMLError as exc:
        return [f"spec.serveConfigV2: not YAML: {str(exc).splitlines()[0]}"]
    if not isinstance(config, dict) or not isinstance(config.get("applications"), list) or not config["applications"]:
        return ["spec.serveConfigV2: must be a Serve config with a list of applications"]
    return []


# --- RayCronJob: ValidateRayCronJobSpec -----------------------------------------------------------
CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))
CRON_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def check_cron_spec(spec: dict[str, Any], gates: dict[str, bool]) -> list[str]:
    problems = []
    # main.go: the RayCronJob controller runs only with the RayCronJob feature gate (alpha, off by default)
    if not gates["RayCronJob"]:
        problems.append("spec: the operator runs RayCronJobs only with its RayCronJob feature gate (kuberay-operator-values.yaml)")
    schedule = spec.get("schedule", "")
    # validation.go: "cannot use TZ or CRON_TZ in schedule, use timeZone field instead"; cron.ParseStandard
    if "TZ" in schedule:
        problems.append("spec.schedule: no TZ= or CRON_TZ= here; use spec.timeZone")
    else:
        problems += [f"spec.schedule: {problem}" for problem in cron_problems(schedule)]
    # validation.go: timeZone "must not be empty string", and time.LoadLocation must know it
    zone = spec.get("timeZone")
    if zone is not None:
        try:
            zoneinfo.ZoneInfo(zone)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            problems.append(f"spec.timeZone: {zone!r} is no IANA time zone")
    # validation.go: ValidateRayJobSpec(RayJob{Spec: JobTemplate}), "invalid RayJob template"
    return problems + check_job_spec(spec.get("jobTemplate") or {}, "spec.jobTemplate", gates)


def cron_problems(schedule: str) -> list[str]:
    """What robfig/cron's ParseStandard refuses: 5 fields (numbers, names, *, ?, ranges, steps, lists) or a descriptor."""
    if schedule.startswith("@"):
        every = re.fullmatch(r"@every ((\d+(\.\d+)?)(ns|us|µs|ms|s|m|h))+", schedule)
        return [] if schedule in CRON_DESCRIPTORS or every else [f"{schedule!r}: unknown descriptor"]
    fields = schedule.split()
    if len(fields) != 5:
        return [f"{schedule!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"]
    problems = []
    for index, (field, (name, low, high)) in enumerate(zip(fields, CRON_FIELDS)):
        for part in field.split(","):
            span, slash, step = part.partition("/")
            ends = [low, high] if span in ("*", "?") else [_cron_value(end, index) for end in span.split("-")]
            in_range = len(ends) <= 2 and all(end is not None and low <= end <= high for end in ends) and ends[0] <= ends[-1]
            if not in_range or (slash and not (step.isdigit() and int(step) > 0)):
                problems.append(f"{name} {part!r}: not a value, range or step within {low}-{high}")
    return problems


def _cron_value(text: str, index: int) -> int | None:
    """A number, or a month (jan = 1) or weekday (sun = 0) name."""
    names = CRON_NAMES.get(index, [])
    if text.lower() in names:
        return names.index(text.lower()) + (1 if index == 3 else 0)
    return int(text) if text.isdigit() else None
