"""MLflow tracking for training runs: one small `Tracker`, active on rank 0 only.

Every other rank gets the same object with every method a no-op, so the loop calls it
unconditionally. The store is `mlflow.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else
SQLite + local artifacts under the run's output folder (`sqlite:///<out>/mlflow.db`,
artifacts in `<out>/mlartifacts`), so a laptop run needs no server.

    tracker = Tracker(cfg.mlflow, out_dir, rank=rank)
    run_id = tracker.start_or_resume(state.mlflow_run_id, run_name="tiny", tags=run_tags(config_hash, data_dir, cfg.data.held_out))
    tracker.log_params(run_params(cfg, data_dir))      # the training config + the shards' ingest config
    tracker.log_metrics({"loss": 0.31, "clips_per_s": 12.0}, step=100)   # a step is logged at most once
    with tracker.checkpoint_timer():                                       # counted as goodput loss
        save_checkpoint(...)
    tracker.log_sample_video(mp4_bytes, "a red fox in snow", step=100)     # samples/step-000100/a-red-fox-in-snow.mp4
    tracker.end("FINISHED")

What a run trained is pinned by its tags (git commit, config hash, the data's manifest sha256,
the ingest config hash the shards record, and `data.held_out`, the fraction of clips kept out of
training, which registration copies onto the model version for evaluation) and params: the training
config as `train.lr` and the like (`data.held_out` among them, with `data.held_out_clips`, how many
clips of the shards that kept out), and the ingest config the shards were made with, read from the
shards' own record (`_work/config.json`), as `ingest.clips.fps` and the like.

Resume continues the SAME run (its id travels in `trainer_state.json`). Steps replayed
between the last checkpoint and the crash were logged already; `log_metrics` drops any step
at or below the last one logged for that key, read back from the run's history on resume.

Goodput: every metrics call also logs `goodput/wall_s` (since the run started, across
restarts), `goodput/checkpoint_s` (time inside `checkpoint_timer`), `goodput/restart_s`
(from the last metric logged before a crash to the first new step after the resume, less
the steps that gap legitimately trained) and `goodput/fraction` = 1 - lost / wall.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from model.storage import file_sha256, resolve_uri
from training.config import MlflowSection

logger = logging.getLogger(__name__)

# MLflow's own limits (mlflow.utils.validation): longer values are rejected, not truncated.
MAX_PARAM_VALUE_CHARS = 6000
MAX_KEY_CHARS = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

# Tag keys other tools read: MLflow's UI shows `mlflow.source.git.commit` on the run page.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_CONFIG_HASH = "reelforge.config_hash"
TAG_MANIFEST_SHA256 = "reelforge.data_manifest_sha256"
TAG_GIT_DIRTY = "reelforge.git_dirty"
TAG_INGEST_CONFIG_HASH = "reelforge.data_ingest_config_hash"
TAG_OUT = "reelforge.out"
# data.held_out the run trained with; registration carries it (like every reelforge.* run tag) onto
# the model version, where training/evaluation.py reads which clips the version never saw.
TAG_HELD_OUT = "reelforge.data.held_out"

# What an ingest output says about the config it was made with (docs/data-format.md).
INGEST_CONFIG_RECORD = "_work/config.json"
INGEST_STATS = "stats.json"

GOODPUT_KEYS = ("goodput/wall_s", "goodput/checkpoint_s", "goodput/restart_s", "goodput/fraction")


def resolve_tracking_uri(cfg: MlflowSection, out_dir: str | Path | None) -> str:
    """`mlflow.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a SQLite store in `out_dir`."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    if out_dir is None:
        raise ValueError(
            "no MLflow tracking store: set mlflow.tracking_uri or MLFLOW_TRACKING_URI, or give the run's output folder"
        )
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str, out_dir: str | Path | None) -> str | None:
    """`<out>/mlartifacts` for the embedded SQLite default; a server or database store picks its own."""
    if out_dir is None or not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(out_dir).resolve() / "mlartifacts").as_uri()


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # another process (a second driver, a restarted worker) created it in between
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flat_params(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train.lr": 1e-4, ...}`: a pydantic config (or plain nested dicts) as dotted keys, what
    `Tracker.log_params` takes."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(config.model_dump(mode="json") if hasattr(config, "model_dump") else config, prefix)
    return flat


def run_params(config: Any, data_dir: str | Path | None = None) -> dict[str, Any]:
    """A run's params: its training config, the ingest config its shards were made with as
    `ingest.<section>.<key>` (from the shards' own record, `ingest_record`), when they carry one,
    with `data.caption_set`, what made that set (`data.caption_set_id`, model, revision, prompt hash),
    and `data.held_out_clips`: how many clips of the shards `data.held_out` keeps out of training."""
    params = flat_params(config)
    held_out = getattr(getattr(config, "data", None), "held_out", None)
    if held_out is not None and data_dir is not None:
        from training.clip_index import read_clip_index, without_held_out

        params["data.held_out_clips"] = len(without_held_out(read_clip_index(str(data_dir)), held_out).held_out_ids)
    record = ingest_record(data_dir) if data_dir is not None else None
    if record is not None and record.get("sections"):
        params.update(flat_params(record["sections"], prefix="ingest."))
    caption_set = getattr(getattr(config, "data", None), "caption_set", None)
    if caption_set and data_dir is not None:
        from training.caption_sets import caption_set_manifest

        manifest = caption_set_manifest(str(data_dir), caption_set)
        params["data.caption_set_id"] = manifest["set_id"]
        params["data.caption_set_model"] = manifest["record"]["model"]
        params["data.caption_set_revision"] = manifest["record"]["revision"]
        params["data.caption_set_prompt_hash"] = manifest["record"]["prompt_hash"]
    return params


# --- tags --------------------------------------------------------------------------------


def git_commit(repo_dir: str | Path | None = None) -> tuple[str, bool] | None:
    """(HEAD commit, tracked files modified?) of the checkout holding the code, or None outside one."""
    repo_dir = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(dirty)) if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def run_tags(config_hash: str, data_dir: str | Path | None = None, held_out: float | None = None) -> dict[str, str]:
    """Tags that pin what a run trained: code commit, resolved config, exact data (manifest hash),
    the ingest config hash the shards were made with and the held-out fraction (None: not tagged)."""
    tags = {TAG_CONFIG_HASH: config_hash}
    if held_out is not None:
        tags[TAG_HELD_OUT] = str(held_out)  # repr: the exact threshold, read back by float()
    commit = git_commit()
    if commit is not None:
        tags[TAG_GIT_COMMIT] = commit[0]
        tags[TAG_GIT_DIRTY] = str(commit[1]).lower()
    if data_dir is not None:
        try:
            tags[TAG_MANIFEST_SHA256] = manifest_sha256(data_dir)
        except (OSError, FileNotFoundError) as exc:
            logger.warning("no data manifest hash: %s unreadable (%s)", data_dir, exc)
        record = ingest_record(data_dir)
        if record is not None:
            tags[TAG_INGEST_CONFIG_HASH] = record["config_hash"]
    return tags


def manifest_sha256(data_dir: str | Path) -> str:
    """sha256 of the shards' `manifest.parquet`: one dataset, wherever it is copied."""
    return file_sha256(f"{str(data_dir).rstrip('/')}/manifest.parquet")


def ingest_record(data_dir: str | Path) -> dict[str, Any] | None:
    """The ingest config the shards in `data_dir` were made with, from their own record
    (docs/data-format.md): `_work/config.json` (`{"config_hash", "sections"}`), else the
    `config_hash` of `stats.json` alone (`sections` None); None when the folder has neither."""
    filesystem, root = resolve_uri(data_dir)
    for name in (INGEST_CONFIG_RECORD, INGEST_STATS):
        try:
            with filesystem.open_input_stream(f"{root}/{name}") as stream:
                record = json.loads(stream.read())
        except (OSError, FileNotFoundError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("config_hash"):
            return {"config_hash": record["config_hash"], "sections": record.get("sections")}
    logger.warning("%s carries no ingest config record (%s or %s)", data_dir, INGEST_CONFIG_RECORD, INGEST_STATS)
    return None


def prompt_slug(prompt: str, max_chars: int = 60) -> str:
    """`"A red fox, in snow!"` -> `"a-red-fox-in-snow"`: a file name that still says what was asked."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_chars].rstrip("-")
    return slug or "prompt"


# --- goodput -----------------------------------------------------------------------------


def restart_lost_s(last_log_time_s: float, last_step: int, now_s: float, new_step: int, step_time_s: float) -> float:
    """Wall time a crash cost: the gap from the last metric logged before it to the first new step
    after the resume, minus the time the `new_step - last_step` steps in that gap would normally take."""
    gap_s = now_s - last_log_time_s
    return max(0.0, gap_s - max(0, new_step - last_step) * step_time_s)


def normal_step_s(history: list[Any], intervals: int = 4) -> float:
    """Seconds a step normally takes, from the last `intervals` gaps between logged points of one
    metric history (0 if unknown). The lower median, so a gap stretched by a checkpoint save (counted
    apart, as checkpoint time) or by eval samples does not pass for a normal step."""
    points = sorted(history, key=lambda m: (m.step, m.timestamp))[-(intervals + 1) :]
    per_step = [(b.timestamp - a.timestamp) / 1000 / (b.step - a.step) for a, b in zip(points, points[1:]) if b.step > a.step]
    return max(0.0, statistics.median_low(per_step)) if per_step else 0.0


# --- the tracker -------------------------------------------------------------------------


class Tracker:
    """Rank-0 MLflow run: start or resume, params, metrics once per step, artifacts, samples, end.

    On any rank but 0 every method returns at once (`run_id` stays None)."""

    def __init__(self, cfg: MlflowSection, out_dir: str | Path | None, *, rank: int = 0) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.active = rank == 0
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._client: Any = None
        # per metric key: the last step already in the run (resume skips anything at or below it)
        self._last_step: dict[str, int] = {}
        # Metric batches go out on one thread of our own, so they land in the order they were logged
        # and a slow store never stalls a step; the futures say when each has landed or failed.
        self._sender: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []  # batches not yet confirmed
        self._checkpoint_s = 0.0
        self._restart_s = 0.0
        self._run_start_s = time.time()
        # set on resume, consumed by the first genuinely new step
        self._resume_gap: tuple[float, int, float] | None = None

    # -- lifecycle --

    def start_or_resume(
        self, run_id: str | None = None, run_name: str | None = None, tags: dict[str, str] | None = None
    ) -> str | None:
        """Start a new run, or continue run `run_id` (same id, status back to RUNNING). Returns the id."""
        if not self.active:
            return None
        from mlflow import MlflowClient

        self.tracking_uri = resolve_tracking_uri(self.cfg, self.out_dir)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id is None:
            experiment_id = get_or_create_experiment(
                self._client, self.cfg.experiment, default_artifact_location(self.tracking_uri, self.out_dir)
            )
            run = self._client.create_run(experiment_id, run_name=run_name, tags=tags or {})
            self.run_id = run.info.run_id
            self._run_start_s = run.info.start_time / 1000
            logger.info(
                "MLflow run %s started in %s (experiment %s)", self.run_id, self.tracking_uri, self.cfg.experiment
            )
            return self.run_id
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            # typically a checkpoint moved to another machine whose default store is a fresh SQLite file
            raise ValueError(
                f"MLflow run {run_id} (from the checkpoint) is not in {self.tracking_uri}; "
                "set mlflow.tracking_uri to the store the run was started in"
            ) from None
        self.run_id = run_id
        self._run_start_s = run.info.start_time / 1000
        self._client.update_run(run_id, status="RUNNING")
        if tags:
            self.set_tags(tags)
        self._read_history(run)
        logger.info(
            "MLflow run %s resumed in %s; last logged step %d", run_id, self.tracking_uri, self.last_logged_step
        )
        return run_id

    def end(self, status: str = "FINISHED") -> None:
        """Flush pending metrics and mark the run FINISHED, FAILED or KILLED."""
        if not self.active or self.run_id is None:
            return
        self.flush()
        if self._sender is not None:
            self._sender.shutdown()
            self._sender = None
        self._client.set_terminated(self.run_id, status=status)
        logger.info("MLflow run %s ended: %s", self.run_id, status)

    def flush(self) -> None:
        """Block until every asynchronously logged batch has landed (raises if one failed)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    @property
    def last_logged_step(self) -> int:
        """Highest step logged for any metric so far (-1 before the first)."""
        return max(self._last_step.values(), default=-1)

    # -- params, tags --

    def log_params(self, flat_config: dict[str, Any]) -> None:
        """Log `{"train.lr": 1e-4, ...}` as params, and in full as artifact `config.json` (values over
        MLflow's length limit are cut in the params only). On resume, params already logged stay (MLflow
        params are immutable); a changed setting is reported and the new config saved beside the first
        as `config-resumed-<unix time>.json`."""
        if not self.active or self.run_id is None:
            return
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        params, changed = [], []
        for key, value in flat_config.items():
            key = key[:MAX_KEY_CHARS]
            text = "None" if value is None else str(value)
            if len(text) > MAX_PARAM_VALUE_CHARS:
                suffix = f"...[{len(text)} chars]"
                text = text[: MAX_PARAM_VALUE_CHARS - len(suffix)] + suffix
            if key in existing:
                # MLflow params are immutable; a resumed run with a changed setting keeps the first value
                if existing[key] != text:
                    changed.append(f"{key}: {existing[key]!r} -> {text!r}")
                continue
            params.append(Param(key, text))
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])
        full = {key: value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
                for key, value in flat_config.items()}  # fmt: skip
        if not existing:
            self._client.log_dict(self.run_id, full, "config.json")
        if changed:
            self._client.log_dict(self.run_id, full, f"config-resumed-{int(time.time())}.json")
            logger.warning("resumed run %s keeps its first params; changed now: %s", self.run_id, "; ".join(changed))

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active or self.run_id is None or not tags:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k[:MAX_KEY_CHARS], str(v)) for k, v in tags.items()])

    # -- metrics --

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log `metrics` at `step`, plus the goodput metrics. A key whose step is at or below the last
        one logged for it is dropped: a resumed run replays steps the crashed one logged already.

        Logging is asynchronous so a slow tracking server never stalls the training step;
        `flush()`/`end()` wait for it."""
        if not self.active or self.run_id is None:
            return
        from mlflow.entities import Metric

        now_s = time.time()
        if self._resume_gap is not None and step > self.last_logged_step:
            last_log_time_s, last_step, step_time_s = self._resume_gap
            self._restart_s += restart_lost_s(last_log_time_s, last_step, now_s, step, step_time_s)
            self._resume_gap = None
        values = dict(metrics)
        values.update(self.goodput(now_s))
        timestamp_ms = int(now_s * 1000)
        batch = []
        for key, value in values.items():
            if step <= self._last_step.get(key, -1):
                continue
            self._last_step[key] = step
            batch.append(Metric(key[:MAX_KEY_CHARS], float(value), timestamp_ms, step))
        self._pending = [future for future in self._pending if not _settled(future)]
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reelforge-mlflow")
        for start in range(0, len(batch), METRICS_PER_BATCH):
            chunk = batch[start : start + METRICS_PER_BATCH]
            self._pending.append(self._sender.submit(self._client.log_batch, self.run_id, metrics=chunk))

    # -- goodput --

    @contextlib.contextmanager
    def checkpoint_timer(self) -> Iterator[None]:
        """Wrap a checkpoint save: its wall time counts as lost for goodput (also usable on other ranks)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._checkpoint_s += time.perf_counter() - start

    def goodput(self, now_s: float | None = None) -> dict[str, float]:
        """Goodput metrics so far: wall time since the run started, time lost to saves and restarts."""
        wall_s = max(1e-9, (time.time() if now_s is None else now_s) - self._run_start_s)
        lost_s = self._checkpoint_s + self._restart_s
        return {
            "goodput/wall_s": wall_s,
            "goodput/checkpoint_s": self._checkpoint_s,
            "goodput/restart_s": self._restart_s,
            "goodput/fraction": max(0.0, 1.0 - lost_s / wall_s),
        }

    # -- artifacts --

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active or self.run_id is None:
            return
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if not self.active or self.run_id is None:
            return
        self._client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_sample_video(self, mp4: bytes, prompt: str, step: int) -> str | None:
        """Store one generated sample as `samples/step-{step:06d}/{prompt slug}.mp4`; returns that path."""
        if not self.active or self.run_id is None:
            return None
        artifact_dir = f"samples/step-{step:06d}"
        name = f"{prompt_slug(prompt)}.mp4"
        with tempfile.TemporaryDirectory(prefix="reelforge-sample-") as tmp:
            local = Path(tmp) / name
            local.write_bytes(mp4)
            self._client.log_artifact(self.run_id, str(local), artifact_dir)
        return f"{artifact_dir}/{name}"

    # -- internals --

    def _read_history(self, run: Any) -> None:
        """Per key, the last step already logged; goodput totals and the crash gap to account for."""
        self.flush()
        last_time_s, step_time_s = 0.0, 0.0
        for key in run.data.metrics:
            history = self._client.get_metric_history(self.run_id, key)
            if not history:
                continue
            last = max(history, key=lambda m: (m.step, m.timestamp))
            self._last_step[key] = last.step
            last_time_s = max(last_time_s, last.timestamp / 1000)
            if key not in GOODPUT_KEYS:
                step_time_s = max(step_time_s, normal_step_s(history))
        self._checkpoint_s = run.data.metrics.get("goodput/checkpoint_s", 0.0)
        self._restart_s = run.data.metrics.get("goodput/restart_s", 0.0)
        if self._last_step:
            self._resume_gap = (last_time_s, self.last_logged_step, step_time_s)


def _settled(future: Future) -> bool:
    """True once an async batch has landed or failed. A failure is logged, not raised: a tracking
    server hiccup must not kill hours of training (`flush()` at the end still raises)."""
    if not future.done():
        return False
    error = future.exception()
    if error is not None:
        logger.error("MLflow metrics batch failed: %s", error)
    return True
