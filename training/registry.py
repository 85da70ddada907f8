"""Log a trained bundle as an MLflow pyfunc, register it, and point an alias at it.

    info = log_model("runs/tiny/bundle", run_id, tracking_uri=uri)     # artifact "model" of the run
    version = register(run_id, "reelforge-t2v", "candidate", tracking_uri=uri)
    log_and_register("runs/tiny/bundle", run_id, cfg.registry, uri)   # both, as the training driver does

    promote("reelforge-t2v", "champion", tracking_uri=uri, from_alias="candidate")

`register` (what `reelforge register` calls) registers the run's logged model. A run that has no
logged model yet is logged first, from `bundle_dir` or else from the run's `bundle/` artifact;
with neither it stops with a one-line ValueError. Registering never retrains or re-exports: the
bundle the run produced is what ships.

`promote` (what `reelforge promote` calls) moves a registry alias to a model version: the release
step after a candidate has been checked. Serving and `reelforge generate` resolve
`models:/NAME@champion` at load time, so moving the alias is the whole deployment (and moving it
back is the rollback).

Registering is idempotent: a version of NAME from the same run with the same bundle (its sha256,
tag `reelforge.bundle_sha256` on the logged model and the version, or else the same logged model)
is reused and only the alias moves, so rerunning a finished training (`make demo` twice) adds no
version for unchanged weights.

The model registry lives in the tracking store (`tracking_uri`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model.bundle import bundle_sha256
from model.errors import one_line
from training.config import RegistrySection

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # name of the logged pyfunc inside its run
BUNDLE_ARTIFACT_DIR = "bundle"  # where training stores the inference bundle among run artifacts
TAG_BUNDLE_SHA256 = "reelforge.bundle_sha256"  # on the logged model and the version: which bytes ship
TAG_RUN_ID = "reelforge.run_id"


def find_registered_version(
    client: Any, name: str, run_id: str, *, sha256: str | None = None, model_id: str | None = None
) -> Any:
    """The newest READY version of `name` registered from run `run_id` with bundle hash `sha256` (or,
    for versions without the hash, from logged model `model_id`); None if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if version.status != "READY" or version.tags.get(TAG_RUN_ID) != run_id:
            continue
        if sha256 is not None and version.tags.get(TAG_BUNDLE_SHA256) == sha256:
            return version
        if model_id is not None and getattr(version, "model_id", None) == model_id:
            return version
    return None


def _reuse(client: Any, version: Any, name: str, alias: str) -> Any:
    client.set_registered_model_alias(name, alias, version.version)
    logger.info("%s: this run's bundle is already registered as version %s; alias %s -> it", name, version.version, alias)
    return version


def log_model(bundle_dir: str | Path, run_id: str, *, tracking_uri: str) -> Any:
    """Log `bundle_dir` as pyfunc artifact `model` of run `run_id`; returns MLflow's ModelInfo.

    MLflow checks the input example by loading the model once and generating from it, so a
    bundle that cannot serve shows up here (as a warning in the log), not at deploy time."""
    import mlflow
    from mlflow import MlflowClient

    from model.pyfunc import (
        VideoGenerationModel,
        component_artifacts,
        input_example,
        model_signature,
        serving_requirements,
    )

    bundle_dir = Path(bundle_dir)
    artifacts = component_artifacts(bundle_dir)  # raises ValueError naming a dir that is no bundle
    sha256 = bundle_sha256(bundle_dir)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    prior_status = client.get_run(run_id).info.status
    # the fluent log_model writes into the active run; activating a run must end it afterwards,
    # so put back whatever state it had (a training run logging before it ends stays RUNNING)
    mlflow.start_run(run_id=run_id)
    try:
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=VideoGenerationModel(),
            artifacts=artifacts,
            code_paths=[str(Path(__file__).resolve().parent.parent / "model")],
            signature=model_signature(),
            input_example=input_example(bundle_dir),
            pip_requirements=serving_requirements(),
            tags={TAG_BUNDLE_SHA256: sha256},
        )
    finally:
        mlflow.end_run(status="FINISHED" if prior_status == "RUNNING" else prior_status)
        if prior_status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
    logger.info("logged %s as %s (artifacts: %s)", bundle_dir, info.model_uri, ", ".join(artifacts))
    return info


def find_logged_model(run_id: str, *, tracking_uri: str) -> str | None:
    """`models:/<model_id>` of the newest READY pyfunc `model` logged by the run, or None."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    # status is checked here, not in the filter: a REST server (3.17) matches `status = 'READY'` to nothing
    ready = [model for model in models if model.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None


def register(
    run_id: str,
    name: str,
    alias: str = "candidate",
    *,
    tracking_uri: str,
    bundle_dir: str | Path | None = None,
) -> Any:
    """Register the run's logged model under `name`, set `alias` on the version; returns it.

    No logged model yet: log `bundle_dir`, else the run's `bundle/` artifact, first. A version of
    `name` from this run with the same bundle already there: reuse it (only the alias moves)."""
    import mlflow
    from mlflow import MlflowClient

    check_names(name, alias)
    client = MlflowClient(tracking_uri)
    model_uri = find_logged_model(run_id, tracking_uri=tracking_uri)
    if model_uri is None:
        model_uri = _log_from_bundle(run_id, client, tracking_uri, bundle_dir)
    model_id = model_uri.removeprefix("models:/")
    sha256 = client.get_logged_model(model_id).tags.get(TAG_BUNDLE_SHA256)
    existing = find_registered_version(client, name, run_id, sha256=sha256, model_id=model_id)
    if existing is not None:
        return _reuse(client, existing, name, alias)
    mlflow.set_tracking_uri(tracking_uri)
    run_tags = client.get_run(run_id).data.tags
    # carry the provenance tags onto the version so the registry page alone says what it is; evaluation
    # reads two of them: the data (reelforge.data_manifest_sha256) and its held-out split (reelforge.data.held_out)
    tags = {k: v for k, v in run_tags.items() if k.startswith("reelforge.") or k == "mlflow.source.git.commit"}
    tags |= {TAG_RUN_ID: run_id} | ({TAG_BUNDLE_SHA256: sha256} if sha256 else {})
    model_version = mlflow.register_model(model_uri, name, tags=tags)
    client.set_registered_model_alias(name, alias, model_version.version)
    logger.info("registered %s as %s version %s, alias %s", model_uri, name, model_version.version, alias)
    return model_version


def check_names(name: str, alias: str) -> None:
    """The config's rules for model names and aliases, as a one-line ValueError naming the value."""
    try:
        RegistrySection(model_name=name, alias=alias)
    except ValidationError as exc:
        raise ValueError(_validation_line(exc)) from None


def _validation_line(exc: ValidationError) -> str:
    """`alias: String should match pattern '...' (got 'Not An Alias')`: pydantic's errors as one
    line, each naming the field and the value given."""
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']} (got {error['input']!r})"
        for error in exc.errors()
    )


def log_and_register(bundle_dir: str | Path, run_id: str, registry: RegistrySection, tracking_uri: str) -> Any:
    """What the training driver calls at the end: log the bundle, register it, set the alias. A run
    that registered this very bundle before (a finished training run again) logs nothing new and
    reuses its version."""
    from mlflow import MlflowClient

    check_names(registry.model_name, registry.alias)
    client = MlflowClient(tracking_uri)
    existing = find_registered_version(client, registry.model_name, run_id, sha256=bundle_sha256(bundle_dir))
    if existing is not None:
        return _reuse(client, existing, registry.model_name, registry.alias)
    log_model(bundle_dir, run_id, tracking_uri=tracking_uri)
    return register(run_id, registry.model_name, registry.alias, tracking_uri=tracking_uri)


def _log_from_bundle(run_id: str, client: Any, tracking_uri: str, bundle_dir: str | Path | None) -> str:
    if bundle_dir is not None:
        return log_model(bundle_dir, run_id, tracking_uri=tracking_uri).model_uri
    names = {item.path for item in client.list_artifacts(run_id, BUNDLE_ARTIFACT_DIR)}
    if f"{BUNDLE_ARTIFACT_DIR}/model_config.json" not in names:
        raise ValueError(
            f"run {run_id} has no logged model and no {BUNDLE_ARTIFACT_DIR}/ artifact; pass --bundle DIR "
            "(the training output's bundle folder)"
        )
    with tempfile.TemporaryDirectory(prefix="reelforge-register-") as tmp:
        local = client.download_artifacts(run_id, BUNDLE_ARTIFACT_DIR, tmp)
        return log_model(local, run_id, tracking_uri=tracking_uri).model_uri


def promote(
    name: str, alias: str, *, tracking_uri: str, version: int | None = None, from_alias: str | None = None
) -> Any:
    """Point `alias` of model `name` at `version`, or at the version `from_alias` points to now.
    Returns that ModelVersion; the version the alias left is logged."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if (version is None) == (from_alias is None):
        raise ValueError("give exactly one of version or from_alias")
    check_names(name, alias)
    client = MlflowClient(tracking_uri)
    if from_alias is not None:
        try:
            target = client.get_model_version_by_alias(name, from_alias)
        except MlflowException:
            raise ValueError(f"model {name!r} has no alias {from_alias!r}") from None
    else:
        try:
            target = client.get_model_version(name, str(version))
        except MlflowException:
            raise ValueError(f"model {name!r} has no version {version}") from None
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None  # first time this alias is set
    client.set_registered_model_alias(name, alias, target.version)
    logger.info("%s@%s: version %s -> %s", name, alias, previous or "(unset)", target.version)
    return target


# --- a registered model as a local bundle (what `reelforge generate --model models:/...` loads) ---


def download_registered_bundle(model_uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local bundle folder for a logged or registered model: `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `models:/<model id>` or `runs:/<run id>/model`, from the store
    `$MLFLOW_TRACKING_URI` names. What `reelforge generate --model models:/...` loads.

    Downloaded once per model version (an alias is resolved to its version first, so moving the
    alias fetches the new one) into `cache_dir` (default `$REELFORGE_CACHE/models`, else
    `~/.cache/reelforge/models`); the AE / text encoder specs point into the download."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from model.pyfunc import BUNDLE_ARTIFACT, relocate_bundle

    tracking_uri = mlflow.get_tracking_uri()
    try:
        pinned = _pin_version(MlflowClient(), model_uri)
    except MlflowException as exc:
        raise ValueError(f"--model {model_uri!r}: {one_line(exc)} (store {tracking_uri})") from None
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    key = hashlib.sha256(f"{tracking_uri}|{pinned}".encode()).hexdigest()[:16]
    model_dir = root / key
    if not (model_dir / "MLmodel").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f"{key}.tmp-{os.getpid()}"
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(staging))
        except MlflowException as exc:
            raise ValueError(f"--model {model_uri!r}: {one_line(exc)}") from None
        if not (Path(local) / "MLmodel").is_file():
            raise ValueError(f"--model {model_uri!r}: not an MLflow model (no MLmodel file)")
        if model_dir.exists():  # a concurrent download finished first; keep that one
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(local, model_dir)
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("downloaded %s (%s) to %s", model_uri, pinned, model_dir)
    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    artifacts = {name: str(model_dir / info["path"]) for name, info in flavor.get("artifacts", {}).items()}
    if BUNDLE_ARTIFACT not in artifacts:
        raise ValueError(f"--model {model_uri!r}: not a reelforge model (no {BUNDLE_ARTIFACT!r} artifact)")
    return relocate_bundle(artifacts[BUNDLE_ARTIFACT], artifacts, model_dir / "bundle-local")


def _pin_version(client: Any, model_uri: str) -> str:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` (what the alias points at now); others as given."""
    name, at, alias = model_uri.removeprefix("models:/").partition("@")
    if model_uri.startswith("models:/") and at:
        return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
    return model_uri


def _default_cache_dir() -> Path:
    base = os.environ.get("REELFORGE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "reelforge") / "models"
