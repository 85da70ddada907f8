"""`run_batch_generation`: a table of requests (one row per video, the serving columns) → one MP4 per
row and a results table. docs/batch-generation.md is the user's page.

    read + check (driver)                 columns; an id, a seed and a check of every row (a bad row is
                                          failed with its reason); rows already done in --out left out
    → from_arrow (one block per part)
    → map_batches(GenerateVideos, actors) one model per actor, a GPU each when the cluster has GPUs:
                                          generate → videos/<id>.mp4 (temp + rename, behind the fence)
                                          → the batch's records as one _work/part-*.parquet
    → finish (driver)                     results.parquet (one row per table row), batch.json, _SUCCESS

--out holds `videos/<id>.mp4`, `results.parquet`, `batch.json`, `_SUCCESS` (last) and `_work/` (the
lease, as for ingest, and the part files). A row's id is its `id` cell, else a hash of its request
cells; a row without a seed gets one derived from its id, so a rerun makes the same video. A row is
done when a part holds its record for the same request (`request_hash`) and, if ok, its MP4 exists:
a rerun generates only rows not done, and writes nothing when all are.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import gc
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from model.errors import one_line
from model.storage import resolve_uri
from pipelines.ingest import worker_cause
from pipelines.output import (
    SUCCESS, WORK_DIR, IngestStopped, LeaseKeeper, OutputDir, StorageError, Superseded, clear_success, mark_success,
    retry_storage, storage_errors, sweep_temp_files, take_lease,
)  # fmt: skip

logger = logging.getLogger(__name__)

BATCH_MANIFEST = "batch.json"
BATCH_FORMAT = "reelforge-batch/1"
RESULTS = "results.parquet"
VIDEOS_DIR = "videos"
PART_RE = re.compile(rf"^{WORK_DIR}/part-[0-9a-f]{{16}}\.parquet$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a file name on every filesystem and store
MEDIA_COLUMNS = ("image", "video", "video2")
PROGRESS_LOG_S = 30.0  # a progress line this often, besides the tqdm bar (which a job's log may not show)

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()), ("status", pa.string()), ("reason", pa.string()),  # "ok" | "failed", and why (one line)
        ("mp4", pa.string()),  # ok: "videos/<id>.mp4", relative to --out
        ("num_frames", pa.int32()), ("fps", pa.float32()), ("width", pa.int32()), ("height", pa.int32()),
        ("seed", pa.int64()), ("mode", pa.string()), ("prompt", pa.string()), ("steps", pa.int32()), ("guidance", pa.float32()),
        ("generate_s", pa.float32()), ("write_s", pa.float32()),  # the model's time (inputs read included); MP4 encode + commit
        ("request_hash", pa.string()),  # the row's request cells with its seed: what "done" is checked against
        ("warnings", pa.list_(pa.string())),  # ok: what the request asked that the model's card says it never trained
        ("bundle_sha256", pa.string()), ("finished_at", pa.float64()),  # unix time; the newest record of an id wins
    ]
)  # fmt: skip
RESULT_SCHEMA = pa.schema([pa.field("row", pa.int64()), *RECORD_SCHEMA])  # results.parquet: one row per table row


class BatchGenerationConfig(BaseModel):
    """What `run_batch_generation` runs: checked before anything is read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: str  # a .parquet or .jsonl table, a local path or a URI (s3://, gs://, ...)
    bundle: str  # a local inference bundle folder; on a multi-node cluster, one every node sees
    out: str  # a local folder or a URI
    device: Literal["cpu", "cuda"] | None = None  # None: a GPU per actor when the cluster has GPUs
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: as the weights were saved
    concurrency: int | None = Field(default=None, ge=1)  # actors, each one model; None: one per GPU, else one
    # A part's records are committed together: a killed run regenerates at most this many videos per actor.
    rows_per_part: int = Field(default=4, ge=1, le=1024)
    retry_failed: bool = False  # generate rows whose record says failed again


class BatchStopped(IngestStopped):
    """The job stopped before it finished (storage, another run, dying actors); a rerun resumes."""


# --- the request table (driver) --------------------------------------------------------------


def read_requests(uri: str) -> pa.Table:
    """The request table at `uri` (.parquet, or .jsonl: one JSON object per line); ValueError in one
    line when it is missing, unreadable, empty, lacks `prompt` or has columns serving does not know."""
    from model.pyfunc import INPUT_COLUMNS

    try:
        fs, path = resolve_uri(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ValueError(f"--batch {uri!r}: no such file")
        if not uri.endswith((".parquet", ".jsonl")):
            raise ValueError(f"--batch {uri!r}: expected a .parquet or .jsonl table")
        with fs.open_input_file(path) as stream:
            table = pq.read_table(stream) if uri.endswith(".parquet") else pajson.read_json(stream)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"--batch {uri!r}: not a readable table ({one_line(exc)})") from None
    known = [name for name, _, _ in INPUT_COLUMNS] + ["id"]
    unknown = [name for name in table.column_names if name not in known]
    if unknown:
        hints = [f"{name!r} (did you mean {near[0]!r}?)" if (near := difflib.get_close_matches(name, known, n=1)) else repr(name) for name in unknown]
        raise ValueError(f"--batch {uri!r}: unknown column(s) {', '.join(hints)}; request columns are {', '.join(known)}")
    if "prompt" not in table.column_names:
        raise ValueError(f"--batch {uri!r}: no 'prompt' column (columns: {', '.join(table.column_names) or 'none'})")
    if len(table) == 0:
        raise ValueError(f"--batch {uri!r}: the table has no rows")
    return table


@dataclasses.dataclass
class RequestRow:
    """One row of the table, ready to generate or already failed (`reason`)."""

    row: int
    id: str
    request_hash: str
    cells: dict[str, Any]  # its request cells, seed filled in, media paths made file:// or other URIs
    fields: dict[str, Any] | None = None  # GenerationRequest fields but media (those stay in `cells`)
    reason: str | None = None


def prepare_rows(table: pa.Table, table_uri: str) -> list[RequestRow]:
    """Every row with its id, seed and request hash, and each checked as far as can be without the
    model (cell types, base64, local files); a bad row gets `reason`. ValueError for a bad `id` column."""
    from model.pyfunc import INPUT_COLUMNS

    names = [name for name, _, _ in INPUT_COLUMNS if name in table.column_names]
    ids = _given_ids(table) if "id" in table.column_names else None
    base = table_uri.rsplit("/", 1)[0] if "://" in table_uri else os.path.dirname(os.path.abspath(table_uri))
    rows = []
    with tempfile.TemporaryDirectory(prefix="reelforge-batch-check-") as tmp:
        for index, cells in enumerate(table.select(names).to_pylist()):
            given = {name: value for name, value in cells.items() if value is not None and not (isinstance(value, float) and math.isnan(value))}
            row_id = ids[index] if ids is not None else _hash(_canonical(given))
            # From the id, not the cells: a row with an `id` keeps its seed when its other cells are edited.
            given.setdefault("seed", int.from_bytes(hashlib.sha256(f"seed:{row_id}".encode()).digest()[:8], "big") % 2**31)
            prepared = RequestRow(index, row_id, _hash(_canonical(given)), given)
            for name in MEDIA_COLUMNS:
                if _is_location(given.get(name)):
                    given[name] = _absolute(given[name], base)
            try:
                prepared.fields = request_fields(given, index, Path(tmp))
            except ValueError as exc:
                prepared.reason = one_line(exc)
            rows.append(prepared)
    return rows


def _given_ids(table: pa.Table) -> list[str]:
    ids, seen = [], {}
    for index, value in enumerate(table.column("id").to_pylist()):
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text is None or not ID_RE.match(text):
            raise ValueError(f"row {index} column id: {value!r} is not an id (1-128 letters, digits, '.', '_' or '-')")
        if text in seen:
            raise ValueError(f"column id: {text!r} is in rows {seen[text]} and {index}; ids must be unique")
        seen[text] = index
        ids.append(text)
    return ids


def _canonical(record: dict[str, Any]) -> dict[str, Any]:
    """Cells as they hash: 7.0 and 7 alike (a pandas integer column with a gap is float), long cells
    (base64 media, raw bytes) by their own sha256."""
    out: dict[str, Any] = {}
    for name, value in record.items():
        if isinstance(value, bytes) or (isinstance(value, str) and len(value) > 256):
            value = "sha256:" + hashlib.sha256(value if isinstance(value, bytes) else value.encode()).hexdigest()
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        elif not isinstance(value, (str, int, float, bool)):
            value = repr(value)
        out[name] = value
    return out


def _hash(canonical: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _is_location(value: Any) -> bool:
    """A media cell that names a file: a path or URI. Base64 never holds '.' or ':', so a cell with
    either is a location ("inputs/cat.png", "/data/a.mp4", "s3://bucket/a.mp4"); anything else is base64."""
    return isinstance(value, str) and ("." in value or ":" in value)


def _absolute(location: str, base: str) -> str:
    """A URI as it is; a local path as a file:// URI, relative ones taken from the table's folder."""
    if "://" in location:
        return location
    path = os.path.expanduser(location)
    if os.path.isabs(path):
        return f"file://{os.path.normpath(path)}"
    return f"{base}/{location}" if "://" in base else f"file://{os.path.normpath(os.path.join(base, path))}"


# --- one row -> a request (driver: parsed and checked; actor: inputs put in place) ------------


def request_fields(cells: dict[str, Any], row: int, tmp: Path) -> dict[str, Any]:
    """The GenerationRequest fields of a row's cells but its media, parsed and checked by serving's own
    `build_request` (base64 media decoded into `tmp` on the way); media given as raw bytes must not be
    empty, a local file must exist (a remote one is first read by the actor). ValueError naming the
    row and cell otherwise."""
    from model.pyfunc import build_request

    media = {name: cells[name] for name in MEDIA_COLUMNS if isinstance(cells.get(name), bytes) or _is_location(cells.get(name))}
    request, _, _ = build_request({k: v for k, v in cells.items() if k not in media}, tmp, row=row)
    for name, value in media.items():
        path = value.removeprefix("file://") if isinstance(value, str) and value.startswith("file://") else None
        if value == b"" or (path is not None and not os.path.isfile(path)):
            raise ValueError(f"row {row} column {name}: " + ("empty" if value == b"" else f"no such file {path!r}"))
    return {name: value for name, value in dataclasses.asdict(request).items() if name not in MEDIA_COLUMNS}


def media_file(value: bytes | str, dest: Path, where: str) -> str:
    """A local file holding a media cell (raw bytes, base64 the driver checked, a file:// path or a URI)."""
    if isinstance(value, bytes) or not _is_location(value):
        dest.write_bytes(value if isinstance(value, bytes) else base64.b64decode(value))
        return str(dest)
    if value.startswith("file://"):
        return value.removeprefix("file://")  # gone since the driver looked: the pipeline's check says so
    # A store that does not answer is ours (retried, then the job stops); a bad scheme or a missing file is the row's.
    fs, path = retry_storage(f"opening {value}", lambda: resolve_uri(value))
    if retry_storage(f"checking {value}", lambda: fs.get_file_info(path)).type != pafs.FileType.File:
        raise ValueError(f"{where}: no such file {value!r}")

    def download() -> None:
        with storage_errors(f"cannot read {value}"), fs.open_input_stream(path) as stream:
            dest.write_bytes(stream.read())

    retry_storage(f"reading {value}", download)
    return str(dest)


# --- the actor -------------------------------------------------------------------------------


class GenerateVideos:
    """Actor: one model. Generates a batch of request rows, commits each video, then the batch's
    records as one part file; returns one small row per request (id, status, reason). A bad request
    and the model failing on one request are that row's failure; our storage failing past its
    retries (StorageError) and a newer run holding --out (Superseded) stop the job."""

    def __init__(self, cfg: BatchGenerationConfig, out: OutputDir, bundle_sha256: str, device: str) -> None:
        # Only torch and the pipeline here, not model.pyfunc: mlflow's import would add seconds to every actor start.
        import torch

        from model.pipeline import load_pipeline

        self.pipeline = load_pipeline(cfg.bundle, device=device, dtype=getattr(torch, cfg.dtype) if cfg.dtype else None)
        self.out, self.bundle_sha256 = out, bundle_sha256
        self.run_id = out.lease.run_id if out.lease else ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = [self.generate(row) for row in batch.to_pylist()]
        table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
        name = f"{WORK_DIR}/part-{_hash({'run': self.run_id, 'ids': sorted(record['id'] for record in records)})}.parquet"
        retry_storage(f"writing {self.out.path(name)}", lambda: _commit(self.out, name, table))
        return table.select(["id", "status", "reason"])

    def generate(self, row: dict[str, Any]) -> dict[str, Any]:
        from model.mp4 import write_mp4
        from model.pipeline import GenerationRequest

        fields = {key: value for key, value in row.items() if not key.startswith("__")}
        result = {"id": row["__id"], "request_hash": row["__request_hash"], "bundle_sha256": self.bundle_sha256, "mode": fields["mode"],
                  "prompt": fields["prompt"], "seed": fields["seed"], "finished_at": None}  # fmt: skip
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="reelforge-batch-") as tmp:
                media = {name: media_file(row[f"__{name}"], Path(tmp) / name, f"row {row['__row']} column {name}")
                         for name in MEDIA_COLUMNS if row[f"__{name}"] is not None}  # fmt: skip
                video = self.pipeline.generate(GenerationRequest(**fields, **media))
            generated = time.perf_counter()
            mp4 = write_mp4(video.frames, video.fps, None)
            name = f"{VIDEOS_DIR}/{row['__id']}.mp4"
            retry_storage(f"writing {self.out.path(name)}", lambda: _commit(self.out, name, mp4))
        except (StorageError, Superseded):
            raise
        except ValueError as exc:  # the request: a cell the model refuses, an input it cannot read
            return result | {"status": "failed", "reason": one_line(exc), "finished_at": time.time()}
        except Exception as exc:  # the model on this request (out of memory, say): still this row's failure
            logger.exception("generating row %s (%s) failed", row["__row"], row["__id"])
            return result | {"status": "failed", "reason": one_line(exc, with_type=True), "finished_at": time.time()}
        num_frames, height, width, _ = video.frames.shape  # (T, H, W, 3)
        return result | {
            "status": "ok", "mp4": name, "num_frames": num_frames, "fps": video.fps, "width": width, "height": height,
            "steps": video.metadata["steps"], "guidance": video.metadata["guidance"], "generate_s": generated - started,
            "write_s": time.perf_counter() - generated, "warnings": list(video.metadata.get("warnings", ())), "finished_at": time.time(),
        }  # fmt: skip


def _commit(out: OutputDir, name: str, data: bytes | pa.Table) -> None:
    """Write `data` under a temp name, check the fence, rename to `name`: whole files of this run only."""
    temp = out.temp_name(name)
    try:
        with storage_errors(f"cannot write {out.path(temp)}"):
            if isinstance(data, pa.Table):
                pq.write_table(data, out.path(temp), filesystem=out.fs)
            else:
                with out.fs.open_output_stream(out.path(temp)) as stream:
                    stream.write(data)
        out.check_fence()
        out.commit(temp, name)
    except BaseException:
        out.discard(temp)
        raise


# --- the job ---------------------------------------------------------------------------------


def run_batch_generation(cfg: BatchGenerationConfig, *, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Generate every row of `cfg.requests` not yet done in `cfg.out`, then write results.parquet,
    batch.json and _SUCCESS; returns the summary (batch.json's `summary`, plus `this_run`). Raises
    ValueError for bad input before anything is written (no table, unknown columns, a bad `id`
    column, no bundle, an --out made by another bundle), BatchStopped when the job cannot finish."""
    from model.bundle import bundle_sha256, read_bundle_config

    read_bundle_config(cfg.bundle)  # not a bundle: one line, before anything else
    rows = prepare_rows(read_requests(cfg.requests), cfg.requests)
    sha256 = bundle_sha256(cfg.bundle)
    fingerprint = _hash({"rows": [[r.id, r.request_hash, r.reason] for r in rows]})
    out = OutputDir(cfg.out)
    try:
        manifest = _check_out(out, sha256)
        if manifest and manifest.get("table") == fingerprint and out.exists(SUCCESS) and not _todo(rows, out, cfg.retry_failed):
            logger.info("every request of %s is done in %s; nothing to do", cfg.requests, out.uri)
            return manifest["summary"] | {"this_run": {"generated": 0, "ok": 0, "failed": 0, "wall_s": 0.0}, "nothing_new": True}
        retry_storage(f"taking the lease on {out.uri}", lambda: take_lease(out, "generate --batch"))
    except (StorageError, IngestStopped) as exc:
        raise BatchStopped(f"{one_line(exc)}; nothing was changed in {out.uri}") from None
    keeper = LeaseKeeper(out)
    try:
        return _run(cfg, rows, out, sha256, fingerprint, start_ray)
    except (StorageError, Superseded, IngestStopped) as exc:
        failure = BatchStopped(f"{one_line(exc)}; videos finished so far are kept in {out.uri}, rerun the same command to resume")
    finally:
        keeper.release()
    gc.collect()  # see run_ingest: let go of the failed execution's actors before raising
    raise failure


def _check_out(out: OutputDir, sha256: str) -> dict[str, Any] | None:
    """batch.json of `out` (None for a new --out); ValueError when `out` holds another bundle's videos."""
    manifest = out.read_json(BATCH_MANIFEST)
    if (manifest or {}).get("bundle_sha256") != sha256 and any(map(PART_RE.match, out.list(WORK_DIR))):
        held = f"videos of another model (bundle sha256 {manifest['bundle_sha256'][:12]}, this one {sha256[:12]})" if manifest else f"result parts but no {BATCH_MANIFEST}"
        raise ValueError(f"--out {out.uri} holds {held}; use another --out")
    return manifest


def _latest_records(out: OutputDir, columns: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """id -> its newest committed record (by `finished_at`)."""
    latest: dict[str, dict[str, Any]] = {}
    for name in filter(PART_RE.match, out.list(WORK_DIR)):
        with storage_errors(f"cannot read {out.path(name)}"):
            part = pq.read_table(out.path(name), filesystem=out.fs, columns=columns and list(dict.fromkeys(["id", "finished_at", *columns])))
        for record in part.to_pylist():
            if record["id"] not in latest or record["finished_at"] > latest[record["id"]]["finished_at"]:
                latest[record["id"]] = record
    return latest


def _todo(rows: list[RequestRow], out: OutputDir, retry_failed: bool) -> list[RequestRow]:
    """The valid rows not done in `out`, one per id (identical requests are one video)."""
    records = _latest_records(out, ["status", "request_hash"])
    videos = set(out.list(VIDEOS_DIR))
    todo: dict[str, RequestRow] = {}
    for row in rows:
        record = records.get(row.id)
        done = record is not None and record["request_hash"] == row.request_hash and (
            (record["status"] == "failed" and not retry_failed) or (record["status"] == "ok" and f"{VIDEOS_DIR}/{row.id}.mp4" in videos)
        )
        if row.reason is None and not done:
            todo.setdefault(row.id, row)
    return list(todo.values())


def _run(cfg: BatchGenerationConfig, rows: list[RequestRow], out: OutputDir, sha256: str, fingerprint: str, start_ray: Callable[[], None] | None) -> dict[str, Any]:
    """The job, once this run holds the lease of `out`."""
    started = time.monotonic()
    sweep_temp_files(out)  # what killed runs were writing
    sweep_temp_files(OutputDir(f"{out.uri.rstrip('/')}/{VIDEOS_DIR}"))
    todo = retry_storage("reading the committed records", lambda: _todo(rows, out, cfg.retry_failed))  # under the lease now
    invalid = sum(row.reason is not None for row in rows)
    logger.info("%d requests in %s: %d invalid, %d to generate, the rest already done in %s", len(rows), cfg.requests, invalid, len(todo), out.uri)
    record = {"format": BATCH_FORMAT, "requests": cfg.requests, "bundle": cfg.bundle, "bundle_sha256": sha256}
    counts = {"generated": 0, "ok": 0, "failed": 0}
    clear_success(out)
    if todo:
        with storage_errors(f"cannot create {out.path(VIDEOS_DIR)}"):
            out.fs.create_dir(out.path(VIDEOS_DIR), recursive=True)
        out.write_bytes(BATCH_MANIFEST, json.dumps(record | {"status": "running"}, indent=2, sort_keys=True).encode())
        counts = _generate(cfg, todo, out, sha256, start_ray)
    out.check_fence()

    def finish() -> dict[str, Any]:
        results = _results(rows, out)
        statuses = results.column("status").to_pylist()  # the counts the command's last line says
        summary = {"rows": len(statuses), "ok": statuses.count("ok"), "failed": statuses.count("failed"), "invalid": invalid}
        out.write_table(RESULTS, results)
        out.check_fence()
        out.write_bytes(BATCH_MANIFEST, json.dumps(record | {"status": "finished", "table": fingerprint, "summary": summary}, indent=2, sort_keys=True).encode())
        mark_success(out)
        return summary | {"this_run": counts | {"wall_s": round(time.monotonic() - started, 3)}}

    return retry_storage("writing results.parquet, batch.json and _SUCCESS", finish)


def _generate(cfg: BatchGenerationConfig, todo: list[RequestRow], out: OutputDir, sha256: str, start_ray: Callable[[], None] | None) -> dict[str, int]:
    """Generate `todo` on an actor pool; returns this run's counts."""
    import ray
    from tqdm import tqdm

    if not ray.is_initialized():
        (start_ray or ray.init)()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if cfg.device == "cuda" and not gpus:
        raise ValueError("--device cuda, but the Ray cluster has no GPUs")
    use_gpu = cfg.device == "cuda" or (cfg.device is None and gpus > 0)
    job = [row.fields | {f"__{name}": row.cells.get(name) for name in MEDIA_COLUMNS} | {"__id": row.id, "__row": row.row,
           "__request_hash": row.request_hash} for row in todo]  # fmt: skip
    table = pa.Table.from_pylist(job)  # every row has every key: from_pylist takes its columns from the first
    workers = cfg.concurrency or (max(1, int(gpus)) if use_gpu else 1)
    # One block per part (an actor pool hands out whole blocks), and parts no larger than an even share
    # of the rows, so that a short batch still keeps every actor busy.
    part_rows = max(1, min(cfg.rows_per_part, math.ceil(len(table) / workers)))
    blocks = [table.slice(start, part_rows) for start in range(0, len(table), part_rows)]
    workers = min(workers, len(blocks))
    if use_gpu and workers > gpus:
        logger.warning("%d actors of 1 GPU each, but the cluster has %g GPUs now: some wait for GPUs to join", workers, gpus)
    logger.info("generating %d videos with %d actor(s) x %s (bundle %s)", len(todo), workers, "1 GPU" if use_gpu else "1 CPU", cfg.bundle)
    # Our actors' StorageError and Superseded reach this driver as themselves (see pipelines/ingest.py).
    context = ray.data.DataContext.get_current()
    previous, context.raise_original_map_exception = context.raise_original_map_exception, True
    counts, failure, last_log, started = {"generated": 0, "ok": 0, "failed": 0}, None, time.monotonic(), time.monotonic()
    try:
        results = ray.data.from_arrow(blocks).map_batches(
            GenerateVideos, fn_constructor_args=(cfg, out, sha256, "cuda" if use_gpu else "cpu"), batch_size=part_rows,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=1 if use_gpu else None,
        )  # fmt: skip
        with tqdm(total=len(todo), desc="generating videos", unit="video") as progress:
            for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
                for row_id, status, reason in zip(*(batch.column(c).to_pylist() for c in ("id", "status", "reason"))):
                    counts["generated"] += 1
                    counts[status] += 1
                    if status == "failed":
                        logger.warning("request %s failed: %s", row_id, reason)
                progress.update(batch.num_rows)
                progress.set_postfix(failed=counts["failed"])
                if time.monotonic() - last_log >= PROGRESS_LOG_S or counts["generated"] == len(todo):
                    last_log, rate = time.monotonic(), counts["generated"] / max(time.monotonic() - started, 1e-9)
                    logger.info("generated %d of %d videos (%d failed), %.2f videos/s", counts["generated"], len(todo), counts["failed"], rate)
    except Exception as exc:
        failure = worker_cause(exc)
        if failure is None:
            logger.exception("generation stopped")
            failure = BatchStopped(f"generation stopped ({one_line(exc, with_type=True)[:300]})")
    finally:
        context.raise_original_map_exception = previous
    if failure is not None:
        raise failure  # outside the except block: no __context__ back to the failed execution
    return counts


def _results(rows: list[RequestRow], out: OutputDir) -> pa.Table:
    """results.parquet: one row per table row, in table order; identical requests share a record."""
    records = _latest_records(out)
    table_rows = []
    for row in rows:
        record = records.get(row.id)
        if row.reason is not None or record is None or record["request_hash"] != row.request_hash:
            seed = row.cells.get("seed")
            record = {
                "id": row.id, "status": "failed", "reason": row.reason or "no result recorded (the job did not finish)",
                "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None, "request_hash": row.request_hash,
                "prompt": str(row.cells.get("prompt", "")), "mode": str(row.cells.get("mode", "text")),
            }  # fmt: skip
        table_rows.append({"row": row.row} | record)
    return pa.Table.from_pylist(table_rows, schema=RESULT_SCHEMA)
