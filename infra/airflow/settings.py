"""The DAGs' settings: environment variables, read and checked in one place (docs/airflow.md lists them).

Airflow 3 creates no default connections, and the DAGs need no Airflow connection or Variable at all:
each setting is an environment variable of the Airflow components that parse DAGs and run tasks
(the dag processor and the workers; `airflow dags test` is both). A bad value fails the DAG file's
import in one line that names the variable, so Airflow shows it as that file's import error.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.airflow.locations import Location

DEFAULT_INGEST_SCHEDULE = "0 2 * * *"  # nightly, 02:00 UTC
# A file modified more recently than this may still be uploading: it waits for a later run.
DEFAULT_LANDING_MIN_AGE_S = 300.0
DEFAULT_POLL_S = 5.0
# The arguments a DAG sets itself on each command, which the *_ARGS variables may not set again.
_OWN_ARGS = {
    "REELFORGE_INGEST_ARGS": ("--out", "--new-output"),
    "REELFORGE_RECAPTION_ARGS": ("--caption-set",),
    "REELFORGE_TRAIN_ARGS": ("--config", "--data", "--out", "--resume", "--launcher"),
}


@dataclass(frozen=True)
class DagSettings:
    landing: Location  # REELFORGE_LANDING: the folder or bucket prefix new footage lands in
    shards: Location  # REELFORGE_SHARDS: ingest's --out (a folder or a prefix); batch records go to its _batches/
    ingest_args: tuple[str, ...]  # REELFORGE_INGEST_ARGS, e.g. "--config ingest/demo"
    ingest_schedule: str  # REELFORGE_INGEST_SCHEDULE: a cron expression, UTC
    landing_min_age_s: float  # REELFORGE_LANDING_MIN_AGE_S
    caption_set: str | None  # REELFORGE_CAPTION_SET: None = no recaptioning
    recaption_args: tuple[str, ...]  # REELFORGE_RECAPTION_ARGS: the captioner (--set caption.backend=openai ...)
    train_config: str | None  # REELFORGE_TRAIN_CONFIG: None = no training
    runs: Path | None  # REELFORGE_RUNS: each training run's --out is a folder in it
    train_args: tuple[str, ...]  # REELFORGE_TRAIN_ARGS
    tracking_uri: str | None  # REELFORGE_MLFLOW_TRACKING_URI (default: sqlite:///<RUNS>/mlflow.db)
    model_name: str | None  # REELFORGE_MODEL_NAME: registry.model_name (default: the training config's)
    poll_s: float  # REELFORGE_POLL_S: how often a task asks the cluster about its job

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> DagSettings:
        env = os.environ if environ is None else environ
        train_config = _text(env, "REELFORGE_TRAIN_CONFIG")
        runs = _folder(env, "REELFORGE_RUNS", required=train_config is not None)
        tracking_uri = _text(env, "REELFORGE_MLFLOW_TRACKING_URI")
        if tracking_uri is None and runs is not None:
            tracking_uri = f"sqlite:///{runs / 'mlflow.db'}"  # one store for every run, so @candidate moves
        if tracking_uri is not None:
            _check_store(tracking_uri)
        return cls(
            landing=_location(env, "REELFORGE_LANDING"),
            shards=_location(env, "REELFORGE_SHARDS"),
            ingest_args=_args(env, "REELFORGE_INGEST_ARGS"),
            ingest_schedule=_text(env, "REELFORGE_INGEST_SCHEDULE") or DEFAULT_INGEST_SCHEDULE,
            landing_min_age_s=_seconds(env, "REELFORGE_LANDING_MIN_AGE_S", DEFAULT_LANDING_MIN_AGE_S),
            caption_set=_text(env, "REELFORGE_CAPTION_SET"),
            recaption_args=_args(env, "REELFORGE_RECAPTION_ARGS"),
            train_config=train_config,
            runs=runs,
            train_args=_args(env, "REELFORGE_TRAIN_ARGS"),
            tracking_uri=tracking_uri,
            model_name=_text(env, "REELFORGE_MODEL_NAME"),
            poll_s=_seconds(env, "REELFORGE_POLL_S", DEFAULT_POLL_S),
        )


def ray_address(environ: Mapping[str, str] | None = None) -> str | None:
    """REELFORGE_RAY_ADDRESS, else RAY_ADDRESS: the cluster's dashboard URL (read when a task runs)."""
    env = os.environ if environ is None else environ
    return _text(env, "REELFORGE_RAY_ADDRESS") or _text(env, "RAY_ADDRESS")


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _location(env: Mapping[str, str], name: str) -> Location:
    """An absolute folder or an object-store prefix that the Airflow workers and the Ray jobs both
    reach at the same name (a shared volume, a bucket). Only the spelling is checked here: a DAG file
    is parsed often and must not wait on storage."""
    value = _text(env, name)
    if value is None:
        raise ValueError(f"{name} is not set; set it to an absolute folder or an object-store prefix (s3://BUCKET/PREFIX) "
                         "that the Airflow workers and the Ray cluster both see")  # fmt: skip
    return Location.parse(value, name)


def _folder(env: Mapping[str, str], name: str, *, required: bool) -> Path | None:
    """An absolute local folder: the training runs' folders and their local MLflow store."""
    value = _text(env, name)
    if value is None:
        if required:
            raise ValueError(f"{name} is not set; set it to an absolute folder that the Airflow workers and the Ray cluster both see")
        return None
    path = Path(value.removeprefix("file://"))
    if not path.is_absolute():
        raise ValueError(f"{name}={value} is relative; give an absolute folder that the Airflow workers and the Ray cluster both see")
    return path


def _args(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    try:
        args = tuple(shlex.split(env.get(name, "")))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc} (it is split as a shell would split it)") from None
    for arg in args:
        if arg.split("=", 1)[0] in _OWN_ARGS[name]:
            raise ValueError(f"{name} sets {arg.split('=', 1)[0]}, which the DAG sets itself (docs/airflow.md); leave it out")
    return args


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = _text(env, name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value} is not a number of seconds") from None
    if seconds < 0:
        raise ValueError(f"{name}={value} is negative")
    return seconds


def _check_store(uri: str) -> None:
    """A local MLflow store must be absolute: the training job runs in another folder than Airflow."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
    elif "://" in uri and not uri.startswith("file://"):
        return  # a tracking server (http://...) or a database URL
    else:
        path = uri.removeprefix("file://")
    if not path.startswith("/"):
        raise ValueError(
            f"REELFORGE_MLFLOW_TRACKING_URI={uri} is relative; give a tracking server (http://HOST:5000) or an "
            "absolute store every node sees (sqlite:////shared/mlflow.db)"
        )
