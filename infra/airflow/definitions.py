"""The three DAGs, built with Airflow 3's Task SDK (`airflow.sdk`: `dag`, `task`, `Asset`).

    reelforge_ingest      nightly (REELFORGE_INGEST_SCHEDULE) and on each event of the asset
                          `reelforge_landing`: find_new_files >> ingest_batch, whose outlet is `reelforge_shards`
    reelforge_recaption   on `reelforge_shards` (when REELFORGE_CAPTION_SET is set): recaption, outlet `reelforge_captions`
    reelforge_train       on `reelforge_captions` when there is a caption set, else on `reelforge_shards`
                          (when REELFORGE_TRAIN_CONFIG is set): train, which registers the model

Training follows recaptioning rather than running beside it: a run started on new shards before
their clips are recaptioned would skip those clips, which have no caption in the set yet. A DAG whose work is not configured is
still loaded, unscheduled; run by hand, its task fails saying which variable to set.

Each builder imports `airflow.sdk` itself, so this module imports without Airflow: the DAG files
call the builders only where Airflow is installed (`airflow_installed`), and the project venv, which
has none, imports every infra/ file (tests/test_architecture.py). The tasks' work is infra/airflow/tasks.py.
"""

from __future__ import annotations

import importlib.util
from datetime import datetime, timedelta, timezone
from typing import Any

from infra.airflow import tasks
from infra.airflow.settings import DagSettings, ray_address
from infra.ray_jobs import RayJobsClient

DOC = "reelforge's scheduled ingestion, recaptioning and training: docs/airflow.md"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)  # any past date: catchup is off
# A try that fails (the job failed, the cluster did not answer) is retried; the retry re-attaches to
# the job or submits its next attempt (infra/airflow/jobs.py), so retrying never doubles a job.
DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(minutes=2)}
LANDING_ASSET, SHARDS_ASSET, CAPTIONS_ASSET = "reelforge_landing", "reelforge_shards", "reelforge_captions"


def airflow_installed() -> bool:
    return importlib.util.find_spec("airflow") is not None


def client() -> RayJobsClient:
    """The cluster the jobs run on: REELFORGE_RAY_ADDRESS or RAY_ADDRESS, with the token Ray's own
    loader would find (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    return RayJobsClient.from_environment(ray_address())


def assets(settings: DagSettings) -> dict[str, Any]:
    from airflow.sdk import Asset

    return {
        LANDING_ASSET: Asset(name=LANDING_ASSET, uri=settings.landing.asset_uri),
        SHARDS_ASSET: Asset(name=SHARDS_ASSET, uri=settings.shards.asset_uri),
        CAPTIONS_ASSET: Asset(name=CAPTIONS_ASSET, uri=tasks.captions_folder(settings).asset_uri),
    }


def ingest_dag(settings: DagSettings | None = None) -> Any:
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task

    settings = settings or DagSettings.from_environment()
    outlets = assets(settings)
    schedule = AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(settings.ingest_schedule, timezone="UTC"), assets=[outlets[LANDING_ASSET]]
    )

    # One run at a time: two runs would form batches from the same new files.
    @dag(dag_id="reelforge_ingest", schedule=schedule, start_date=START, catchup=False, max_active_runs=1,
         default_args=DEFAULT_ARGS, tags=["reelforge"], doc_md=DOC)  # fmt: skip
    def reelforge_ingest() -> None:
        @task.short_circuit
        def find_new_files() -> dict[str, Any] | None:
            """The batch to ingest (pending or new); none skips ingest_batch, so no asset event either."""
            return tasks.plan_ingest(settings, client())

        @task(outlets=[outlets[SHARDS_ASSET]])
        def ingest_batch(batch: dict[str, Any]) -> dict[str, Any]:
            return tasks.ingest_batch(settings, client(), batch)

        ingest_batch(find_new_files())

    return reelforge_ingest()


def recaption_dag(settings: DagSettings | None = None) -> Any:
    from airflow.sdk import dag, task

    settings = settings or DagSettings.from_environment()
    outlets = assets(settings)
    schedule = [outlets[SHARDS_ASSET]] if settings.caption_set else None

    @dag(dag_id="reelforge_recaption", schedule=schedule, start_date=START, catchup=False, max_active_runs=1,
         default_args=DEFAULT_ARGS, tags=["reelforge"], doc_md=DOC)  # fmt: skip
    def reelforge_recaption() -> None:
        @task(outlets=[outlets[CAPTIONS_ASSET]])
        def recaption() -> dict[str, Any]:
            return tasks.recaption(settings, client())

        recaption()

    return reelforge_recaption()


def train_dag(settings: DagSettings | None = None) -> Any:
    from airflow.sdk import dag, task

    settings = settings or DagSettings.from_environment()
    outlets = assets(settings)
    schedule = None
    if settings.train_config:
        schedule = [outlets[CAPTIONS_ASSET] if settings.caption_set else outlets[SHARDS_ASSET]]

    @dag(dag_id="reelforge_train", schedule=schedule, start_date=START, catchup=False, max_active_runs=1,
         default_args=DEFAULT_ARGS, tags=["reelforge"], doc_md=DOC)  # fmt: skip
    def reelforge_train() -> None:
        @task
        def train() -> dict[str, Any]:
            return tasks.train(settings, client())

        train()

    return reelforge_train()
