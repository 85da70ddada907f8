"""A small client of Ray's Jobs REST API (the dashboard's `/api/jobs/`), standard library only.

    client = RayJobsClient.from_environment("http://head:8265")   # token from RAY_AUTH_TOKEN or Ray's token file
    submission_id = client.submit("python -m infra ingest /data/raw --out /data/shards", submission_id="ingest-1f3a")
    for text in client.follow_logs(submission_id):                  # the job's output, from the start, as it grows
        print(text, end="")
    job = client.job(submission_id)                                  # JobDetails: status, message, driver_exit_code, ...
    client.stop(submission_id)

`reelforge submit` and the Airflow DAGs talk to the cluster through this module; it never imports
Ray, so an Airflow environment needs no Ray installed. The routes, bodies and statuses are those of
Ray's own `JobSubmissionClient` (ray/dashboard/modules/job/sdk.py and job_head.py, Ray 2.60):

    POST /api/jobs/                   {entrypoint, submission_id, runtime_env, metadata, ...} -> {submission_id}
                                      (400 "Job with submission_id X already exists" for a used id)
    GET  /api/jobs/                   every job, submitted or driver-only
    GET  /api/jobs/{id}               JobDetails; 404 for an unknown id
    GET  /api/jobs/{id}/logs          {"logs": the driver's whole output so far}
    POST /api/jobs/{id}/stop          {"stopped": whether it was running}
    GET/PUT /api/packages/{protocol}/{name}   a working-dir package: exists? / upload its zip

Logs are followed by polling `/logs` (the whole text each time; what is new is the part past what
was already read). Ray's SDK tails a websocket instead, which the standard library cannot open;
a poll a second costs one small request per second for the jobs reelforge runs.

Token authentication: Ray's dashboard wants `Authorization: Bearer <token>` once the cluster runs
with RAY_AUTH_MODE=token (ray/_private/authentication/http_token_authentication.py). The token is
found where Ray's own token loader looks, in its order: $RAY_AUTH_TOKEN, the file
$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. It is sent whenever one is found (Ray's SDK sends it only
when RAY_AUTH_MODE=token is set in the submitting shell too; a cluster without authentication
ignores the header).

Every failure is a `RayJobsError` whose text is one line that says what to do.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A job in one of these never changes again (Ray's JobStatus.is_terminal).
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
TOKEN_HELP = "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"


class RayJobsError(RuntimeError):
    """A Jobs API call that could not be done, phrased as one line."""


class AuthenticationRequired(RayJobsError):
    """The cluster wants a token (401) or refused the one sent (403)."""


class JobNotFound(RayJobsError):
    """No job with that submission id on the cluster."""


class UnexpectedAnswer(RayJobsError):
    """Any other answer than the one expected; `status` and `body` keep what the cluster said."""

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status, self.body = status, body


class SubmissionIdTaken(RayJobsError):
    """A job with that submission id exists already (running or finished)."""


def find_token() -> tuple[str | None, str | None]:
    """(token, where it came from), looked up as Ray's token loader does; (None, None) when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise RayJobsError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({exc.strerror}); {TOKEN_HELP}") from None
        if not token:
            raise RayJobsError(f"RAY_AUTH_TOKEN_PATH={path} is empty; {TOKEN_HELP}")
        return token, path
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        return None, None
    return (token, str(default)) if token else (None, None)


def failure_reason(job: dict[str, Any]) -> str:
    """One line saying why a job did not succeed, from its JobDetails.

    Ray's message for a failed entrypoint is "Job entrypoint command failed with exit code N, last
    available logs ...:" followed by the last lines of its output; the last of those is the command's
    own one-line reason (`ingest: ...`, `reelforge train: ...`). Other messages (a runtime env that
    could not be set up, a stopped job) end with their reason as well."""
    message = job.get("message") or ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if message.startswith("Job entrypoint command failed"):
        code = job.get("driver_exit_code")
        return f"exit code {code}: {lines[-1]}" if len(lines) > 1 else f"exit code {code}, no output"
    reason = lines[-1] if lines else "no message"
    return f"{job['error_type']}: {reason}" if job.get("error_type") else reason


class RayJobsClient:
    """One Ray cluster's Jobs API, at its dashboard URL (`http://HEAD:8265`)."""

    def __init__(self, address: str, token: str | None = None, *, token_source: str | None = None, timeout_s: float = 30.0):
        if not address.startswith(("http://", "https://")):
            raise RayJobsError(
                f"{address!r} is not a Ray dashboard URL; give the dashboard's address, e.g. http://HEAD:8265 "
                "(not the GCS address HEAD:6379 that ray.init takes)"
            )
        self.address = address.rstrip("/")
        self.token = token
        self.token_source = token_source  # where the token came from, for the error that rejects it
        self.timeout_s = timeout_s

    @classmethod
    def from_environment(cls, address: str | None = None, *, timeout_s: float = 30.0) -> RayJobsClient:
        """A client of `address`, else $RAY_ADDRESS, with the token `find_token` finds."""
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise RayJobsError("no cluster given; pass its dashboard URL (--address http://HEAD:8265) or set RAY_ADDRESS to it")
        token, source = find_token()
        return cls(address, token, token_source=source, timeout_s=timeout_s)

    # --- jobs -------------------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        """The cluster's versions: {"version": API version, "ray_version": ..., ...}."""
        return self._json("GET", "/api/version")

    def submit(
        self,
        entrypoint: str,
        *,
        submission_id: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
    ) -> str:
        """Submit a job; its submission id (Ray makes one, `raysubmit_...`, when none is given).
        Raises `SubmissionIdTaken` when a job with `submission_id` exists already."""
        request = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "runtime_env": runtime_env,
            "metadata": metadata,
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_num_gpus": entrypoint_num_gpus,
        }
        # Like Ray's SDK, leave unset fields out so that older servers accept the request.
        body = {key: value for key, value in request.items() if value is not None}
        try:
            return self._json("POST", "/api/jobs/", body=body)["submission_id"]
        except UnexpectedAnswer as exc:
            # Ray answers a used id with an error status and the job manager's traceback, which ends in
            # "ValueError: Job with submission_id X already exists. Please use a different submission_id."
            if submission_id is not None and f"submission_id {submission_id} already exists" in exc.body:
                raise SubmissionIdTaken(f"a job with submission id {submission_id} exists on {self.address}") from None
            raise

    def job(self, submission_id: str) -> dict[str, Any]:
        """The job's JobDetails (status, message, error_type, driver_exit_code, entrypoint, metadata, ...)."""
        return self._json("GET", f"/api/jobs/{_quote(submission_id)}", job=submission_id)

    def find(self, submission_id: str) -> dict[str, Any] | None:
        """The job's JobDetails, or None when the cluster has no job with that id."""
        try:
            return self.job(submission_id)
        except JobNotFound:
            return None

    def status(self, submission_id: str) -> str:
        """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
        return self.job(submission_id)["status"]

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster knows: submitted ones (with a submission_id) and plain drivers."""
        return self._json("GET", "/api/jobs/")

    def logs(self, submission_id: str) -> str:
        """The job's whole output so far (empty until its driver starts)."""
        return self._json("GET", f"/api/jobs/{_quote(submission_id)}/logs", job=submission_id)["logs"]

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL after a grace period); whether it was running."""
        return bool(self._json("POST", f"/api/jobs/{_quote(submission_id)}/stop", job=submission_id)["stopped"])

    def follow_logs(self, submission_id: str, *, poll_s: float = 1.0, offset: int = 0) -> Iterator[str]:
        """Yield the job's output from its start (or from character `offset`, what the caller has read
        already), a piece at a time as it grows, until the job ends."""
        read = offset
        while True:
            # The status first: once it is terminal the driver has exited, so the logs read after it are complete.
            status = self.status(submission_id)
            text = self.logs(submission_id)
            if len(text) > read:
                yield text[read:]
                read = len(text)
            if status in TERMINAL_STATUSES:
                return
            time.sleep(poll_s)

    def wait(self, submission_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until the job ends; its final JobDetails. RayJobsError when `timeout_s` passes first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(submission_id)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise RayJobsError(f"job {submission_id} is still {job['status']} after {timeout_s:g} s")
            time.sleep(poll_s)

    # --- working-dir packages (built by Ray's packaging code, see infra/submit.py) -----------

    def package_exists(self, package_uri: str) -> bool:
        """Whether the cluster holds the package `gcs://_ray_pkg_<hash>.zip` already."""
        status, _ = self._request("GET", _package_path(package_uri), ok=(200, 404))
        return status == 200

    def upload_package(self, package_uri: str, data: bytes) -> None:
        """Upload a package's zip, under the URI a runtime_env's working_dir then names."""
        self._request("PUT", _package_path(package_uri), data=data)

    # --- HTTP -------------------------------------------------------------------------------

    def _json(self, method: str, path: str, *, body: dict[str, Any] | None = None, job: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        _, answer = self._request(method, path, data=data, content_type="application/json", job=job)
        return json.loads(answer)

    def _request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        content_type: str = "application/octet-stream",
        ok: tuple[int, ...] = (200,),
        job: str | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; a RayJobsError in one line for anything but a status in `ok`."""
        headers = {"Content-Type": content_type} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.address + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
            raise RayJobsError(
                f"cannot reach the Ray dashboard at {self.address} ({reason}); is the head running, and is this "
                "its dashboard address (http://HEAD:8265)?"
            ) from None
        except (TimeoutError, socket.timeout):
            raise RayJobsError(f"the Ray dashboard at {self.address} did not answer {method} {path} in {self.timeout_s:g} s") from None
        if status in ok:
            return status, text.encode()
        if status in (401, 403):
            if not self.token:
                raise AuthenticationRequired(f"the cluster at {self.address} requires a token; {TOKEN_HELP}")
            raise AuthenticationRequired(
                f"the cluster at {self.address} refused the token from {self.token_source or 'the caller'} "
                f"({status}: {_last_line(text)}); use the head's token (`ray get-auth-token` there prints it)"
            )
        if status == 404 and job is not None:
            raise JobNotFound(f"no job {job} on the cluster at {self.address}")
        if status == 404:
            raise RayJobsError(f"{self.address} has no Ray Jobs API ({method} {path}: 404); is it the Ray dashboard's address?")
        raise UnexpectedAnswer(f"the cluster at {self.address} answered {method} {path} with {status}: {_last_line(text)}", status, text)


def _quote(submission_id: str) -> str:
    return urllib.parse.quote(submission_id, safe="")


def _package_path(package_uri: str) -> str:
    """`gcs://_ray_pkg_abc.zip` -> `/api/packages/gcs/_ray_pkg_abc.zip` (Ray's uri_to_http_components)."""
    protocol, _, name = package_uri.partition("://")
    if not name.endswith(".zip"):
        raise ValueError(f"package URI {package_uri!r} is not a .zip package")
    return f"/api/packages/{protocol}/{_quote(name)}"


def _last_line(text: str) -> str:
    """The last non-empty line of an answer: Ray's error bodies are tracebacks ending in the error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no body)"
