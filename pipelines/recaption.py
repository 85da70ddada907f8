"""`run_recaption`: shards → a caption set, written by a vision-language model, shards untouched.

The job wires three stages into a Ray Data plan:

    read_webdataset (the shards holding clips not yet in the set)
    → flat_map(prepare_clip, CPU tasks)        decode N frames of each clip's MP4, scale, JPEG
    → map_batches(CaptionParts, actors)        model → clean → one part-*.parquet per batch,
                                               committed behind the set's fence; small rows back
    → finish (driver)                          counts, manifest.json, report.html, _SUCCESS

Frames are made on CPU workers, so a GPU captioner only sees ready JPEGs, and decoding overlaps the
model's work. A batch is the unit of commit: a killed job loses at most the batches its captioning
actors were working on (two each for an endpoint, see `_caption`), and a rerun captions only the
clips no part holds (`pipelines/caption_sets.py`).

What stops the job, and what does not (as for ingest, docs/reliability.md): a clip that cannot be
decoded, a refused or looping output, a 400 for one request: that clip's row says `status=failed`
and why, and the job goes on. The captioner itself failing (endpoint down or 5xx past retries, a
model that will not load: `BackendUnavailable`), or our storage failing past its retries
(`StorageError`), stops the job in one line with everything committed so far kept.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from model import __version__
from model.chat import BackendUnavailable, ChatRequest
from model.chat_backends import make_backend
from model.errors import one_line
from pipelines.caption_clean import CleanCaption, clean_caption, failed
from pipelines.caption_frames import frames_from_mp4
from pipelines.captions import backend_spec, check_captioner, render_prompt
from pipelines.caption_sets import (
    PART_SCHEMA,
    SET_MANIFEST,
    check_set,
    part_name,
    prompt_hash,
    read_set,
    set_id,
    set_record,
    set_uri,
    write_set_manifest,
)
from pipelines.config import MODEL_CAPTION_BACKENDS, CaptionConfig
from pipelines.ingest import worker_cause
from pipelines.output import (
    MANIFEST,
    SUCCESS,
    IngestStopped,
    LeaseKeeper,
    OutputDir,
    StorageError,
    Superseded,
    clear_success,
    mark_success,
    retry_storage,
    sweep_temp_files,
    take_lease,
)

logger = logging.getLogger(__name__)

# Frames leave a CPU task in blocks of about this size (~25 clips of 4 JPEG frames at 256x256), not
# Ray Data's default 128 MiB: one task makes the frames of a whole shard (a 256 MB shard holds ~1700
# such clips), and an actor gets a block only once it is complete, so with big blocks the actors
# wait for a shard's last frame before they send its first request.
FRAME_BLOCK_BYTES = 1024**2


class RecaptionStopped(IngestStopped):
    """The recaption job stopped before it finished (captioner unavailable, storage failing past
    its retries, another run took the set); committed parts are kept and a rerun resumes."""


# --- stage 1: frames (CPU tasks) -------------------------------------------------------------


def prepare_clip(row: dict[str, Any], cfg: CaptionConfig, todo: frozenset[str] | None) -> list[dict[str, Any]]:
    """A shard sample → [its frames row] (or [] when the clip is not to be captioned). A clip that
    cannot be decoded gives a row with `error` set, so it is recorded as failed, never dropped."""
    clip_id = row["__key__"]
    if todo is not None and clip_id not in todo:
        return []
    started = time.perf_counter()
    out: dict[str, Any] = {
        "clip_id": clip_id,
        "shard": str(row.get("__url__") or "").rsplit("/", 1)[-1],
        "old_caption": _text(row.get("txt")),
        "frames": [],
        "video": None,
        "seconds": 0.0,
        "error": None,
    }
    try:
        meta = json.loads(row["json"]) if row.get("json") is not None else {}
        num_frames, fps = meta.get("num_frames"), meta.get("fps")
        if meta.get("start_s") is not None and meta.get("end_s") is not None:
            out["seconds"] = float(meta["end_s"]) - float(meta["start_s"])
        if row.get("mp4") is None:
            raise ValueError("the sample has no mp4 member")
        out["frames"] = list(frames_from_mp4(row["mp4"], num_frames, fps, cfg))
        if cfg.video_input:
            out["video"] = row["mp4"]
    except (ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
        out["error"] = f"frames: {one_line(exc)}"
    except Exception as exc:  # anything else a damaged member provokes in a decoder: still that clip's failure
        logger.exception("frames of %s failed", clip_id)
        out["error"] = f"frames: {one_line(exc, with_type=True)}"
    out["frame_s"] = time.perf_counter() - started
    return [out]


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# --- stage 2: caption and commit (actors) ----------------------------------------------------


class CaptionParts:
    """Actor: caption a batch of frame rows with the configured backend, clean the captions and
    commit them as one part file of the set. Returns one small row per clip (id, status, reason).

    An endpoint actor runs two batches at once on two threads (`_caption`): the backend is shared
    and thread-safe, each batch commits its own part, and the tokenizer is used under a lock."""

    def __init__(self, cfg: CaptionConfig, out: OutputDir, text_encoder: str, revision: str, num_gpus: float = 0) -> None:
        from model.text_encoders import load_text_tokenizer

        self.cfg, self.out = cfg, out
        self.backend = make_backend(backend_spec(cfg, num_gpus))
        if cfg.backend == "hf":
            from model.chat_hf import is_resolved

            if is_resolved(revision) and self.backend.revision != revision:
                raise BackendUnavailable(f"{cfg.model} is not what the set was started with (revision {self.backend.revision}, the set has {revision})")
        self.revision = self.backend.revision or revision  # what actually ran
        self.prompt_hash = prompt_hash(cfg)
        self.tokenizer, _ = load_text_tokenizer(text_encoder, max_length=cfg.max_tokens)
        # A fast tokenizer used from two threads at once can raise "Already borrowed"
        # (https://github.com/huggingface/tokenizers/issues/537); cleaning is ~1 ms, so a lock costs nothing.
        self.tokenizer_lock = threading.Lock()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = self.caption(rows)
        table = pa.Table.from_pylist(results, schema=PART_SCHEMA)
        name = part_name([r["clip_id"] for r in results])

        def commit() -> None:
            temp = self.out.write_table(name, table, commit=False)
            try:
                self.out.check_fence()
                self.out.commit(temp, name)
            except BaseException:
                self.out.discard(temp)
                raise

        retry_storage(f"writing {self.out.path(name)}", commit)
        return pa.table(
            {
                "clip_id": [r["clip_id"] for r in results],
                "status": [r["status"] for r in results],
                "reason": [r["reason"] for r in results],
            }
        )

    def caption(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Part rows for `rows`; raises BackendUnavailable when the backend fails as a whole."""
        ask = [row for row in rows if not row["error"]]
        requests = [
            ChatRequest(
                render_prompt(self.cfg, len(row["frames"]), row["seconds"]),
                images=tuple(row["frames"]) if not (self.cfg.video_input and row["video"]) else (),
                video=row["video"] if self.cfg.video_input else None,
                system=self.cfg.system_prompt,
            )
            for row in ask
        ]
        replies = iter(self.backend.chat(requests) if requests else [])
        results = []
        for row in rows:
            reply = None if row["error"] else next(replies)
            if reply is None:
                clean = failed(row["error"])
            elif reply.text is None:
                clean = failed(reply.error or "no output")
            else:
                clean = self.clean(reply.text, reply.finish_reason)
            results.append(self.part_row(row, clean, reply))
        return results

    def clean(self, text: str, finish_reason: str | None) -> CleanCaption:
        with self.tokenizer_lock:
            return clean_caption(
                text,
                strip_prefixes=self.cfg.strip_prefixes,
                min_words=self.cfg.min_words,
                tokenizer=self.tokenizer,
                max_tokens=self.cfg.max_tokens,
                finish_reason=finish_reason,
            )

    def part_row(self, row: dict[str, Any], clean: CleanCaption, reply: Any) -> dict[str, Any]:
        return {
            "clip_id": row["clip_id"],
            "shard": row["shard"],
            "caption": clean.caption,
            "raw_caption": reply.text if reply is not None else None,
            "status": clean.status,
            "reason": clean.reason,
            "stripped": clean.stripped,
            "truncated": clean.truncated,
            "tokens": clean.tokens,
            "old_caption": row["old_caption"],
            "model": self.cfg.model,
            "revision": self.revision,
            "prompt_hash": self.prompt_hash,
            "frames_used": len(row["frames"]),
            "frame_s": row["frame_s"],
            "caption_s": reply.seconds if reply is not None else 0.0,
            "output_tokens": reply.output_tokens if reply is not None else None,
        }

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


# --- the job ---------------------------------------------------------------------------------


def run_recaption(
    cfg: CaptionConfig,
    shards: str,
    name: str,
    *,
    text_encoder: str = "minilm",
    num_workers: int | None = None,
    start_ray: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Caption every clip of the ingest output `shards` that caption set `name` does not hold yet,
    then write the set's manifest, report and _SUCCESS; returns the set's summary (manifest.json's
    `summary`). `text_encoder` is the training text encoder whose tokens cap the captions.

    Raises ValueError for bad arguments before anything is written (not an ingest output, a
    backend that is not a model, a set made with other settings), RecaptionStopped when the job
    cannot finish."""
    if cfg.backend not in MODEL_CAPTION_BACKENDS:
        raise ValueError(f"recaption needs a model captioner: caption.backend=hf or openai (got {cfg.backend!r})")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    source = OutputDir(shards)
    if not source.exists(SUCCESS):
        raise ValueError(f"{shards} is not a finished ingest output (no {SUCCESS}); run reelforge ingest first")
    out = OutputDir(set_uri(shards, name))
    from model.text_encoders import load_text_tokenizer

    load_text_tokenizer(text_encoder, max_length=cfg.max_tokens)  # a bad spec fails here, not in every actor
    record = set_record(cfg, text_encoder, check_captioner(cfg))
    try:
        check_set(out, record)
        clips = source.read_table(MANIFEST, columns=["id", "shard"])
        if not _todo(clips, out) and out.exists(SUCCESS):
            logger.info("nothing new to caption; %s is unchanged", out.uri)
            return (out.read_json(SET_MANIFEST) or {}).get("summary", {}) | {"nothing_new": True}
        retry_storage(f"taking the lease on {out.uri}", lambda: take_lease(out, "recaption", what="caption set"))
    except StorageError as exc:
        raise RecaptionStopped(f"{exc}; nothing was changed in {out.uri}") from None
    keeper = LeaseKeeper(out)
    try:
        # What is left is read under the lease: a killed run's writers are fenced off from here on.
        todo = retry_storage("reading the set's parts", lambda: _todo(clips, out))
        return _run(cfg, source, out, record, todo, len(clips), text_encoder, num_workers, start_ray)
    except (StorageError, Superseded, BackendUnavailable, IngestStopped) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        failure = RecaptionStopped(f"{first}; captions finished so far are kept in {out.uri}, rerun the same command to resume")
    finally:
        keeper.release()
    gc.collect()  # see run_ingest: let go of the failed execution's actors before raising
    raise failure


def _todo(clips: pa.Table, out: OutputDir) -> list[tuple[str, str]]:
    """(clip id, shard) of the clips no committed part of `out` holds."""
    done = set(read_set(out, ["clip_id"]).column("clip_id").to_pylist())
    return [(cid, shard) for cid, shard in zip(clips.column("id").to_pylist(), clips.column("shard").to_pylist()) if cid not in done]


def _run(
    cfg: CaptionConfig,
    source: OutputDir,
    out: OutputDir,
    record: dict[str, Any],
    todo: list[tuple[str, str]],
    total: int,
    text_encoder: str,
    num_workers: int | None,
    start_ray: Callable[[], None] | None,
) -> dict[str, Any]:
    started = time.monotonic()
    sweep_temp_files(out)
    clear_success(out)
    retry_storage("writing the set manifest", lambda: write_set_manifest(out, record, status="running"))
    logger.info("caption set %s (%s): %d clips, %d already captioned, %d to caption", out.uri, set_id(record), total, total - len(todo), len(todo))
    counts: Counter[str] = Counter()
    if todo:
        # A first run captions every clip: no id set to ship to the frame tasks (millions of ids at scale).
        counts = _caption(cfg, source, out, record, todo, len(todo) == total, text_encoder, num_workers, start_ray)
    out.check_fence()
    this_run = {"captioned": sum(counts.values()), "ok": counts["ok"], "failed": counts["failed"]}
    return retry_storage(
        "writing the summary, report and _SUCCESS", lambda: _finish(out, record, total, time.monotonic() - started, this_run)
    )


def _caption(
    cfg: CaptionConfig,
    source: OutputDir,
    out: OutputDir,
    record: dict[str, Any],
    todo: list[tuple[str, str]],
    everything: bool,
    text_encoder: str,
    num_workers: int | None,
    start_ray: Callable[[], None] | None,
) -> Counter[str]:
    """Caption `todo` (`everything`: every clip of the shards) into parts of `out`; returns this
    run's counts by status."""
    import ray
    from tqdm import tqdm

    if not ray.is_initialized():
        (start_ray or ray.init)()
    workers, num_gpus, actor_cpus = _resources(cfg, num_workers)
    # An endpoint actor runs two batches at once. One batch alone leaves slots idle: its last wave
    # holds fewer than `caption.concurrency` requests, and nothing is in flight while it cleans and
    # commits. With two, the next batch's requests take the slots the first leaves free (the
    # backend's slots are shared and first come, first served, so the older batch still finishes
    # first). A local model runs one batch at a time: two generate() calls would share one device.
    calls = 2 if cfg.backend == "openai" else 1
    shard_names = sorted({shard for _, shard in todo})
    todo_ids = None if everything else frozenset(cid for cid, _ in todo)
    each = f"{num_gpus:g} GPU" if num_gpus else f"{actor_cpus:g} CPU"
    logger.info("captioning with %s %s: %d actor(s) x %s, from %d shards", cfg.backend, cfg.model, workers, each, len(shard_names))
    # Set before the plan is built (a dataset keeps the context it was made in): our workers'
    # BackendUnavailable and StorageError reach this driver as themselves (see pipelines/ingest.py).
    context = ray.data.DataContext.get_current()
    previous, context.raise_original_map_exception = context.raise_original_map_exception, True
    previous_block, context.target_max_block_size = context.target_max_block_size, FRAME_BLOCK_BYTES
    counts: Counter[str] = Counter()
    failure: BaseException | None = None
    try:
        samples = ray.data.read_webdataset(
            [source.path(name) for name in shard_names],
            filesystem=source.fs,
            decoder=None,  # raw bytes: a clip whose json or mp4 is damaged becomes a failed row, not a failed read
            override_num_blocks=len(shard_names),
        )
        frames = samples.flat_map(prepare_clip, fn_kwargs={"cfg": cfg, "todo": todo_ids}, num_cpus=1)
        parts = frames.map_batches(
            CaptionParts,
            fn_constructor_args=(cfg, out, text_encoder, record["revision"], num_gpus),
            batch_size=cfg.part_clips,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1),
            num_cpus=actor_cpus,
            num_gpus=num_gpus or None,
        )
        with tqdm(total=len(todo), desc="captioning clips", unit="clip") as progress:
            for batch in parts.iter_batches(batch_format="pyarrow", batch_size=None):
                statuses = batch.column("status").to_pylist()
                counts.update(statuses)
                progress.update(len(statuses))
                progress.set_postfix(failed=counts["failed"])
    except Exception as exc:
        failure = worker_cause(exc, (BackendUnavailable,))
        if failure is None:
            logger.exception("captioning stopped")
            failure = RecaptionStopped(f"captioning stopped ({one_line(exc, with_type=True)[:300]})")
    finally:
        context.raise_original_map_exception = previous
        context.target_max_block_size = previous_block
    if failure is not None:
        raise failure  # outside the except block: no __context__ back to the failed execution
    logger.info("captioned %d clips: %d ok, %d failed", sum(counts.values()), counts["ok"], counts["failed"])
    return counts


def _resources(cfg: CaptionConfig, num_workers: int | None) -> tuple[int, float, float]:
    """(captioning actors, GPUs per actor, CPUs per actor) on the cluster Ray is connected to."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    num_gpus = (cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus else 0.0)) if cfg.backend == "hf" else 0.0
    if num_gpus and num_gpus > gpus:
        raise ValueError(f"caption.num_gpus={num_gpus:g} but the cluster has {gpus:g} GPUs")
    workers = num_workers or cfg.workers or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
    # An endpoint captioner waits on the network: a fraction of a CPU leaves the rest to frames.
    actor_cpus = 1.0 if cfg.backend == "hf" and not num_gpus else 0.25
    return workers, num_gpus, actor_cpus


def _finish(out: OutputDir, record: dict[str, Any], total: int, seconds: float, this_run: dict[str, int]) -> dict[str, Any]:
    from pipelines.caption_report import write_caption_report

    from pipelines.caption_report import REPORT_COLUMNS

    # Only the columns counts and the report need, not the caption texts: a million rows stay small.
    table = read_set(out, list(dict.fromkeys([*REPORT_COLUMNS, *SUMMARY_COLUMNS])))
    summary = {"set_id": set_id(record)} | summarize(table, total) | {"last_run": this_run | {"wall_s": round(seconds, 3)}, "reelforge": __version__}
    write_caption_report(out, table, record, summary)
    out.check_fence()
    write_set_manifest(out, record, status="finished", summary=summary)
    mark_success(out)
    return summary


SUMMARY_COLUMNS = ["status", "reason", "stripped", "truncated", "tokens", "caption_s", "frame_s"]


def summarize(table: pa.Table, total: int) -> dict[str, Any]:
    """Counts a set's manifest and the command's last line carry: all from the committed rows
    (SUMMARY_COLUMNS of them), computed column-wise."""
    ok = pc.equal(table.column("status"), "ok")
    kept, failed = table.filter(ok), table.filter(pc.invert(ok))
    reasons = Counter(_reason_kind(reason) for reason in failed.column("reason").to_pylist())
    tokens = kept.column("tokens").drop_null()

    def mean(values: pa.ChunkedArray, digits: int) -> float | None:
        return round(float(pc.mean(values).as_py()), digits) if len(values.drop_null()) else None

    return {
        "clips": total,
        "captioned": len(table),
        "ok": len(kept),
        "failed": len(failed),
        "failure_reasons": dict(sorted(reasons.items())),
        "stripped": len(kept.column("stripped").drop_null()),
        "truncated": int(pc.sum(kept.column("truncated")).as_py() or 0),
        "tokens_mean": mean(tokens, 1),
        "caption_s_mean": mean(table.column("caption_s"), 4),
        "frame_s_mean": mean(table.column("frame_s"), 4),
    }


def _reason_kind(reason: str | None) -> str:
    """"repetition: 31% distinct ..." -> "repetition"; an endpoint's "endpoint answered 400: ..." -> "endpoint answered 400"."""
    return (reason or "unknown").split(":", 1)[0].strip()
