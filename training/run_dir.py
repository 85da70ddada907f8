"""The training output folder (`--out`): storage that outlasts the job, holding one run.

Two launch rules, each checked before any work and failing in one line (`PreflightError`):

1. **What a run writes must outlast it.** A Ray job runs in Ray's copy of its `--working-dir`,
   `<Ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_*/`, which Ray deletes
   with the session. A relative `--out` (the default `runs/<config>` included) or a SQLite/file
   MLflow store there would take the checkpoints, the run and the registered model with it, while
   the summary still named them. So `--out`, and an MLflow store that is a local file or folder,
   may not resolve inside the job's working-dir copy, a Ray session folder (`session_*`) or Ray's
   temp dir (`$RAY_TMPDIR/ray`, else `$TMPDIR/ray`, else `/tmp/ray`).
2. **One `--out`, one run.** `<out>/run.json` records what the run in it trains: its training
   config and its dataset (the sha256 of the shards' `manifest.parquet`, so the same shards copied
   elsewhere are the same dataset). The config is compared without `train.max_steps`: a longer run
   is the same run continued. Anything else changed (a setting, the data) is refused, naming it,
   unless `--resume` asks to continue that run anyway; the record then describes the new settings.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from model.storage import config_hash
from training.config import TrainingConfig
from training.preflight import PreflightError
from training.tracking import flat_params, manifest_sha256

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
# The one setting a run may change and stay the same run: training longer continues it.
CONTINUATION_KEYS = ("train.max_steps",)
# Ray names each session folder session_<date>_<time>_<micros>_<pid>, and links session_latest to it.
_SESSION_DIR = re.compile(r"^session_(latest|\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+)$")


# --- 1. outputs that outlast the job -----------------------------------------------------------


def ray_folder(path: str | Path) -> str | None:
    """The Ray-owned folder `path` lies in, in words, or None when it lies in none."""
    path = Path(path).resolve()
    working_dir = job_working_dir()
    if working_dir is not None and path.is_relative_to(working_dir):
        return f"this Ray job's working-dir copy {working_dir}"
    for folder in (path, *path.parents):
        if _SESSION_DIR.match(folder.name):
            return f"the Ray session folder {folder}"
    from ray._common.utils import get_default_ray_temp_dir  # Ray's own rule for its temp dir

    temp_dir = Path(get_default_ray_temp_dir()).resolve()
    return f"Ray's temp dir {temp_dir}" if path.is_relative_to(temp_dir) else None


def job_working_dir() -> Path | None:
    """This process's working directory when it is a Ray job's driver started in Ray's copy of a
    `--working-dir` (the job supervisor passes the job's runtime_env in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job_config:
        return None
    try:
        runtime_env = json.loads(job_config).get("runtime_env") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder an MLflow store keeps its data in when it is local (`sqlite:///F`,
    `file:///D`, a bare path); None for a server or a database."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///"))  # sqlite:////abs/x.db -> /abs/x.db
    if tracking_uri in ("databricks", "databricks-uc"):
        return None  # MLflow's names for a Databricks workspace, not folders
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(tracking_uri) if parsed.scheme == "" else None


def check_outputs_last(out: Path, tracking_uri: str) -> None:
    """Refuse an `--out` or a local MLflow store that Ray deletes with the session (rule 1)."""
    where = ray_folder(out)
    if where is not None:
        raise PreflightError(
            f"--out {out} resolves inside {where}, which Ray deletes with the session; pass an --out that "
            "outlasts the job, an absolute path every node sees (e.g. --out /shared/runs/NAME) or object storage"
        )
    store = local_store_path(tracking_uri)
    where = ray_folder(store) if store is not None else None
    if where is not None:
        raise PreflightError(
            f"MLflow store {tracking_uri} resolves inside {where}, which Ray deletes with the session; set "
            "mlflow.tracking_uri to a tracking server (http://HOST:5000) or a store that outlasts the job "
            "(sqlite:////shared/mlflow.db)"
        )


# --- 2. one output folder, one run ---------------------------------------------------------------


def run_identity(config: TrainingConfig, data: str) -> dict[str, Any]:
    """What makes a run this run: its settings but the continuation keys, and its dataset."""
    settings = {key: value for key, value in flat_params(config).items() if key not in CONTINUATION_KEYS}
    return {
        "config_hash": config_hash(settings),
        "config": settings,
        "data": str(data),
        "data_manifest_sha256": manifest_sha256(data),
    }


def check_run_record(out: Path, identity: dict[str, Any], *, resume: bool) -> None:
    """Refuse an `--out` whose run trained another config or dataset, naming what changed, unless
    `resume` (the user passed --resume); then only warn."""
    record = out / RUN_RECORD
    if not record.is_file():
        return
    previous = json.loads(record.read_text())
    changes = []
    if previous["config_hash"] != identity["config_hash"]:
        old, new = previous["config"], identity["config"]
        keys = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
        changes.append("another config (" + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys) + ")")
    if previous["data_manifest_sha256"] != identity["data_manifest_sha256"]:
        changes.append(
            f"another dataset (manifest sha256 {previous['data_manifest_sha256'][:12]} of {previous['data']}, "
            f"this run {identity['data_manifest_sha256'][:12]} of {identity['data']})"
        )
    if not changes:
        return
    if resume:
        logger.warning("--resume: continuing the run in %s with %s", out, " and ".join(changes))
        return
    raise PreflightError(
        f"--out {out} holds a training run of {' and '.join(changes)}; use another --out, or pass --resume "
        "to continue that run with these settings"
    )


def nothing_to_resume(out: Path) -> PreflightError:
    """The error for `--resume` alone on an `--out` that holds no checkpoint to continue."""
    return PreflightError(f"--resume without CKPT continues the run in --out {out}, which holds none; pass --resume CKPT or no --resume")


def write_run_record(out: Path, identity: dict[str, Any]) -> None:
    """Record the run's identity in `out` (temp file + rename: a reader sees the old or the new one)."""
    out.mkdir(parents=True, exist_ok=True)
    temp = out / f"{RUN_RECORD}.tmp-{os.getpid()}"
    temp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    temp.replace(out / RUN_RECORD)
