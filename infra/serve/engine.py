"""The serving engine: one loaded model, a bounded queue of jobs, one generation at a time.

Everything the HTTP app (infra/serve/app.py) does goes through an `Engine`:

    engine = Engine(ServeSettings(model="models:/reelforge-t2v@champion", store="jobs"))
    engine.start()                           # takes the store's lease, re-queues what a killed server left
    record, plan = engine.check(body)        # ServeError(400, "width: ...") before any work
    status = engine.submit(record, plan)     # ServeError(429, Retry-After) when full
    engine.wait(status["id"], timeout=30)

Why one worker thread: two `generate()` calls on one model would share its device and memory and
finish later than one after the other. Cancellation and the job timeout are checked after every
denoising step (`VideoPipeline.generate(on_step=...)`), so a cancelled job stops within one step.

Costs are estimated in *units*: one denoising step of one window at the trained size. A warm-up at
load measures the seconds of one unit; every finished job refines it. The estimate decides
whether `/invocations` answers synchronously (within `--sync-budget`) or with 202 and a job, and
what `Retry-After` says.

State lives in the store (infra/serve/store.py); memory mirrors it. A restarted server re-queues
queued jobs and restarts an interrupted one once (the seed is in the request, so the video is the
same); a job interrupted twice fails rather than take the server down with it again.
"""

from __future__ import annotations

import collections
import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from model.errors import one_line
from model.pyfunc import build_request
from pipelines.output import IngestStopped, LeaseKeeper, StorageError, take_lease
from infra.serve.job import JobStopped, generate_job, job_outcome
from infra.serve.model_ref import LoadedModel, check_reference, cost_units, load_model, reload_if_moved
from infra.serve.settings import ServeSettings
from infra.serve.request_body import ServeError, field_message, parse_body
from infra.serve.store import JobStore, new_job_id, request_sha256

logger = logging.getLogger(__name__)

FINAL = ("completed", "failed", "cancelled")
MAX_ATTEMPTS = 2  # a job interrupted by a server restart runs once more, then fails
PERSIST_EVERY_S = 2.0  # progress reaches the store at most this often (every step would be an S3 PUT)
EWMA = 0.3  # weight of the newest finished job in the seconds-per-unit estimate


def _now() -> int:
    return int(time.time())


class Engine:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.store = JobStore(settings.store)
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self.jobs: dict[str, dict[str, Any]] = {}  # id -> status record (what status.json holds)
        self.queue: collections.deque[str] = collections.deque()
        self.units: dict[str, float] = {}  # id -> estimated cost units
        self.running: set[str] = set()  # one at a time here; a generator replica each on Ray (infra/serve/on_ray.py)
        self.seconds_per_unit: float | None = None
        self._cancel: set[str] = set()
        self._finished: dict[str, threading.Event] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._lease: LeaseKeeper | None = None
        self._threads: list[threading.Thread] = []

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Take the store's lease (one server per store), re-queue what a previous server left, and
        load the model in the background (`/health` answers 503 until it is ready)."""
        check_reference(self.settings.model)
        try:
            take_lease(self.store.out, command="serve", what="--store")
        except (IngestStopped, StorageError) as exc:
            raise ValueError(str(exc)) from None
        self.store.prepare()
        self._lease = LeaseKeeper(self.store.out)
        self._recover()
        self._spawn(self._load_and_work, "generator")
        self._spawn(self._housekeeping, "housekeeping")

    def stop(self) -> None:
        """Stop taking jobs; a running one stops at its next step and is queued again in the store."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._lease is not None:
            self._lease.release()

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=f"serve-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def state(self) -> str:
        return "ready" if self.model is not None else ("failed" if self.load_error else "loading")

    def _load(self) -> LoadedModel:
        loaded, measured = load_model(self.settings, measure=self.settings.warmup and self.seconds_per_unit is None)
        self.seconds_per_unit = measured or self.seconds_per_unit
        logger.info(
            "serving %s (version %s, bundle %s) on %s; one step at the trained size takes %s",
            loaded.uri, loaded.version or "-", loaded.bundle_sha256[:12], loaded.pipeline.device,
            f"{self.seconds_per_unit:.3f} s" if self.seconds_per_unit else "(not measured yet)",
        )  # fmt: skip
        return loaded

    def _load_and_work(self) -> None:
        try:
            model = self._load()
        except Exception as exc:  # the server stays up and says why on /health
            self.load_error = one_line(exc, with_type=not isinstance(exc, ValueError))
            logger.error("could not load %s: %s", self.settings.model, self.load_error)
            if not isinstance(exc, ValueError):
                logger.debug("load failure", exc_info=True)
            return
        with self._cond:
            self.model = model
            for job_id in self.queue:  # jobs re-queued at start are estimated now that a model is here
                self.units.setdefault(job_id, self._estimate_stored(job_id))
        self._work()

    # -- requests ---------------------------------------------------------------------------------

    def ready_model(self) -> LoadedModel:
        if self.model is not None:
            return self.model
        if self.load_error:
            raise ServeError(503, f"the model failed to load: {self.load_error}", code="model_unavailable")
        raise ServeError(503, "the model is still loading", code="model_loading", headers={"Retry-After": "5"})

    def check(self, body: Any, row: int | None = None) -> tuple[dict[str, Any], Any]:
        """A request body (one JSON object / table row) -> (the record to store, the validated plan).
        Every problem is a ServeError(400) naming the field; nothing is queued or generated here."""
        where = f"row {row}: " if row is not None else ""
        record = parse_body(body, where)
        pipeline = self.ready_model().pipeline
        with tempfile.TemporaryDirectory(prefix="reelforge-check-") as tmp:
            try:
                request, seed, mode = build_request(record, Path(tmp), row=row or 0)
                plan = pipeline.check_request(request)
            except ValueError as exc:
                message, param = field_message(one_line(exc))
                raise ServeError(400, f"{where}{message}", param=param) from None
        record["seed"], record["mode"] = seed, mode
        return record, plan

    def submit(self, record: dict[str, Any], plan: Any, *, key: str | None = None, body_sha256: str | None = None,
               source: str = "videos") -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Queue a checked request; (its public status, whether it is new). A repeated
        Idempotency-Key returns the job it made; with a different request it is a 409."""
        with self._cond:
            if key is not None:
                known = self.store.idempotent_job(key)
                if known is not None and known["id"] in self.jobs:
                    if known["request_sha256"] != body_sha256:
                        raise ServeError(409, "this Idempotency-Key was used with a different request", code="idempotency_conflict")
                    return self.public(self.jobs[known["id"]]), False
            (status,) = self.submit_all([(record, plan)], source=source)
            if key is not None:
                self.store.remember_key(key, status["id"], body_sha256 or request_sha256(record))
            return self.public(status), True  # under the lock: the 202 says queued, not what the worker did since

    def ensure_room(self, jobs: int = 1) -> None:
        """429 now when `jobs` more would not fit: a full server refuses before validating a request
        (submit_all decides, under the lock)."""
        with self._cond:
            active = len(self.queue) + len(self.running)
        if active + jobs > self.settings.max_queue:
            wait = self.retry_after_s()
            raise ServeError(
                429, f"the queue is full ({active} jobs accepted, --max-queue {self.settings.max_queue}); retry in about {wait} s",
                code="queue_full", headers={"Retry-After": str(wait)},
            )  # fmt: skip

    def submit_all(self, checked: list[tuple[dict[str, Any], Any]], source: str) -> list[dict[str, Any]]:
        """Queue every checked request or none (429 when they do not all fit); their status records."""
        units = [self._estimate(plan) for _, plan in checked]
        with self._cond:
            self.ensure_room(len(checked))
            statuses = []
            for (record, plan), cost in zip(checked, units):
                job_id = new_job_id()
                status = {
                    "id": job_id, "status": "queued", "created_at": _now(), "queued_at": time.time(), "source": source, "attempts": 0,
                    "prompt": record.get("prompt", ""), "mode": plan.mode, "size": f"{plan.width}x{plan.height}",
                    "num_frames": plan.num_frames, "steps": plan.steps, "seed": plan.seed,
                    "estimated_s": self._seconds(cost),
                }  # fmt: skip
                self.store.create(job_id, record, status)
                self.jobs[job_id], self.units[job_id] = status, cost
                self._finished[job_id] = threading.Event()
                self.queue.append(job_id)
                statuses.append(status)
                logger.info("job %s queued (%s, %s, %d frames, %d steps, ~%s s)", job_id, plan.mode, status["size"],
                            plan.num_frames, plan.steps, status["estimated_s"])  # fmt: skip
            self._cond.notify_all()
        return statuses

    def get(self, job_id: str) -> dict[str, Any]:
        status = self.jobs.get(job_id)
        if status is None:
            raise ServeError(404, f"no job {job_id!r}", param="id", code="not_found")
        return status

    def public(self, status: dict[str, Any]) -> dict[str, Any]:
        """A job as clients see it (the OpenAI Videos object plus our fields)."""
        job_id = status["id"]
        with self._cond:  # the worker adds keys to a running job's record; the queue moves
            out = {"object": "video", **{k: v for k, v in status.items() if k not in ("source", "queued_at")}}
            out["queue_position"] = self.queue.index(job_id) + 1 if out["status"] == "queued" and job_id in self.queue else None
        step, steps = out.get("step", 0), out.get("total_steps") or 0
        out["progress"] = 100 if out["status"] == "completed" else (int(100 * step / steps) if steps else 0)
        if out["status"] in FINAL:
            out["expires_at"] = int(out.get("completed_at", out["created_at"]) + self.settings.ttl_s)
        return out

    def list(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        with self._cond:  # submits add to the dict from other threads
            ordered = sorted(self.jobs.values(), key=lambda s: (s.get("queued_at", s["created_at"]), s["id"]), reverse=True)
        if after is not None:
            ids = [s["id"] for s in ordered]
            if after not in ids:
                raise ServeError(400, f"after: no job {after!r}", param="after")
            ordered = ordered[ids.index(after) + 1 :]
        page = ordered[:limit]
        return {"object": "list", "data": [self.public(s) for s in page], "has_more": len(ordered) > limit}

    def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
        event = self._finished.get(job_id)
        if event is not None:
            event.wait(timeout)
        return self.get(job_id)

    def cancel_or_delete(self, job_id: str, wait_s: float = 30.0) -> dict[str, Any]:
        """Cancel a queued or running job (running: it stops at its next step; waits up to
        `wait_s` for that), or delete a finished one with its video."""
        with self._cond:
            status = self.get(job_id)
            if status["status"] == "queued":
                self.queue.remove(job_id)
                self._finish(status, "cancelled", None)
                self._abort(job_id)
                return self.public(status)
            if status["status"] in FINAL:
                self.store.delete(job_id)
                self.store.forget_keys({job_id})
                del self.jobs[job_id]
                self._finished.pop(job_id, None)
                logger.info("job %s deleted", job_id)
                return {"id": job_id, "object": "video.deleted", "deleted": True}
            self._cancel.add(job_id)
            self._abort(job_id)
        return self.public(self.wait(job_id, wait_s))

    def _abort(self, job_id: str) -> None:
        """Stop a cancelled job where it runs (caller holds the lock). Here the worker sees
        `self._cancel` at its next step; on Ray the request to the generator is cancelled."""

    # -- estimates --------------------------------------------------------------------------------

    def _estimate(self, plan: Any) -> float:
        return cost_units(self.ready_model().pipeline, plan)

    def _estimate_stored(self, job_id: str) -> float:
        try:
            record = self.store.request(job_id) or {}
            return self._estimate(self.check(record)[1])
        except (ServeError, StorageError):
            return 1.0

    def _seconds(self, units: float) -> float | None:
        return round(units * self.seconds_per_unit, 1) if self.seconds_per_unit else None

    def _remaining_units(self, job_id: str) -> float:
        """Units a running job has left (caller holds the lock)."""
        status = self.jobs[job_id]
        return self.units.get(job_id, 1.0) * (1 - status.get("step", 0) / (status.get("total_steps") or 1))

    def parallelism(self) -> int:
        """Jobs that run at once: one here (on Ray, the generator replicas busy now)."""
        return 1

    def backlog_s(self) -> float:
        """Estimated seconds until every accepted job is done."""
        with self._cond:
            units = sum(self.units.get(job_id, 1.0) for job_id in self.queue) + sum(map(self._remaining_units, self.running))
        return units * (self.seconds_per_unit or 1.0) / self.parallelism()

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the rest of the running job that ends first."""
        with self._cond:
            if self.running:
                units = min(map(self._remaining_units, self.running))
            else:
                units = self.units.get(self.queue[0], 1.0) if self.queue else 0.0
        return max(1, math.ceil(units * (self.seconds_per_unit or 1.0)))

    def fits_sync_budget(self, plans: list[Any]) -> bool:
        if self.seconds_per_unit is None:
            return True  # nothing measured yet (--no-warmup): run it and learn
        own = sum(self._estimate(plan) for plan in plans) * self.seconds_per_unit
        return self.backlog_s() + own <= self.settings.sync_budget_s

    # -- the worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self.queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                job_id = self.queue.popleft()
                self.running.add(job_id)
                status = self.jobs[job_id]
                status.update(status="in_progress", started_at=_now(), attempts=status.get("attempts", 0) + 1, step=0,
                              queued_s=round(time.time() - status.get("queued_at", time.time()), 3))  # fmt: skip
            try:
                self._persist(status)
                self._run(job_id, status)
            except Exception:  # a bug of ours: the job fails, the server keeps serving
                logger.exception("job %s: unexpected error", job_id)
                with self._cond:
                    if status["status"] not in FINAL:
                        self._finish(status, "failed", ("internal_error", "internal error; see the server log"))
            finally:
                with self._cond:
                    self.running.discard(job_id)
                    self._cancel.discard(job_id)

    def _run(self, job_id: str, status: dict[str, Any]) -> None:
        model = self.model
        assert model is not None
        began = time.monotonic()
        deadline, last_persist = began + self.settings.job_timeout_s, began

        def on_step(done: int, total: int) -> None:
            nonlocal last_persist
            with self._cond:  # readers copy the record under the lock
                status.update(step=done, total_steps=total)
            if job_id in self._cancel:
                raise JobStopped("cancelled", "cancelled", f"cancelled at step {done}/{total}")
            if self._stop.is_set():
                raise JobStopped("queued", "shutdown", f"the server stopped at step {done}/{total}")
            now = time.monotonic()
            if now > deadline:
                raise JobStopped("failed", "timeout", f"timed out after {self.settings.job_timeout_s:g} s at step {done}/{total}")
            if now - last_persist >= PERSIST_EVERY_S:
                last_persist = now
                self._persist(status)

        try:
            result = generate_job(model, self.store, job_id, on_step)
        except (JobStopped, ValueError, StorageError) as exc:  # anything else: _work's internal error
            outcome, code, message = job_outcome(job_id, exc)
            with self._cond:
                if outcome == "queued":  # a clean shutdown: the next server runs it, as a fresh attempt
                    status.update(status="queued", step=0, attempts=status["attempts"] - 1)
                    self._persist(status)
                else:
                    self._finish(status, outcome, (code, message))
            return
        with self._cond:
            self._completed(status, result)

    def _completed(self, status: dict[str, Any], result: dict[str, Any]) -> None:
        """A job's video and result are in the store: learn its speed, report it done (caller holds the lock)."""
        units = self.units.get(status["id"])
        if units:
            measured = result["timings"]["generate_s"] / units
            spu = self.seconds_per_unit
            self.seconds_per_unit = measured if spu is None else (1 - EWMA) * spu + EWMA * measured
        status.update(model_version=result["model_version"], warnings=result["warnings"], timings=result["timings"])
        self._finish(status, "completed", None)

    def _finish(self, status: dict[str, Any], outcome: str, error: tuple[str, str] | None) -> None:
        """Record a final state (caller holds the lock) and wake whoever waits on it."""
        status.update(status=outcome, completed_at=_now(), error={"code": error[0], "message": error[1]} if error else None)
        self._persist(status)
        self.units.pop(status["id"], None)
        event = self._finished.get(status["id"])
        if event is not None:
            event.set()
        took = status["completed_at"] - status.get("started_at", status["created_at"])
        logger.info("job %s %s after %d s%s", status["id"], outcome, took, f": {error[1]}" if error else "")

    def _persist(self, status: dict[str, Any]) -> None:
        try:
            self.store.write_status(status)
        except StorageError as exc:  # memory stays right; the store catches up at the next write
            logger.warning("job %s: could not write its status: %s", status["id"], one_line(exc))

    # -- restart, expiry and alias moves ------------------------------------------------------------

    def _recover(self) -> None:
        """Read every job of the store: re-queue queued ones, restart an interrupted one once."""
        requeued = []
        for job_id in self.store.job_ids():
            status = self.store.status(job_id)
            if status is None:  # request written, status not: the client never got a 202
                self.store.delete(job_id)
                continue
            if status["status"] == "in_progress":
                if status.get("attempts", 1) >= MAX_ATTEMPTS:
                    status.update(status="failed", completed_at=_now(), error={
                        "code": "interrupted", "message": f"the server stopped during this job {status['attempts']} times"})  # fmt: skip
                else:
                    status.update(status="queued", step=0, restarted=True)
                self._persist(status)
            self.jobs[job_id] = status
            if status["status"] == "queued":
                requeued.append(status)
                self._finished[job_id] = threading.Event()
        self.queue.extend(s["id"] for s in sorted(requeued, key=lambda s: (s.get("queued_at", s["created_at"]), s["id"])))
        if self.jobs:
            logger.info("store %s: %d jobs, %d re-queued", self.store.uri, len(self.jobs), len(requeued))

    def _housekeeping(self) -> None:
        """Sweep expired jobs; reload the model when its alias moved (between jobs)."""
        period = min(self.settings.ttl_s / 4, self.settings.reload_every_s or 300.0, 300.0)
        next_sweep = 0.0
        while not self._stop.wait(period if next_sweep else 0.0):
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep()
                next_sweep = now + min(self.settings.ttl_s / 4, 300.0)
            if self.settings.reload_every_s and self.model is not None:
                self._maybe_reload()

    def _sweep(self) -> None:
        cutoff = time.time() - self.settings.ttl_s
        with self._cond:
            expired = {job_id for job_id, s in self.jobs.items() if s["status"] in FINAL and s.get("completed_at", 0) < cutoff}
        for job_id in sorted(expired):
            try:
                self.store.delete(job_id)
            except StorageError as exc:
                logger.warning("could not delete expired job %s: %s", job_id, one_line(exc))
                continue
            with self._cond:
                self.jobs.pop(job_id, None)
                self._finished.pop(job_id, None)
        if expired:
            self.store.forget_keys(expired)
            logger.info("deleted %d expired jobs", len(expired))

    def _maybe_reload(self) -> None:
        model = reload_if_moved(self.settings.model, self.model, self._load) if self.model is not None else None
        if model is not None:
            with self._cond:  # the worker picks the model up at its next job
                self.model = model
