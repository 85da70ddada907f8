"""Where serving jobs live: `--store DIR|s3://…`, one folder per job, the truth a restarted server reads.

    jobs/<id>/request.json   the validated request (media cells base64, the seed always filled)
    jobs/<id>/status.json    status, progress, error, timings; written last at submit, so a job
                             without one never got its 202 and is swept
    jobs/<id>/video.mp4      the result, before status turns `completed`
    jobs/<id>/result.json    seed, resolved model version, bundle sha256, prompts, timings
    keys/<sha>.json          Idempotency-Key -> job id and the hash of the request it came with
    _work/lease.json         the server that owns this store (one at a time: it runs the queue)

Files go through pipelines/output.py's OutputDir: temp name + rename, pyarrow filesystems, every
failure a StorageError naming the path. The server is the store's only writer (the lease), so it
keeps the statuses in memory too and reads the folder only when it starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any

import pyarrow.fs as pafs

from pipelines.output import OutputDir, storage_errors

JOBS = "jobs"
KEYS = "keys"
ID_RE = re.compile(r"^video_[0-9a-f]{24}$")


def new_job_id() -> str:
    return f"video_{secrets.token_hex(12)}"


def request_sha256(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.out = OutputDir(uri)

    def _name(self, job_id: str, file: str) -> str:
        if not ID_RE.match(job_id):  # ids become paths: never let one climb out of jobs/
            raise ValueError(f"bad job id {job_id!r}")
        return f"{JOBS}/{job_id}/{file}"

    def _write_json(self, name: str, record: dict[str, Any]) -> None:
        self.out.write_bytes(name, json.dumps(record, sort_keys=True).encode())

    def prepare(self) -> None:
        """Create the store's folders (a no-op on object stores, which have none)."""
        for folder in (JOBS, KEYS):
            with storage_errors(f"cannot create {self.out.path(folder)}"):
                self.out.fs.create_dir(self.out.path(folder), recursive=True)

    # -- one job --------------------------------------------------------------------------------

    def create(self, job_id: str, request: dict[str, Any], status: dict[str, Any]) -> None:
        """Request first, status last: a job exists once its status does."""
        folder = self.out.path(f"{JOBS}/{job_id}")
        with storage_errors(f"cannot create {folder}"):
            self.out.fs.create_dir(folder, recursive=True)
        self._write_json(self._name(job_id, "request.json"), request)
        self._write_json(self._name(job_id, "status.json"), status)

    def request(self, job_id: str) -> dict[str, Any] | None:
        return self.out.read_json(self._name(job_id, "request.json"))

    def status(self, job_id: str) -> dict[str, Any] | None:
        return self.out.read_json(self._name(job_id, "status.json"))

    def write_status(self, status: dict[str, Any]) -> None:
        self._write_json(self._name(status["id"], "status.json"), status)

    def write_result(self, job_id: str, video: bytes, result: dict[str, Any]) -> None:
        self.out.write_bytes(self._name(job_id, "video.mp4"), video)
        self._write_json(self._name(job_id, "result.json"), result)

    def result(self, job_id: str) -> dict[str, Any] | None:
        return self.out.read_json(self._name(job_id, "result.json"))

    def video(self, job_id: str) -> bytes:
        return self.out.read_bytes(self._name(job_id, "video.mp4"))

    def local_video_path(self, job_id: str) -> str | None:
        """The MP4's local path when the store is a local folder (served as a file), else None."""
        return self.out.path(self._name(job_id, "video.mp4")) if self.out.is_local else None

    def delete(self, job_id: str) -> None:
        folder = self.out.path(f"{JOBS}/{job_id}")
        self._name(job_id, "")  # checks the id
        with storage_errors(f"cannot delete {folder}"):
            try:
                self.out.fs.delete_dir(folder)
            except FileNotFoundError:
                pass

    # -- all jobs -------------------------------------------------------------------------------

    def job_ids(self) -> list[str]:
        """Ids of every job folder, complete or not."""
        base = self.out.path(JOBS)
        with storage_errors(f"cannot list {base}"):
            if self.out.fs.get_file_info(base).type != pafs.FileType.Directory:
                return []
            infos = self.out.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory and ID_RE.match(info.base_name))

    # -- Idempotency-Key ------------------------------------------------------------------------

    def _key_name(self, key: str) -> str:
        return f"{KEYS}/{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def idempotent_job(self, key: str) -> dict[str, Any] | None:
        """{"id", "request_sha256"} recorded for `key`, or None."""
        return self.out.read_json(self._key_name(key))

    def remember_key(self, key: str, job_id: str, digest: str) -> None:
        self._write_json(self._key_name(key), {"id": job_id, "request_sha256": digest})

    def forget_keys(self, job_ids: set[str]) -> None:
        for name in self.out.list(KEYS):
            record = self.out.read_json(name)
            if record is not None and record.get("id") in job_ids:
                self.out.delete(name)
