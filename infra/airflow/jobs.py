"""A Ray job run at most once per submission id, however often the Airflow task that wants it runs.

A task names its job by a deterministic id (`ingest-<batch id>`, `recaption-...`, `train-...`) and
calls `run_job`, which:

1. finds the latest attempt: `ID`, then `ID-2`, `ID-3`, ... while the cluster has a job by that name;
2. re-attaches to it when it is pending, running or succeeded (a retried task, a killed worker's
   successor, a rerun of the DAG), after checking that it runs the same command;
3. submits the next attempt when there is none or the latest failed or was stopped: a failure is
   never re-attached to for ever, and each Airflow try gets one new job at most. Two tries that race
   to submit the same attempt id both end up on one job: Ray refuses the second submission
   (`SubmissionIdTaken`) and that try re-attaches;
4. follows the job's output into the task's log, line by line, until the job ends; raises
   `JobFailed` with the job's one-line reason unless it SUCCEEDED.

The job runs in the cluster's own environment (the image or venv that has reelforge installed): no
working_dir is uploaded, so the Airflow side needs neither Ray nor a checkout to package.
"""

from __future__ import annotations

import logging
from typing import Any

from infra.ray_jobs import RayJobsClient, SubmissionIdTaken, failure_reason

logger = logging.getLogger(__name__)

RESUBMIT_AFTER = frozenset({"FAILED", "STOPPED"})


class JobFailed(RuntimeError):
    """The job ended without succeeding; the text is one line: its id, status and reason."""


def attempt_id(base_id: str, attempt: int) -> str:
    return base_id if attempt == 1 else f"{base_id}-{attempt}"


def latest_attempt(client: RayJobsClient, base_id: str) -> tuple[int, dict[str, Any] | None]:
    """(attempt number, JobDetails) of the latest job for `base_id`; (0, None) when there is none."""
    attempt, job = 0, None
    while (found := client.find(attempt_id(base_id, attempt + 1))) is not None:
        attempt, job = attempt + 1, found
    return attempt, job


def run_job(
    client: RayJobsClient, base_id: str, entrypoint: str, *, metadata: dict[str, str], poll_s: float
) -> dict[str, Any]:
    """Run `entrypoint` as the job `base_id` (module docstring); its final JobDetails once it SUCCEEDED."""
    attempt, job = latest_attempt(client, base_id)
    if job is not None and job["status"] not in RESUBMIT_AFTER:
        submission_id = attempt_id(base_id, attempt)
        _check_same_command(client, job, entrypoint)
        logger.info("job %s exists on %s (%s): re-attaching to it", submission_id, client.address, job["status"])
    else:
        if job is not None:
            logger.warning("job %s %s (%s): submitting it again", attempt_id(base_id, attempt), job["status"], failure_reason(job))
        submission_id = attempt_id(base_id, attempt + 1)
        try:
            client.submit(entrypoint, submission_id=submission_id, metadata=metadata)
            logger.info("submitted job %s to %s: %s", submission_id, client.address, entrypoint)
        except SubmissionIdTaken:  # another try submitted it between our look and our submit
            _check_same_command(client, client.job(submission_id), entrypoint)
            logger.info("job %s was submitted meanwhile by another try: re-attaching to it", submission_id)
    follow(client, submission_id, poll_s=poll_s)
    job = client.job(submission_id)
    if job["status"] != "SUCCEEDED":
        raise JobFailed(f"job {submission_id} {job['status']}: {failure_reason(job)}")
    logger.info("job %s SUCCEEDED", submission_id)
    return job


def follow(client: RayJobsClient, submission_id: str, *, poll_s: float) -> None:
    """Log the job's output from its start, a line at a time, until the job ends."""
    job_log = logging.getLogger(f"{__name__}.{submission_id}")
    partial = ""
    for text in client.follow_logs(submission_id, poll_s=poll_s):
        *lines, partial = (partial + text).split("\n")
        for line in lines:
            job_log.info("%s", line)
    if partial:
        job_log.info("%s", partial)


def _check_same_command(client: RayJobsClient, job: dict[str, Any], entrypoint: str) -> None:
    if job["entrypoint"] != entrypoint:
        raise ValueError(
            f"job {job['submission_id']} on {client.address} runs another command ({job['entrypoint']}) than this "
            f"task's ({entrypoint}); a submission id names one job: stop it (`ray job stop {job['submission_id']}`) "
            "and clear this task once it has stopped, or restore the settings it was submitted with"
        )
