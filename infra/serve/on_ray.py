"""`reelforge serve --ray`: the same HTTP surface on Ray Serve, as two deployments.

    ingress    (1 replica, no CPU reserved)  the FastAPI app of infra/serve/app.py over a RayEngine:
               checks every request against the model's geometry (config only, no weights: a
               bad request never reaches a GPU), keeps the queue, the store and its lease, answers
               429 when --max-queue jobs are accepted and unfinished, and follows each job
    generator  (--replicas MIN[:MAX], autoscaled on queued jobs; --gpus-per-replica)  one loaded
               model per replica, max_ongoing_requests=1: one generation at a time per device;
               streams progress back (started, every step, completed or stopped) and writes the
               video and result into the store itself, so no video crosses the ingress

    serve.run(build_app(ServeSettings(model="models:/NAME@champion", store="s3://bucket/jobs")))
    serve run infra.serve.cli:app_builder model=models:/NAME@champion store=s3://bucket/jobs
    reelforge serve --ray --model models:/NAME@champion --store s3://bucket/jobs --replicas 1:4

Every accepted job is sent to the generator deployment at once: Serve holds it until a replica is
free, and its autoscaler sees those waiting requests (target: one ongoing request per replica).
Cancelling cancels the Serve request: a queued job never starts, a running one stops at its next
denoising step (the replica waits for that before it takes another job). A replica that dies
mid-job has the job run again once, as a restarted embedded server would.

Model versions: each replica re-resolves an alias every --reload-every seconds and loads a moved
alias between jobs; `user_config={"model": ...}` (a `serve deploy` with a new model, no restart)
switches every replica through `reconfigure`. Each job records the version it ran.

On a cluster the store must be reachable from every replica (object storage, or a folder every node
mounts): generators write videos there, the ingress serves them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any

from model.errors import one_line
from infra.serve.engine import FINAL, MAX_ATTEMPTS, PERSIST_EVERY_S, Engine
from infra.serve.job import JobStopped, generate_job, job_outcome
from infra.serve.model_ref import LoadedModel, load_model, reload_if_moved, resolve_model
from infra.serve.settings import RaySettings, ServeSettings
from infra.serve.store import JobStore

logger = logging.getLogger(__name__)

APP_NAME = "reelforge"
STEP_EVENT_EVERY_S = 0.2  # progress events per job at most this often (a step can take milliseconds)


def _replica_logging() -> None:
    """Our INFO lines in a replica's log: `reelforge serve --ray` set Ray's worker hook for that
    (infra/cluster.py); under `serve run` / a RayService nothing did."""
    if not logging.getLogger().handlers:
        from infra.logs import setup_logging

        setup_logging()


# -- the generator replica --------------------------------------------------------------------------


class Generator:
    """One loaded model; `run(job_id)` streams the job's events. Serve gives it one request at a time."""

    def __init__(self, settings: dict[str, Any]) -> None:
        _replica_logging()
        self.settings = ServeSettings(**settings)
        self.store = JobStore(self.settings.store)
        self._swap = threading.Lock()
        self.model, self.seconds_per_unit = load_model(self.settings, measure=self.settings.warmup)
        self._log_loaded()
        # generate() runs here, off the replica's event loop, one job at a time
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._closed = threading.Event()
        if self.settings.reload_every_s:
            threading.Thread(target=self._follow_alias, name="reload", daemon=True).start()

    def _log_loaded(self) -> None:
        logger.info("generator: %s (version %s, bundle %s) on %s", self.model.uri, self.model.version or "-",
                    self.model.bundle_sha256[:12], self.model.pipeline.device)  # fmt: skip

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config: {"model": REF} switches this replica to another model, between jobs."""
        ref = (config or {}).get("model")
        if ref and ref != self.model.uri:
            self._load(dataclasses.replace(self.settings, model=ref))

    def _load(self, settings: ServeSettings) -> LoadedModel:
        model, _ = load_model(settings, measure=False)
        with self._swap:  # a running job keeps the model it started with
            self.settings, self.model = settings, model
        self._log_loaded()
        return model

    def _follow_alias(self) -> None:
        while not self._closed.wait(self.settings.reload_every_s):
            reload_if_moved(self.settings.model, self.model, lambda: self._load(self.settings))

    async def run(self, job_id: str):  # an async generator: Serve streams what it yields
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        with self._swap:
            model = self.model
        timeout = self.settings.job_timeout_s
        began, last_event = time.monotonic(), 0.0

        def put(event: dict[str, Any] | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def on_step(done: int, total: int) -> None:
            nonlocal last_event
            now = time.monotonic()
            if stop.is_set():
                raise JobStopped("cancelled", "cancelled", f"cancelled at step {done}/{total}")
            if now - began > timeout:
                raise JobStopped("failed", "timeout", f"timed out after {timeout:g} s at step {done}/{total}")
            if done == total or now - last_event >= STEP_EVENT_EVERY_S:
                last_event = now
                put({"event": "step", "step": done, "total": total})

        def work() -> None:
            try:
                put({"event": "completed", "result": generate_job(model, self.store, job_id, on_step)})
            except Exception as exc:
                status, code, message = job_outcome(job_id, exc)
                put({"event": "stopped", "status": status, "code": code, "message": message})
            finally:
                put(None)

        yield {"event": "started", "model_version": model.version, "seconds_per_unit": self.seconds_per_unit}
        running = loop.run_in_executor(self._executor, work)
        try:
            while (event := await events.get()) is not None:
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            # The request was cancelled: the model stops at its next step; take no other job before.
            stop.set()
            await asyncio.shield(running)
            raise
        await running

    def __del__(self) -> None:
        closed = getattr(self, "_closed", None)
        if closed is not None:
            closed.set()


# -- the ingress ------------------------------------------------------------------------------------


class RayEngine(Engine):
    """The embedded engine's queue, store and checks, with generation on the generator deployment:
    the model here is the bundle's geometry (model/bundle.load_bundle_geometry), no weights."""

    def __init__(self, settings: ServeSettings, generator: Any) -> None:
        super().__init__(settings)
        self.generator = generator  # a DeploymentHandle to Generator
        self._responses: dict[str, Any] = {}  # job id -> its streaming response (None while being sent)
        self._persisted: dict[str, float] = {}

    def _load(self) -> LoadedModel:
        from model.bundle import load_bundle_geometry
        from model.pipeline import VideoPipeline

        bundle, version, sha256 = resolve_model(self.settings.model)
        loaded = LoadedModel(VideoPipeline(load_bundle_geometry(bundle)), self.settings.model, version, sha256)
        logger.info("ingress: checking requests against %s (version %s, bundle %s)", loaded.uri, version or "-", sha256[:12])
        return loaded

    def parallelism(self) -> int:
        return max(1, len(self.running))

    def _work(self) -> None:
        """Send every queued job that is not sent yet to the generator deployment, as it arrives."""
        while not self._stop.is_set():
            with self._cond:
                unsent = [job_id for job_id in self.queue if job_id not in self._responses]
                if not unsent:
                    self._cond.wait(0.5)
                    continue
                for job_id in unsent:
                    self._responses[job_id] = None
            for job_id in unsent:
                threading.Thread(target=self._follow, args=(job_id,), name=f"job-{job_id[-6:]}", daemon=True).start()

    def _follow(self, job_id: str) -> None:
        from ray.exceptions import RayActorError, TaskCancelledError
        from ray.serve.exceptions import BackPressureError

        try:
            response = self.generator.options(stream=True).run.remote(job_id)
            with self._cond:
                if self._stop.is_set() or self.jobs.get(job_id, {}).get("status") in FINAL:
                    response.cancel()  # cancelled (or the server stopped) while it was being sent
                    return
                self._responses[job_id] = response
            for event in response:
                self._on_event(job_id, event)
        except (TaskCancelledError, asyncio.CancelledError, concurrent.futures.CancelledError):
            with self._cond:
                self._ended(job_id, "cancelled", ("cancelled", "cancelled at step {step}/{total}"))
        except BackPressureError as exc:  # Serve's own bound (max_queued_requests) caught it first
            with self._cond:
                self._ended(job_id, "failed", ("queue_full", one_line(exc)))
        except RayActorError as exc:  # the replica died under the job
            logger.warning("job %s: its generator replica died: %s", job_id, one_line(exc))
            with self._cond:
                self._retry(job_id)
        except Exception:
            logger.exception("job %s: unexpected error", job_id)
            with self._cond:
                self._ended(job_id, "failed", ("internal_error", "internal error; see the server log"))
        finally:
            with self._cond:
                self.running.discard(job_id)
                self._cancel.discard(job_id)
                self._responses.pop(job_id, None)
                self._persisted.pop(job_id, None)
                self._cond.notify_all()

    def _on_event(self, job_id: str, event: dict[str, Any]) -> None:
        with self._cond:
            status = self.jobs.get(job_id)
            if status is None or status["status"] in FINAL or self._stop.is_set():
                return
            kind = event["event"]
            if kind == "started":
                if job_id in self.queue:
                    self.queue.remove(job_id)
                self.running.add(job_id)
                status.update(status="in_progress", started_at=int(time.time()), attempts=status.get("attempts", 0) + 1, step=0,
                              queued_s=round(time.time() - status.get("queued_at", time.time()), 3))  # fmt: skip
                if self.seconds_per_unit is None and event.get("seconds_per_unit"):
                    self.seconds_per_unit = event["seconds_per_unit"]  # the replica's warm-up
                self._persist(status)
            elif kind == "step":
                status.update(step=event["step"], total_steps=event["total"])
                now = time.monotonic()
                if now - self._persisted.get(job_id, 0.0) >= PERSIST_EVERY_S:
                    self._persisted[job_id] = now
                    self._persist(status)
            elif kind == "completed":
                self._completed(status, event["result"])
            elif kind == "stopped":
                self._finish(status, event["status"], (event["code"], event["message"]))

    def _ended(self, job_id: str, outcome: str, error: tuple[str, str]) -> None:
        """A job's request ended without a final event (caller holds the lock)."""
        status = self.jobs.get(job_id)
        if status is None or status["status"] in FINAL or self._stop.is_set():
            return
        if job_id in self.queue:
            self.queue.remove(job_id)
        message = error[1].format(step=status.get("step", 0), total=status.get("total_steps") or status.get("steps"))
        self._finish(status, outcome, (error[0], message))

    def _retry(self, job_id: str) -> None:
        """Run a job whose replica died once more, first in line; fail it the second time (caller holds the lock)."""
        status = self.jobs.get(job_id)
        if status is None or status["status"] in FINAL or self._stop.is_set():
            return
        attempts = status.get("attempts", 0) + (status["status"] == "queued")
        if attempts >= MAX_ATTEMPTS:
            self._ended(job_id, "failed", ("interrupted", f"the generator replica died during this job {attempts} times"))
            return
        status.update(status="queued", step=0, attempts=attempts, restarted=True)
        if job_id not in self.queue:
            self.queue.appendleft(job_id)
        self._persist(status)

    def _abort(self, job_id: str) -> None:
        response = self._responses.get(job_id)
        if response is not None:
            response.cancel()

    def stop(self) -> None:
        """Running jobs go back to queued in the store (the next ingress re-sends them); Serve's
        requests are cancelled so the generators are free for it."""
        with self._cond:
            self._stop.set()
            for job_id in list(self.running):
                status = self.jobs[job_id]
                status.update(status="queued", step=0, attempts=max(0, status.get("attempts", 1) - 1))
                self._persist(status)
            for response in self._responses.values():
                if response is not None:
                    response.cancel()
        super().stop()


class Ingress:
    """The HTTP app (infra/serve/app.py) over a RayEngine; wrapped with serve.ingress in build_app."""

    def __init__(self, settings: dict[str, Any], max_body_bytes: int, generator: Any) -> None:
        _replica_logging()
        self.engine = RayEngine(ServeSettings(**settings), generator)
        self.engine.start()
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self) -> Any:
        from infra.serve.app import create_app

        return create_app(self.engine, max_body_bytes=self.max_body_bytes)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


# -- the application --------------------------------------------------------------------------------


def cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(settings: ServeSettings, ray_settings: RaySettings = RaySettings()) -> Any:
    """The Serve application: ingress -> generator. Call where Ray is initialised (the GPU default reads the cluster)."""
    from ray import serve

    gpus = ray_settings.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_has_gpus() else 0.0
    scaling: dict[str, Any]
    if ray_settings.min_replicas == ray_settings.max_replicas:
        scaling = {"num_replicas": ray_settings.min_replicas}
    else:  # a replica per waiting or running job, up to MAX; idle ones go after a minute
        scaling = {"autoscaling_config": {
            "min_replicas": ray_settings.min_replicas, "max_replicas": ray_settings.max_replicas,
            "target_ongoing_requests": 1, "upscale_delay_s": 5, "downscale_delay_s": 60,
        }}  # fmt: skip
    generator = serve.deployment(
        Generator, name="generator", max_ongoing_requests=1, max_queued_requests=settings.max_queue,
        ray_actor_options={"num_cpus": ray_settings.cpus_per_replica, "num_gpus": gpus},
        user_config={"model": settings.model}, graceful_shutdown_timeout_s=60, **scaling,
    )  # fmt: skip
    # One ingress: it holds the store's lease and counts the queue. It waits on jobs in threads,
    # so it takes many requests at once, and reserves no CPU (it checks and forwards).
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="ingress", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
    )  # fmt: skip
    fields = dataclasses.asdict(settings)
    return ingress.bind(fields, ray_settings.max_body_bytes, generator.bind(fields))
