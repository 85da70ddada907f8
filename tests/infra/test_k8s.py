"""The KubeRay manifests of infra/k8s, rendered with the real `kubectl kustomize` and checked offline.

1. Every overlay renders, and every object in it passes infra/k8s/validate.py: the vendored
   KubeRay v1.7.0 CRD schemas in strict mode, Kubernetes' name rules, KubeRay's own rules.
2. The validator is strict: a misspelled field, a wrong type, a broken cross-field rule each fail
   with a message naming the path (negative cases on copies of the rendered objects).
3. What the issue asks of the manifests holds (CPU head with num-cpus 0, autoscaled GPU workers,
   the RayJobs' lifecycle fields, the RayService's import path), and the storage the overlay chose
   reaches every Ray pod and command.
4. Every `python -m infra ...` in the manifests passes reelforge's own checks (infra/submit.py's
   check_command_args, what `reelforge submit` runs before submitting), and the RayService's
   Serve config passes Ray Serve's schema and infra.serve.cli:app_builder.
5. Every command in docs/deploy.md names objects, files and flags that exist.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.k8s.kuberay import load_feature_gates
from infra.k8s.schema import strict_schema
from infra.k8s.validate import OVERLAYS_DIR, Validator, main as validate_main, render

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(path.name for path in OVERLAYS_DIR.iterdir() if (path / "kustomization.yaml").is_file())
RAY_CLUSTER_SPEC = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"), "RayService": ("spec", "rayClusterConfig"),
                    "RayCronJob": ("spec", "jobTemplate", "rayClusterSpec")}  # fmt: skip


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: these tests render the overlays with kubectl 1.32's kustomize (v5.5)")
    return {overlay: render(OVERLAYS_DIR / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind and name in (None, obj["metadata"]["name"])]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = find(objects, kind, name)
    return found


def cluster_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(KIND/NAME, RayClusterSpec) of every Ray cluster the objects describe."""
    specs = []
    for obj in objects:
        spec = obj
        for key in RAY_CLUSTER_SPEC.get(obj["kind"], ("-",)):
            spec = spec.get(key) if isinstance(spec, dict) else None
        if spec:
            specs.append((f"{obj['kind']}/{obj['metadata']['name']}", spec))
    return specs


def ray_containers(spec: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, Ray container) of the head and of every worker group."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [(group["template"]["spec"], group["template"]["spec"]["containers"][0]) for group in groups]


def entrypoints(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """KIND/NAME -> the entrypoint's words, for every RayJob and RayCronJob."""
    jobs = {f"RayJob/{o['metadata']['name']}": o["spec"] for o in find(objects, "RayJob")}
    jobs |= {f"RayCronJob/{o['metadata']['name']}": o["spec"]["jobTemplate"] for o in find(objects, "RayCronJob")}
    return {name: shlex.split(spec["entrypoint"]) for name, spec in jobs.items()}


# --- 1. every overlay renders and validates ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_passes_strict_validation(rendered, validator, overlay):
    objects = rendered[overlay]
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects if o["apiVersion"] == "ray.io/v1")
    assert kinds == ["RayCluster/reelforge", "RayCronJob/reelforge-nightly-ingest", "RayJob/reelforge-ingest",
                     "RayJob/reelforge-recaption", "RayJob/reelforge-train", "RayService/reelforge-api"]  # fmt: skip
    assert validator.check_all(objects) == []
    assert validate_main([str(OVERLAYS_DIR / overlay)]) == 0  # what docs/deploy.md runs


def test_overlays_are_the_storage_choices():
    assert OVERLAYS == ["object-storage", "shared-volume"]


# --- 2. the validator is strict -------------------------------------------------------------------


DELETE = object()


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at a dotted path with [i] indexes; value DELETE removes the key."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node = obj
    for part in parts[:-1]:
        node = node[part]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


CONTAINER = "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]"
# (object, changes {path: value}, what the problem must say)
BROKEN = {
    "misspelled top-level field": ("RayJob/reelforge-train", {"spec.shutdownAfterJobFinish": True}, "spec.shutdownAfterJobFinish: unknown field"),
    "misspelled field in a pod template": ("RayJob/reelforge-train", {f"{CONTAINER}.resource": {}}, f"{CONTAINER}.resource: unknown field"),
    "misspelled metadata field": ("RayCluster/reelforge", {"metadata.lables": {}}, "metadata.lables: unknown field"),
    "wrong type: string for integer": ("RayCluster/reelforge", {"spec.workerGroupSpecs[1].maxReplicas": "4"}, "spec.workerGroupSpecs[1].maxReplicas: '4' is not of type 'integer'"),
    "wrong type: int-or-string": ("RayJob/reelforge-train", {f"{CONTAINER}.resources.limits.cpu": True}, f"{CONTAINER}.resources.limits.cpu: True is not valid"),
    "null for an object": ("RayCluster/reelforge", {"spec.headGroupSpec.rayStartParams": None}, "spec.headGroupSpec.rayStartParams: None is not of type 'object'"),
    "int32 overflow": ("RayJob/reelforge-ingest", {"spec.activeDeadlineSeconds": 2**31}, "spec.activeDeadlineSeconds: 2147483648 is not a 'int32'"),
    "enum": ("RayCluster/reelforge", {"spec.authOptions.mode": "tokens"}, "spec.authOptions.mode: 'tokens' is not one of ['disabled', 'token']"),
    "duplicate port (list-map keys)": ("RayCluster/reelforge", {"spec.headGroupSpec.template.spec.containers[0].ports[1].containerPort": 6379},
                                       "spec.headGroupSpec.template.spec.containers[0].ports[1]: duplicate entry (containerPort=6379, protocol=TCP)"),
    "required field": ("RayCluster/reelforge", {"spec.workerGroupSpecs[0].groupName": DELETE}, "spec.workerGroupSpecs[0]: 'groupName' is a required property"),
    # cross-field rules, KubeRay's validation.go (and one of ours)
    "TTL without shutdownAfterJobFinishes": ("RayJob/reelforge-ingest", {"spec.shutdownAfterJobFinishes": False}, "spec.ttlSecondsAfterFinished: 600 needs shutdownAfterJobFinishes: true"),
    "TTL without shutdown in a RayCronJob's template": ("RayCronJob/reelforge-nightly-ingest", {"spec.jobTemplate.shutdownAfterJobFinishes": False},
                                                         "spec.jobTemplate.ttlSecondsAfterFinished: 600 needs shutdownAfterJobFinishes: true"),
    "clusterSelector beside rayClusterSpec": ("RayJob/reelforge-ingest", {"spec.clusterSelector": {"ray.io/cluster": "reelforge"}, "spec.backoffLimit": 0},
                                              "spec.rayClusterSpec: ignored with a clusterSelector"),
    "retries with a clusterSelector": ("RayJob/reelforge-recaption", {"spec.backoffLimit": 2}, "spec.backoffLimit: must be 0 with a clusterSelector"),
    "neither cluster nor selector": ("RayJob/reelforge-recaption", {"spec.clusterSelector": DELETE}, "spec: set rayClusterSpec or clusterSelector"),
    "selector without a cluster name": ("RayJob/reelforge-recaption", {"spec.clusterSelector": {"app": "x"}}, "spec.clusterSelector: needs ray.io/cluster"),
    "unknown submission mode": ("RayJob/reelforge-ingest", {"spec.submissionMode": "K8sJob"}, "spec.submissionMode: 'K8sJob' is not one of K8sJobMode"),
    "activeDeadlineSeconds 0": ("RayJob/reelforge-train", {"spec.activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds: must be a positive integer"),
    "num-cpus and group resources": ("RayCluster/reelforge", {"spec.headGroupSpec.resources": {"CPU": "1"}}, "spec.headGroupSpec.resources: Head group sets resources both here and in rayStartParams"),
    "minReplicas over maxReplicas": ("RayCluster/reelforge", {"spec.workerGroupSpecs[1].minReplicas": 5}, "spec.workerGroupSpecs[1].minReplicas: 5 is greater than maxReplicas 4"),
    "suspended worker group with the autoscaler": ("RayCluster/reelforge", {"spec.workerGroupSpecs[1].suspend": True},
                                                    "spec.workerGroupSpecs[1].suspend: a worker group cannot be suspended with the autoscaler enabled"),
    "idleTimeoutSeconds without autoscaler v2": ("RayCluster/reelforge", {"spec.workerGroupSpecs[1].idleTimeoutSeconds": 60}, "spec.workerGroupSpecs[1].idleTimeoutSeconds: needs autoscaler v2"),
    "token auth on an old Ray": ("RayService/reelforge-api", {"spec.rayClusterConfig.rayVersion": "2.40.0"}, "spec.rayClusterConfig.rayVersion: authOptions.mode token needs rayVersion >= 2.52.0"),
    "RayJob name not a DNS-1035 label": ("RayJob/reelforge-train", {"metadata.name": "9-train"}, "metadata.name: RayJob name '9-train' must be a DNS-1035 label"),
    "RayCluster name too long": ("RayCluster/reelforge", {"metadata.name": "r" * 54}, "metadata.name: RayCluster name"),
    "label value": ("RayCluster/reelforge", {"metadata.labels.team": "a b"}, "metadata.labels: value 'a b' of 'team' is not a valid label value"),
    "cron schedule": ("RayCronJob/reelforge-nightly-ingest", {"spec.schedule": "0 25 * * *"}, "spec.schedule: hour '25'"),
    "TZ in the schedule": ("RayCronJob/reelforge-nightly-ingest", {"spec.schedule": "CRON_TZ=UTC 0 2 * * *"}, "spec.schedule: no TZ= or CRON_TZ= here"),
    "time zone": ("RayCronJob/reelforge-nightly-ingest", {"spec.timeZone": "Mars/Olympus"}, "spec.timeZone: 'Mars/Olympus' is no IANA time zone"),
    "managedBy (CEL)": ("RayJob/reelforge-train", {"spec.managedBy": "someone"}, "spec.managedBy: must be one of"),
    "deletionRules beside shutdown (CEL)": ("RayJob/reelforge-train", {"spec.ttlSecondsAfterFinished": 0,
                                            "spec.deletionStrategy": {"deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}]}},
                                            "spec.deletionStrategy.deletionRules: exclude shutdownAfterJobFinishes: true"),
    "serveConfigV2 not a Serve config": ("RayService/reelforge-api", {"spec.serveConfigV2": "applications: {}"}, "spec.serveConfigV2: must be a Serve config"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_the_validator_refuses_a_broken_object_naming_the_path(rendered, validator, case):
    ident, changes, expected = BROKEN[case]
    kind, name = ident.split("/")
    obj = copy.deepcopy(one(rendered["object-storage"], kind, name))
    assert validator.problems(obj) == []
    for path, value in changes.items():
        _set(obj, path, value)
    problems = validator.problems(obj)
    assert any(expected in problem for problem in problems), problems


def test_an_unknown_kind_and_a_duplicate_are_refused(rendered, validator):
    objects = copy.deepcopy(rendered["object-storage"])
    objects += [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}, copy.deepcopy(objects[-1])]
    problems = validator.check_all(objects)
    assert "Deployment/x: apiVersion/kind: apps/v1/Deployment has no schema here" in problems[0]
    assert f"{objects[-1]['kind']}/{objects[-1]['metadata']['name']}: (object): defined twice" in problems


def test_the_raycronjob_needs_its_feature_gate(rendered):
    gates = load_feature_gates()
    assert gates["RayCronJob"] is True  # kuberay-operator-values.yaml turns it on
    off = Validator(gates | {"RayCronJob": False})
    problems = off.problems(one(rendered["object-storage"], "RayCronJob"))
    assert problems == ["spec: the operator runs RayCronJobs only with its RayCronJob feature gate (kuberay-operator-values.yaml)"]


def test_schema_extensions_the_vendored_crds_do_not_use():
    """x-kubernetes-embedded-resource, preserve-unknown-fields and objects with no properties, as the
    API server reads them (none occurs in KubeRay v1.7.0's CRDs, so they are checked here)."""
    from infra.k8s.schema import _Validator

    schema = strict_schema({"type": "object", "properties": {
        "embedded": {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {"spec": {"type": "object"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "bare": {"type": "object"},
        "maybe": {"type": "string", "nullable": True},
        "port": {"x-kubernetes-int-or-string": True},
    }})  # fmt: skip
    check = _Validator(schema)
    assert not list(check.iter_errors({"embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}},
                                       "open": {"anything": {"goes": 1}}, "maybe": None, "port": "http"}))  # fmt: skip
    errors = {e.message for e in check.iter_errors({"embedded": {"metadata": {"nmae": "p"}}, "bare": {"x": 1}, "port": 1.5})}
    assert errors == {"'apiVersion' is a required property", "'kind' is a required property",
                      "Additional properties are not allowed ('nmae' was unexpected)",
                      "Additional properties are not allowed ('x' was unexpected)", "1.5 is not valid under any of the given schemas"}  # fmt: skip


# --- 3. what the manifests must be ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_hold_what_the_issue_asks(rendered, overlay):
    objects = rendered[overlay]
    cluster = one(objects, "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in str(cluster["headGroupSpec"])
    gpu = [group for group in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and cluster["enableInTreeAutoscaling"] is True and gpu[0]["minReplicas"] == 0 < gpu[0]["maxReplicas"]
    for job in [*find(objects, "RayJob"), one(objects, "RayCronJob")]:
        spec = job["spec"].get("jobTemplate", job["spec"])
        lifecycle = {field: spec.get(field) for field in ("activeDeadlineSeconds", "backoffLimit", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished")}
        assert None not in lifecycle.values() and spec["shutdownAfterJobFinishes"] is True, (job["metadata"]["name"], lifecycle)
    serve = yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["import_path"] == "infra.serve.cli:app_builder"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_chosen_storage_reaches_every_ray_pod(rendered, overlay):
    objects = rendered[overlay]
    images = {c["image"] for _, spec in cluster_specs(objects) for _, c in ray_containers(spec)}
    assert images == {"registry.example.com/reelforge:0.1.0-gpu"}
    for ident, spec in cluster_specs(objects):
        for pod, container in ray_containers(spec):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert {"configMapRef": {"name": "reelforge"}} in container["envFrom"], ident
            assert mounts["/dev/shm"] == "dshm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory", ident
            assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "reelforge-models", ident
            if overlay == "object-storage":
                assert {"secretRef": {"name": "reelforge-s3"}} in container["envFrom"], ident
            else:
                assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "reelforge-data", ident


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_name_the_overlays_paths(rendered, overlay):
    objects = rendered[overlay]
    paths = one(objects, "ConfigMap", "reelforge")["data"]
    commands = entrypoints(objects)
    assert "REELFORGE_" not in str(commands) and "set-by-overlay" not in str(objects)
    ingest = commands["RayJob/reelforge-ingest"]
    assert ingest[4] == paths["REELFORGE_FOOTAGE"] and ingest[ingest.index("--out") + 1] == paths["REELFORGE_SHARDS"]
    assert commands["RayJob/reelforge-recaption"][4] == paths["REELFORGE_SHARDS"]
    train = commands["RayJob/reelforge-train"]
    assert train[train.index("--data") + 1] == paths["REELFORGE_SHARDS"] and train[train.index("--out") + 1] == paths["REELFORGE_TRAIN_OUT"]
    serve = yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["store"] == paths["REELFORGE_SERVE_STORE"]
    # the nightly run is the ingest RayJob, wired the same way
    assert one(objects, "RayCronJob")["spec"]["jobTemplate"] == one(objects, "RayJob", "reelforge-ingest")["spec"]


def test_one_ray_version_everywhere(rendered):
    import ray

    dockerfile = (REPO / "infra/image/Dockerfile").read_text()
    base_tag = re.search(r"^FROM rayproject/ray:(\S+?)-py311", dockerfile, re.M).group(1)
    versions = {spec["rayVersion"] for objects in rendered.values() for _, spec in cluster_specs(objects)}
    assert versions == {base_tag} == {ray.__version__}


# --- 4. the commands inside pass reelforge's own checks ---------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_entrypoint_passes_reelforge_submits_checks(rendered, overlay):
    from infra.submit import check_command_args

    for ident, words in entrypoints(rendered[overlay]).items():
        assert words[:3] == ["python", "-m", "infra"], ident
        check_command_args(words[3], words[4:])  # the command's parser and config check; exits 2 on a bad flag


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_serve_config_passes_ray_serve_and_app_builder(rendered, overlay):
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from infra.config import load_config
    from infra.serve.cli import app_builder

    config = yaml.safe_load(one(rendered[overlay], "RayService")["spec"]["serveConfigV2"])
    registered = load_config("train/small").registry.model_name  # what the train RayJob registers
    assert config["applications"][0]["args"]["model"] == f"models:/{registered}@champion"
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), "serveConfigV2 has keys Ray Serve does not know"
        assert isinstance(app_builder(app["args"]), Application)  # parses and checks them as `reelforge serve` does


# --- 5. docs/deploy.md's commands ------------------------------------------------------------------


def doc_commands() -> list[str]:
    """Every command of docs/deploy.md: the lines of its bash blocks (continuations joined) and the
    inline `kubectl ...` / `python -m ...` spans."""
    text = (REPO / "docs/deploy.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    commands += re.findall(r"`((?:kubectl (?:apply|get|delete|exec|logs|port-forward|create)|python -m|\.venv/bin/python -m) [^`]+)`", text)
    return [re.sub(r"\s+", " ", command) for command in commands]


def test_every_command_in_deploy_md_is_backed_by_the_manifests(rendered):
    """Each command names an overlay, a selector, an object, a service, a file or flags that exist."""
    from infra.cli import COMMANDS

    commands = doc_commands()
    objects = rendered["object-storage"]
    namespace = one(objects, "Namespace")["metadata"]["name"]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    services = {f"{n}-head-svc" for k, n in names if k == "RayCluster"} | {f"{n}-serve-svc" for k, n in names if k == "RayService"}
    small = yaml.safe_load((REPO / "configs/train/small.yaml").read_text())["model"]
    checked = 0
    for command in commands:
        words = shlex.split(command.split("|")[0])
        if "-n" in words:
            assert words[words.index("-n") + 1] == namespace, command
        if words[:3] == ["kubectl", "apply", "-k"]:
            overlay, selector = words[3], words[words.index("-l") + 1]
            key, value = selector.split("=")
            assert Path(overlay).parent == Path("infra/k8s/overlays") and Path(overlay).name in rendered, command
            assert any(o["metadata"].get("labels", {}).get(key) == value for o in rendered[Path(overlay).name]), command
        elif words[:2] in (["kubectl", "exec"], ["kubectl", "port-forward"]):
            assert words[4].removeprefix("svc/") in services, command
            run = words[words.index("--") + 1 :] if "--" in words else []
            if run[:3] == ["python", "-m", "infra"]:
                module = importlib.import_module(COMMANDS[run[3]][0])
                if hasattr(module, "build_parser"):
                    module.build_parser().parse_args(run[4:])
                else:  # infra/promote.py builds its parser inside main(), which then promotes: its flags by
                    # name here; tests/infra/test_promote_gate.py runs the same command against a real registry
                    source = Path(module.__file__).read_text()
                    assert all(f'"{word}"' in source for word in run[4:] if word.startswith("--")), command
            elif run[:2] == ["hf", "download"]:
                spec = {small["autoencoder"].partition(":")[2], small["text_encoder"].partition(":")[2]}
                assert run[run.index("--local-dir") + 1] in spec, command  # where configs/train/small.yaml looks
        elif words[:2] in (["kubectl", "get"], ["kubectl", "delete"], ["kubectl", "logs"]):
            plain = [w for i, w in enumerate(words[2:], 2) if not w.startswith("-") and words[i - 1] not in ("-n", "-l", "-o")]
            kinds = {"raycluster": "RayCluster", "rayservice": "RayService", "rayjob": "RayJob", "secret": "RayCluster"}
            if plain and plain[0] in kinds and len(plain) > 1:
                assert (kinds[plain[0]], plain[1]) in names, command  # the auth Secret is named after its RayCluster
            if plain and plain[0].startswith("job/"):
                assert ("RayJob", plain[0].removeprefix("job/")) in names, command  # the submitter Job is named after its RayJob
            if "-l" in words and words[words.index("-l") + 1].startswith("ray.io/cronjob-name="):
                assert ("RayCronJob", words[words.index("-l") + 1].partition("=")[2]) in names, command
        elif words[:2] == ["kubectl", "create"]:
            assert words[2:4] == ["namespace", namespace] or words[2:5] == ["secret", "generic", "reelforge-s3"], command
        elif words[0].endswith("python") and words[1:3] == ["-m", "infra.k8s.validate"]:
            assert validate_main([str(REPO / overlay) for overlay in words[3:]]) == 0, command
        elif words[:2] == ["helm", "install"]:
            assert words[words.index("--version") + 1] == "1.7.0" and (REPO / words[words.index("-f") + 1]).is_file(), command
        elif words[:2] == ["docker", "build"]:
            dockerfile = (REPO / words[words.index("-f") + 1]).read_text()
            build_args = {words[i + 1].partition("=")[0] for i, word in enumerate(words) if word == "--build-arg"}
            assert build_args <= set(re.findall(r"^ARG (\w+)", dockerfile, re.M)), command
            image = one(rendered["object-storage"], "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
            assert words[words.index("-t") + 1] == image, command  # the overlays run the image this builds
        else:
            assert words[:2] in (["helm", "repo"], ["docker", "push"], ["kubectl", "get"]) or words[0] == "curl", f"unchecked command: {command}"
            continue
        checked += 1
    assert checked >= 15, commands
