"""`run_ingest`: raw footage → scene-split, filtered, captioned WebDataset shards.

The job only wires stages into a Ray Data plan and sets their resources:

    discover (driver)                         SRC args → sources not yet done in --out
    → H.264 encoder check (driver)            before any work: nothing could be written without one
    → from_items → map(ProcessSource,         per source: probe (size, sha256, stream facts, or a
      actors, 1 CPU each)                     probe/size reject), then scenes → clips → filters →
                                              captions → mp4, written per source to --out/_work
                                              (atomic, resumable); up to 16 small sources a block
    → probe/size rejects: work results        written by the driver, recorded so a rerun skips them
    → pack (driver)                           dedup, shards, manifest/rejects/sources, stats, report, _SUCCESS

Why probing happens in the processing actor rather than in tasks of its own: on a web collection
of 1-second clips, separate probe tasks cost more than the probing (their own worker processes,
a materialized dataset, filter stages on the driver), and the actor opens the source right after
anyway. The probe keeps its own CrashGuard stage, so a source that kills FFmpeg while being opened
is reported as such.

Why the processor's clips are written by the actor that made them instead of flowing on as
rows: a source's clips must land all together or not at all (resume after SIGKILL), and only
the task that produced them knows when the last one is out. It also keeps video bytes out of
the object store: what streams back to the driver is one small summary row per source.
See pipelines/output.py for the commit protocol and docs/data-format.md for the outputs.

A source that kills its worker (SIGSEGV inside FFmpeg, the OOM killer) would be resent by
Ray forever; CrashGuard (pipelines/crash_guard.py) counts attempts in --out and turns it into
a "crash" reject after `max_attempts` deaths, so the rest of the job finishes.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from model import __version__
from model.chat import BackendUnavailable
from model.errors import one_line
from model.storage import config_hash
from pipelines.captions import check_captioner
from pipelines.config import MODEL_CAPTION_BACKENDS, ClipsConfig, IngestConfig
from pipelines.crash_guard import CrashGuard
from pipelines.discover import SourceFile, discover_sources
from pipelines.output import (
    STATS,
    SUCCESS,
    WORK_DIR,
    WRITERS_WAIT_S,
    IngestStopped,
    LeaseKeeper,
    OutputDir,
    StorageError,
    Superseded,
    check_config,
    clear_success,
    committed_keys,
    mark_success,
    record_config,
    retry_storage,
    sweep_temp_files,
    take_lease,
)
from pipelines.pack import PackResult, pack, write_stats
from pipelines.probe import empty_probe_row, h264_encoder, probe_notes, probe_source, size_reject
from pipelines.process import IngestSettings, SourceProcessor
from pipelines.report import write_report
from pipelines.work import clear_attempts, source_summary, work_keys, work_summary, write_source_result

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Attempts at one source (per stage) before a worker that keeps dying on it is given up on and
# the source becomes a "crash" reject: one death can be bad luck (a neighbour's memory spike),
# three in a row on the same source is the source.
DEFAULT_MAX_ATTEMPTS = 3
# How sources are grouped into Ray Data blocks, the unit each stage's task or actor call takes. Ray
# Data's driver pays per block and per operator (scheduling, metadata, iteration: ~70 ms CPU a block
# over this plan), which a 1-second web clip cannot amortise, so small sources share blocks: up to
# MAX_SOURCES_PER_BLOCK, about BLOCK_BYTES of source each. Big sources keep a block of their own, and
# there are at least BLOCKS_PER_WORKER blocks per worker when there are that many sources, so the
# actors stay evenly busy to the end. Resume is unchanged: results are written per source, and a
# block that is resent skips the sources whose results are there (ProcessSource._attempt).
MAX_SOURCES_PER_BLOCK = 16
BLOCK_BYTES = 64 * 1024**2
BLOCKS_PER_WORKER = 4


def source_blocks(sources: list[SourceFile], workers: int) -> int:
    """How many blocks `sources` go in (ray.data.from_items splits them evenly, in order)."""
    total_bytes = sum(source.size_bytes for source in sources)
    wanted = max(-(-len(sources) // MAX_SOURCES_PER_BLOCK), -(-total_bytes // BLOCK_BYTES), BLOCKS_PER_WORKER * workers)
    return max(1, min(len(sources), wanted))


def ingest_settings(config: IngestConfig) -> IngestSettings:
    """The sections that decide what a clip is (plus the pipeline version): one output folder
    holds one setting of them. `shards` is not among them: shard size changes packing, never clips."""
    return IngestSettings.from_config(config)


# --- stages as Ray sees them --------------------------------------------------------------


def probe_row(
    row: dict[str, Any], clips: ClipsConfig, out: OutputDir, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> dict[str, Any]:
    """Discovery row → probe row (probe facts plus the source key, size and mtime), rejected for
    size when it is smaller than `clips` allows, or a "crash" reject once probing it has killed
    `max_attempts` workers (opening a container runs FFmpeg's demuxer and first decode). A source
    whose store cannot be read is retried, then raises StorageError: never a reject."""

    def probe() -> dict[str, Any]:
        try:
            return size_reject(row | probe_source(row["uri"]), clips)
        except StorageError:
            raise
        except Exception as exc:  # probe_source reports bad files itself; this catches its bugs, not the job's end
            logger.exception("probe of %s failed", row["uri"])
            return row | empty_probe_row(row["uri"]) | {"reject_stage": "probe", "reject_reason": one_line(exc, with_type=True)}

    def crashed(reason: str) -> dict[str, Any]:
        return row | empty_probe_row(row["uri"]) | {"reject_stage": "crash", "reject_reason": reason}

    # No fence here: a probe commits nothing, and a superseded worker's attempt marker carries its
    # own epoch, which CrashGuard does not count.
    return retry_storage(f"probing {row['uri']}", lambda: CrashGuard(out, "probe", max_attempts).run(row["source_key"], probe, crashed))


def _summary_row(summary: dict[str, Any], pending_reject: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ProcessSource hands back per source: the summary, plus the probe row of a probe or size
    reject the driver still has to write (the same columns for every row: Arrow blocks)."""
    return summary | {"pending_reject": json.dumps(pending_reject, default=str) if pending_reject is not None else None}


class _SourceFailed(Exception):
    """An exception raised by a source's processing (its __cause__), told apart from our writes'."""


def _processed(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    try:
        yield from rows
    except Exception as exc:
        raise _SourceFailed() from exc


class ProcessSource:
    """Actor: probe one discovered source (probe_row), then run SourceProcessor on it and write its
    work result. A probe or size reject is not written here but handed back for the driver to
    write after processing (`pending_reject`, the probe row as JSON): a run whose processing
    fails at once must leave no result, and so no config record, behind.

    What becomes of an exception (docs/reliability.md): raised by the source's processing, a
    "process" reject, unless it is an OSError or StorageError (reading the source's store or a
    sidecar failed: our environment); raised by writing our output, StorageError. StorageError is
    retried with backoff and then stops the job; Superseded (a newer run holds --out) stops at once."""

    def __init__(
        self,
        settings: IngestSettings,
        out: OutputDir,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        config_record: tuple[dict[str, Any], str] | None = None,
    ) -> None:
        self.processor = SourceProcessor(settings)
        self.clips = settings.clips
        self.out = out
        self.max_attempts = max_attempts
        self.guard = CrashGuard(out, "process", max_attempts)
        self.config_record = config_record  # (sections, hash): recorded in --out with the first result

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        source = dict(row)
        finished = retry_storage(f"reading the result of {source['uri']}", lambda: self._finished(source["source_key"]))
        if finished is not None:
            return finished
        probed = probe_row(source, self.clips, self.out, self.max_attempts)
        if probed["reject_stage"] is not None:
            return _summary_row(source_summary(probed, []), pending_reject=probed)
        return self.process(probed)

    def process(self, probed: dict[str, Any]) -> dict[str, Any]:
        """Process one probed source that passed its probe and write its work result."""
        return retry_storage(f"processing {probed['uri']}", lambda: self._attempt(probed))

    def _finished(self, key: str) -> dict[str, Any] | None:
        """The summary of `key`'s result when it is written: Ray resent a source (with its block)
        whose result was written before its worker died."""
        if not self.out.exists(f"{WORK_DIR}/{key}.parquet"):
            return None
        clear_attempts(self.out, key, "process")
        return _summary_row(work_summary(self.out, key))

    def _attempt(self, source: dict[str, Any]) -> dict[str, Any]:
        finished = self._finished(source["source_key"])  # a retry after our storage failed past the commit
        if finished is not None:
            return finished
        work = lambda: self._process(source)  # noqa: E731
        return _summary_row(self.guard.run(source["source_key"], work, lambda reason: self._crashed(source, reason)))

    def _process(self, source: dict[str, Any]) -> dict[str, Any]:
        try:
            # A generator: write_source_result streams each clip's MP4 into the work tar as it is
            # finished, so an actor holds one clip's bytes, not a whole source's.
            return self._write(source, self._rows(source))
        except _SourceFailed as failed:
            exc = failed.__cause__
            if isinstance(exc, StorageError):
                raise exc from None
            if isinstance(exc, BackendUnavailable):  # the captioner, not the source: retried, then the job stops
                raise StorageError(f"captioning {source['uri']}: {exc}") from exc
            if isinstance(exc, OSError):  # decode errors are caught inside: this is a store or a sidecar
                raise StorageError(f"reading {source['uri']} or its sidecar failed: {one_line(exc, with_type=True)}") from exc
            # Bad input never stops the job: the source becomes a reject row.
            logger.error("reject %s: processing failed", source["uri"], exc_info=exc)
            return self._write(source | {"reject_stage": "process", "reject_reason": one_line(exc, with_type=True)}, [])

    def _rows(self, source: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from _processed(self.processor.iter_rows(source))
        if source.get("duration_s") is None and self.processor.frames_decoded:
            # A bare stream's container gives no duration (probe.RAW_STREAM_FORMATS): record what
            # was decoded, read by write_source_result once the rows are out.
            source.update(duration_s=self.processor.decoded_s, num_frames=self.processor.frames_decoded)

    def _crashed(self, source: dict[str, Any], reason: str) -> dict[str, Any]:
        return self._write(source | {"reject_stage": "crash", "reject_reason": reason}, [])

    def _write(self, source: dict[str, Any], rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
        record = self.config_record
        before_commit = (lambda: record_config(self.out, *record)) if record is not None else None
        return write_source_result(self.out, source, rows, before_commit=before_commit)


# --- the job ------------------------------------------------------------------------------


def run_ingest(
    config: IngestConfig,
    srcs: list[str],
    out: str,
    *,
    new_output: bool = False,
    num_workers: int | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    start_ray: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Ingest every source under `srcs` not yet done in `out`, then pack and commit; returns stats.json.

    `out` must hold no ingest made with other settings (ValueError) unless `new_output` clears it
    first, and no other live run (IngestStopped). At most `num_workers` processing actors (default:
    the cluster's CPUs); a source whose worker dies `max_attempts` times (per stage) becomes a
    "crash" reject. `start_ray` connects to Ray when it is needed and not yet initialized (default
    `ray.init()`). Raises ValueError for bad arguments before anything is written, IngestStopped
    when the job cannot finish (storage failing past its retries included)."""
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    sources = discover_sources(srcs)
    output = OutputDir(out)
    settings = ingest_settings(config)
    record = (settings.record(), config_hash(settings.record()))
    try:
        if not new_output:
            check_config(output, *record, new_output=False)  # refuse before writing anything
            if _nothing_new(output, sources):
                logger.info("nothing new to ingest; %s is unchanged", out)
                return json.loads(output.read_bytes(STATS)) | {"nothing_new": True}
        if config.caption.backend in MODEL_CAPTION_BACKENDS:
            check_captioner(config.caption)  # a missing model or a dead endpoint fails here, in one line
        retry_storage(f"taking the lease on {out}", lambda: take_lease(output))
    except StorageError as exc:
        raise IngestStopped(f"{exc}; nothing was changed in {out}") from None
    keeper = LeaseKeeper(output)
    try:
        return _run(config, sources, output, record, new_output, num_workers, max_attempts, start_ray)
    except (StorageError, Superseded, IngestStopped) as exc:
        failure = IngestStopped(_stopped_message(exc, output))
    finally:
        keeper.release()
    # Raised out here, as a new exception: the one caught holds, through its traceback, the frames
    # of the failed run and so its Ray Data execution, whose actors stay alive and keep their CPUs
    # while anything references it. A driver that goes on (a test, a notebook) would starve.
    gc.collect()
    raise failure


def _nothing_new(out: OutputDir, sources: list[SourceFile]) -> bool:
    """Every source committed, no work result waiting and _SUCCESS there: a rerun writes nothing."""
    committed, finished = committed_keys(out), work_keys(out)
    return all(s.source_key in committed | finished for s in sources) and not (finished - committed) and out.exists(SUCCESS)


def _run(
    config: IngestConfig,
    sources: list[SourceFile],
    output: OutputDir,
    record: tuple[dict[str, Any], str],
    new_output: bool,
    num_workers: int | None,
    max_attempts: int,
    start_ray: Callable[[], None] | None,
) -> dict[str, Any]:
    """The job, once this run holds the lease of `output`."""
    check_config(output, *record, new_output=new_output)
    start = time.monotonic()
    sweep_temp_files(output)  # what killed runs were writing; live writers' files stay
    done = committed_keys(output) | work_keys(output)
    todo = [source for source in sources if source.source_key not in done]
    logger.info("%d sources, %d already done in %s, %d to process", len(sources), len(sources) - len(todo), output.uri, len(todo))
    clear_success(output)
    phase_s: dict[str, float] = {}  # where the wall time went: ray_init, probe, process, pack
    if todo:
        _process(config, todo, output, record, num_workers, max_attempts, start_ray, phase_s)
    # Workers of a killed earlier run may still be finishing a file: wait for them to exit, so that
    # nothing they do lands after packing, then drop what dead workers left.
    sweep_temp_files(output, wait_s=WRITERS_WAIT_S)
    dedup_hamming = config.filters.dedup_hamming if config.filters.mode == "filter" else None
    started = time.monotonic()
    output.check_fence()
    # Packing is a pure function of what is committed and finished, so a failed try is redone whole.
    result: PackResult = retry_storage("packing", lambda: pack(output, dedup_hamming, config.shards.target_mb))
    phase_s["pack"] = time.monotonic() - started
    logger.info("packed %d clips into %d new shards in %.1f s", result.clips_kept, len(result.shards), phase_s["pack"])

    def finish() -> dict[str, Any]:
        stats = write_stats(output, result, time.monotonic() - start, phase_s, record[1], _versions())
        write_report(output, config.filters, stats)
        output.check_fence()
        mark_success(output)
        return stats

    return retry_storage("writing stats, report and _SUCCESS", finish)


def _stopped_message(exc: BaseException, out: OutputDir) -> str:
    # The first line only: Ray Data appends its retry advice to exceptions that pass through it.
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (Superseded, IngestStopped)):
        return first
    return f"{first}; finished sources are kept in {out.path(WORK_DIR)}, rerun the same command to resume"


def _process(
    config: IngestConfig,
    todo: list[SourceFile],
    out: OutputDir,
    record: tuple[dict[str, Any], str],
    num_workers: int | None,
    max_attempts: int,
    start_ray: Callable[[], None] | None,
    phase_s: dict[str, float],
) -> None:
    """Probe `todo` and process the sources that pass, each into its work result in `out`; then
    write the probe and size rejects (last, so that a run whose processing fails at once leaves
    no result, and so no config record, behind)."""
    import ray

    try:
        logger.info("H.264 encoder: %s", h264_encoder())
    except RuntimeError as exc:  # no working H.264 encoder: nothing could be written
        raise IngestStopped(str(exc)) from None
    if not ray.is_initialized():
        started = time.monotonic()
        (start_ray or ray.init)()  # plain ray.init(): RAY_ADDRESS, when set, points it at a cluster
        phase_s["ray_init"] = time.monotonic() - started
    workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    alive_nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if alive_nodes > 1 and out.is_local:
        # Actors write work results where they run; the driver packs from its own disk.
        logger.warning("%d Ray nodes but --out %s is a local path: it must be a shared mount on every node", alive_nodes, out.uri)
    # Our workers' StorageError and Superseded must reach this driver as themselves, not as Ray
    # Data's UserCodeException, whose cause does not survive the trip (exceptions pickle without
    # __cause__): this flag makes Ray Data raise what the UDF raised. Restored when the job ends.
    context = ray.data.DataContext.get_current()
    previous, context.raise_original_map_exception = context.raise_original_map_exception, True
    try:
        _probe_and_process(config, todo, out, record, workers, max_attempts, phase_s)
    finally:
        context.raise_original_map_exception = previous


def _probe_and_process(
    config: IngestConfig,
    todo: list[SourceFile],
    out: OutputDir,
    record: tuple[dict[str, Any], str],
    workers: int,
    max_attempts: int,
    phase_s: dict[str, float],
) -> None:
    import ray
    from tqdm import tqdm

    items = ray.data.from_items([source.as_row() for source in todo], override_num_blocks=source_blocks(todo, workers))
    results = items.map(
        ProcessSource,
        fn_constructor_args=(ingest_settings(config), out, max_attempts, record),
        # A fixed pool: the number of sources is known, so start every actor at once instead of
        # letting the autoscaler add them one backlog check at a time.
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo))),
        num_cpus=1,
        # Left at Ray Data's actor-pool defaults (max_restarts=-1, max_task_retries=-1; passing
        # them is deprecated): a dead actor is restarted and its rows resent without limit, and
        # CrashGuard's attempt markers are what bound a source that keeps killing workers.
    )
    started = time.monotonic()
    probed: list[dict[str, Any]] = []  # the probe facts the notes need, one small row per source
    rejected: list[dict[str, Any]] = []  # probe and size rejects, written below

    def drain() -> None:
        for summary in tqdm(results.iter_rows(), total=len(todo), desc="processing sources", unit="source"):
            if summary["pending_reject"] is not None:
                rejected.append(json.loads(summary["pending_reject"]))
            else:
                probed.append({"uri": summary["uri"], "codec": summary["codec"]})
            if summary["rejected"]:
                logger.warning("source %s rejected: %s", summary["uri"], summary["reject_reason"])

    _run_stage(drain, "processing", out)
    phase_s["process"] = time.monotonic() - started
    logger.info("probed and processed %d sources in %.1f s", len(todo), phase_s["process"])
    for line in probe_notes(probed + rejected, config.clips):
        logger.info("probe: %s", line)
    if rejected:
        retry_storage("recording the config", lambda: record_config(out, *record))
    for row in rejected:
        retry_storage(f"writing the reject of {row['uri']}", lambda row=row: write_source_result(out, row, []))


def _run_stage(stage: Callable[[], T], what: str, out: OutputDir) -> T:
    """`stage()`, a Ray Data execution. When it fails: the StorageError or Superseded a worker
    raised, or IngestStopped for anything else (a worker dying past Ray's retries)."""
    try:
        return stage()
    except Exception as exc:
        failure = worker_cause(exc)
        if failure is None:
            logger.exception("%s stopped", what)
            failure = IngestStopped(
                f"{what} stopped ({one_line(exc, with_type=True)[:300]}); finished sources are kept in "
                f"{out.path(WORK_DIR)}, rerun the same command to resume"
            )
    raise failure  # outside the except block: no __context__ back to the failed execution (see run_ingest)


def worker_cause(exc: BaseException, kinds: tuple[type[BaseException], ...] = ()) -> BaseException | None:
    """The StorageError, Superseded or `kinds` a Ray worker raised, out of the RayTaskError around it."""
    while isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause  # type: ignore[attr-defined]
    return exc if isinstance(exc, (StorageError, Superseded, *kinds)) else None


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import av
    import pyarrow
    import ray
    import scenedetect

    return {
        "reelforge": __version__,
        "ray": ray.__version__,
        "av": av.__version__,
        "scenedetect": scenedetect.__version__,
        "pyarrow": pyarrow.__version__,
        "webdataset": version("webdataset"),  # not imported for it: webdataset imports torch
        "python": sys.version.split()[0],
    }
