"""What each DAG task does, without Airflow: plain functions of the settings and a Jobs API client.

    plan_ingest(settings, client)        -> the batch to ingest (pending, or new), or None: nothing to do
    ingest_batch(settings, client, b)    -> the batch record, once `ingest-<batch id>` SUCCEEDED
    recaption(settings, client)          -> the job, once `recaption-<set>-<digest>` SUCCEEDED
    train(settings, client)              -> the job, once `train-<digest>` SUCCEEDED

Each job's submission id is a function of what it works on, so that any number of tries runs one
job (infra/airflow/jobs.py): an ingest batch's id (infra/airflow/batches.py), and for recaption and
training a digest of the shards' state (the sha256 of their manifest.parquet, which every ingest that
adds a clip rewrites, and of the caption set's manifest.json) and of the command line itself, so
that other settings make another job rather than re-attaching to one that runs different arguments.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
from typing import Any

from infra.airflow import batches
from infra.airflow.batches import Batch
from infra.airflow.jobs import RESUBMIT_AFTER, latest_attempt, run_job
from infra.airflow.locations import Location
from infra.airflow.settings import DagSettings
from infra.ray_jobs import RayJobsClient

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"  # written last by ingest and by recaption (docs/data-format.md, docs/captions.md)
MANIFEST = "manifest.parquet"


def ingest_id(batch: Batch) -> str:
    return f"ingest-{batch.batch_id}"


def ingest_entrypoint(settings: DagSettings, batch: Batch) -> str:
    # The batch's files by name, not the landing folder: the job ingests exactly the batch, so its
    # record is exact, and a file still uploading when the batch was formed is not picked up.
    return shlex.join(["python", "-m", "infra", "ingest", *batch.paths, "--out", str(settings.shards), *settings.ingest_args])


def plan_ingest(settings: DagSettings, client: RayJobsClient) -> dict[str, Any] | None:
    """The batch to ingest now, as JSON for the next task: a pending batch whose job may still
    succeed, else the new landing files (written down as pending first); None when there are none."""
    for batch in batches.pending_batches(settings.shards):
        if batches.record_path(settings.shards, batch.batch_id).is_file():
            batches.drop_pending(settings.shards, batch)  # recorded by a try killed before it could drop it
            continue
        attempt, job = latest_attempt(client, ingest_id(batch))
        if job is None or job["status"] not in RESUBMIT_AFTER:
            state = job["status"] if job else "not submitted yet"
            logger.info("batch %s (%d files) is pending (job %s: %s): taking it again", batch.batch_id, len(batch.files), ingest_id(batch), state)
            return batch.as_json()
        logger.warning("batch %s: its job %s %s; its files are new again", batch.batch_id, job["submission_id"], job["status"])
        batches.drop_pending(settings.shards, batch)
    landing = batches.list_landing(settings.landing, min_age_s=settings.landing_min_age_s)
    new = batches.new_files(landing, settings.shards)
    if not new:
        logger.info("no new files in %s (%d files, all in batch records): nothing to ingest", settings.landing, len(landing))
        return None
    batch = batches.take_batch(new)
    batches.write_pending(settings.shards, batch)
    logger.info("batch %s: %d new files of %d in %s", batch.batch_id, len(batch.files), len(landing), settings.landing)
    if len(batch.files) < len(new):
        logger.info("%d more new files wait for the next run (one command line holds this many)", len(new) - len(batch.files))
    return batch.as_json()


def ingest_batch(settings: DagSettings, client: RayJobsClient, batch_json: dict[str, Any]) -> dict[str, Any]:
    """Ingest the batch (or re-attach to its job) and record it; its batch record."""
    batch = Batch.from_json(batch_json)
    recorded = batches.record_path(settings.shards, batch.batch_id)
    if recorded.is_file():  # a retry of a try that was killed after writing the record
        logger.info("batch %s is recorded already (%s)", batch.batch_id, recorded)
        batches.drop_pending(settings.shards, batch)
        return batches.read_record(settings.shards, batch.batch_id)
    metadata = {"reelforge_dag": "reelforge_ingest", "reelforge_batch": batch.batch_id, "reelforge_files": str(len(batch.files))}
    job = run_job(client, ingest_id(batch), ingest_entrypoint(settings, batch), metadata=metadata, poll_s=settings.poll_s)
    if not (settings.shards / SUCCESS).is_file():
        raise RuntimeError(f"job {job['submission_id']} SUCCEEDED but {settings.shards / SUCCESS} is missing; is REELFORGE_SHARDS the folder the cluster wrote?")
    record = batches.write_record(settings.shards, batch, job)
    logger.info("batch %s recorded in %s", batch.batch_id, recorded)
    return record


def recaption(settings: DagSettings, client: RayJobsClient) -> dict[str, Any]:
    """Caption the clips of the shards that the caption set lacks (recaption skips those it holds)."""
    if settings.caption_set is None:
        raise ValueError("REELFORGE_CAPTION_SET is not set, so there is no caption set to write; set it to recaption")
    entrypoint = shlex.join(
        ["python", "-m", "infra", "recaption", str(settings.shards), "--caption-set", settings.caption_set, *settings.recaption_args]
    )
    digest = _digest(_finished_manifest(settings.shards).sha256(), entrypoint)
    metadata = {"reelforge_dag": "reelforge_recaption", "reelforge_caption_set": settings.caption_set}
    job = run_job(client, f"recaption-{settings.caption_set}-{digest}", entrypoint, metadata=metadata, poll_s=settings.poll_s)
    if not (captions_folder(settings) / SUCCESS).is_file():
        raise RuntimeError(f"job {job['submission_id']} SUCCEEDED but {captions_folder(settings) / SUCCESS} is missing")
    return _summary(job)


def train(settings: DagSettings, client: RayJobsClient) -> dict[str, Any]:
    """A training run on the shards as they are (and the caption set, when there is one), in a
    folder of REELFORGE_RUNS named after its job; it registers the model under the training config's
    alias (`registry.alias`, `candidate` unless set otherwise)."""
    if settings.train_config is None or settings.runs is None:
        raise ValueError("REELFORGE_TRAIN_CONFIG is not set, so there is no training to run; set it (and REELFORGE_RUNS) to train")
    command = ["--config", settings.train_config, "--data", str(settings.shards)]
    state = [_finished_manifest(settings.shards).sha256()]
    if settings.caption_set is not None:
        if not (captions_folder(settings) / SUCCESS).is_file():
            raise ValueError(f"caption set {captions_folder(settings)} is not finished (no {SUCCESS}); run reelforge_recaption first")
        command += ["--set", f"data.caption_set={settings.caption_set}"]
        state.append((captions_folder(settings) / "manifest.json").sha256())
    if settings.tracking_uri is not None:
        command += ["--set", f"mlflow.tracking_uri={settings.tracking_uri}"]
    if settings.model_name is not None:
        command += ["--set", f"registry.model_name={settings.model_name}"]
    command += settings.train_args
    # The run's folder is named after the job, so the digest covers the command without --out.
    train_id = f"train-{_digest(*state, shlex.join(command))}"
    entrypoint = shlex.join(["python", "-m", "infra", "train", *command, "--out", str(settings.runs / train_id)])
    metadata = {"reelforge_dag": "reelforge_train", "reelforge_config": settings.train_config}
    return _summary(run_job(client, train_id, entrypoint, metadata=metadata, poll_s=settings.poll_s))


def captions_folder(settings: DagSettings) -> Location:
    return settings.shards / "captions" / str(settings.caption_set)


def _finished_manifest(shards: Location) -> Location:
    if not (shards / SUCCESS).is_file():
        raise ValueError(f"{shards} is not a finished ingest output (no {SUCCESS}); run reelforge_ingest first")
    return shards / MANIFEST


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    """What a task returns (its XCom): the job's id, command and times."""
    return {key: job.get(key) for key in ("submission_id", "entrypoint", "status", "start_time", "end_time")}
