"""The landing folder, ingest batches and their records: what `reelforge_ingest` has done, kept beside the shards.

The landing folder and the shards are Locations (infra/airflow/locations.py): local folders or
object-store prefixes, read and written the same way.

    SHARDS/_batches/<batch id>.pending.json   a batch chosen for ingest whose job has not succeeded yet
    SHARDS/_batches/<batch id>.json           a batch ingested: its files, the job that ingested them

Rules:

1. **A landing file is a source ingest would take**: a video extension (a copy of ingest's list, see
   `VIDEO_EXTENSIONS`), no name or folder below the landing folder starting with ".", and not modified
   in the last REELFORGE_LANDING_MIN_AGE_S seconds (it may still be uploading). Each is known by
   (absolute path or URI, size, mtime), as ingest's source key is: a file rewritten in place is a new
   file. On object storage the mtime is the object's LastModified, which every upload sets anew, so
   it serves as an ETag would.
2. **New files** are landing files that no batch record lists.
3. **A batch** is new files, oldest first, as many as fit in one command line (`MAX_PATHS_CHARS`).
   Its id is the first 16 hex digits of the sha256 of its sorted (path, size, mtime) lines, so the
   same files always make the same batch, whoever forms it.
4. **A batch is written down as pending before its job is submitted.** A later try (an Airflow
   retry, a killed worker's successor, the next night's run) takes the pending batch again instead of
   listing anew, so it reaches the same submission id, `ingest-<batch id>`, even when more files
   landed meanwhile. A pending batch whose last job failed is dropped, and its files are new again.
5. **The record is written once the job has succeeded** and ingest's `_SUCCESS` is there (temp file,
   then rename; one PUT on object storage); the pending file is deleted after it. A recorded batch
   is never ingested again.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import asdict, dataclass
from typing import Any

from infra.airflow.locations import Location

BATCHES_DIR = "_batches"
PENDING_SUFFIX = ".pending.json"
# The job's command line is one string that Ray's job driver hands to `/bin/sh -c`, and Linux caps one
# argument at 128 KiB (MAX_ARG_STRLEN): the batch's paths may take this much of it, the rest is spare.
MAX_PATHS_CHARS = 100_000
# A copy of pipelines/discover.py's VIDEO_EXTENSIONS (tests/infra/test_scheduled_ingestion.py checks
# that they agree): pipelines/ imports pyarrow, which Airflow's venv does not have.
VIDEO_EXTENSIONS = frozenset(
    {
        "3g2", "3gp", "amv", "asf", "avi", "dv", "f4v", "flv", "gif", "h264", "hevc", "ivf", "m1v",
        "m2t", "m2ts", "m2v", "m4a", "m4v", "mj2", "mjpeg", "mkv", "mov", "mp4", "mpe", "mpeg", "mpg", "mpv", "mts",
        "mxf", "nut", "ogg", "ogm", "ogv", "qt", "rm", "rmvb", "ts", "vob", "webm", "wmv", "y4m",
    }
)  # fmt: skip


@dataclass(frozen=True, order=True)
class LandingFile:
    path: str  # an absolute path, or an object-store URI (s3://bucket/key)
    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class Batch:
    batch_id: str
    files: tuple[LandingFile, ...]  # sorted by path

    @classmethod
    def of(cls, files: list[LandingFile]) -> Batch:
        files = sorted(files)
        lines = "".join(f"{f.path}\t{f.size_bytes}\t{f.mtime_ns}\n" for f in files)
        return cls(hashlib.sha256(lines.encode()).hexdigest()[:16], tuple(files))

    def as_json(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        batch = cls.of([LandingFile(**f) for f in data["files"]])
        if batch.batch_id != data["batch_id"]:
            raise ValueError(f"batch {data['batch_id']}: its files hash to {batch.batch_id}; the batch file was edited")
        return batch

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


# --- the landing folder ----------------------------------------------------------------------------


def is_video_name(name: str) -> bool:
    return not name.startswith(".") and "." in name and name.rsplit(".", 1)[1].lower() in VIDEO_EXTENSIONS


def list_landing(landing: Location, *, min_age_s: float, now_s: float | None = None) -> list[LandingFile]:
    """Every landing file (rule 1), sorted by path. A missing landing folder is an error: a typo in
    REELFORGE_LANDING must not look like a quiet night. On object storage a prefix exists once an
    object is under it, so there only a missing bucket is an error, and an empty prefix lists nothing."""
    if not landing.is_dir() and (landing.is_local or not landing.bucket.is_dir()):
        raise ValueError(f"REELFORGE_LANDING={landing}: no such {'folder' if landing.is_local else 'bucket'}")
    newest_ns = int(((time.time() if now_s is None else now_s) - min_age_s) * 1e9)
    return [
        LandingFile(file.location.uri, file.size_bytes, file.mtime_ns)
        for file in landing.walk()
        if is_video_name(file.location.name) and file.mtime_ns <= newest_ns
    ]


def take_batch(new_files: list[LandingFile]) -> Batch:
    """The oldest new files whose quoted paths fit in MAX_PATHS_CHARS (rule 3), at least one."""
    taken, chars = [], 0
    for file in sorted(new_files, key=lambda f: (f.mtime_ns, f.path)):
        chars += len(shlex.quote(file.path)) + 1
        if taken and chars > MAX_PATHS_CHARS:
            break
        taken.append(file)
    return Batch.of(taken)


# --- records beside the shards ---------------------------------------------------------------------


def batches_dir(shards: Location) -> Location:
    return shards / BATCHES_DIR


def record_path(shards: Location, batch_id: str) -> Location:
    return batches_dir(shards) / f"{batch_id}.json"


def read_record(shards: Location, batch_id: str) -> dict[str, Any]:
    return json.loads(record_path(shards, batch_id).read_text())


def read_records(shards: Location) -> list[dict[str, Any]]:
    """Every batch record, oldest first."""
    paths = [p for p in batches_dir(shards).files() if p.name.endswith(".json") and not p.name.endswith(PENDING_SUFFIX)]
    records = [json.loads(p.read_text()) for p in paths]
    return sorted(records, key=lambda r: (r["recorded_at"], r["batch_id"]))


def recorded_files(shards: Location) -> set[LandingFile]:
    return {LandingFile(**f) for record in read_records(shards) for f in record["files"]}


def new_files(landing_files: list[LandingFile], shards: Location) -> list[LandingFile]:
    recorded = recorded_files(shards)
    return [f for f in landing_files if f not in recorded]


def pending_path(shards: Location, batch_id: str) -> Location:
    return batches_dir(shards) / f"{batch_id}{PENDING_SUFFIX}"


def pending_batches(shards: Location) -> list[Batch]:
    paths = [p for p in batches_dir(shards).files() if p.name.endswith(PENDING_SUFFIX)]
    return [Batch.from_json(json.loads(p.read_text())) for p in paths]


def write_pending(shards: Location, batch: Batch) -> None:
    _write_json(pending_path(shards, batch.batch_id), batch.as_json() | {"planned_at": _now()})


def drop_pending(shards: Location, batch: Batch) -> None:
    pending_path(shards, batch.batch_id).unlink(missing_ok=True)


def write_record(shards: Location, batch: Batch, job: dict[str, Any]) -> dict[str, Any]:
    """Record `batch` as ingested by `job` (its final JobDetails) and drop its pending file."""
    record = batch.as_json() | {
        "submission_id": job["submission_id"],
        "entrypoint": job["entrypoint"],
        "job_status": job["status"],
        "job_start_time": job.get("start_time"),
        "job_end_time": job.get("end_time"),
        "recorded_at": _now(),
    }
    _write_json(record_path(shards, batch.batch_id), record)
    drop_pending(shards, batch)
    return record


def _write_json(path: Location, data: dict[str, Any]) -> None:
    """A reader sees the whole file or none (Location.write_text)."""
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
