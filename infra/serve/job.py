"""One job, generated: what the embedded engine's worker thread (infra/serve/engine.py) and a
generator replica on Ray Serve (infra/serve/on_ray.py) both run."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from model.errors import one_line
from model.pyfunc import build_request
from pipelines.output import StorageError
from infra.serve.model_ref import LoadedModel
from infra.serve.store import JobStore

logger = logging.getLogger(__name__)


class JobStopped(Exception):
    """Raised from the step hook: the job is cancelled or ran out of time."""

    def __init__(self, status: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def generate_job(model: LoadedModel, store: JobStore, job_id: str, on_step: Any) -> dict[str, Any]:
    """Generate the request stored for `job_id` with `model` and write its video and result to the
    store; the result. `on_step(done, total)` runs after every denoising step and may raise
    JobStopped. What the embedded worker and a generator replica on Ray (infra/serve/on_ray.py) run."""
    from model.mp4 import write_mp4

    began = time.monotonic()
    record = store.request(job_id)
    if record is None:
        raise StorageError(f"{job_id}: request.json is missing from the store")
    with tempfile.TemporaryDirectory(prefix="reelforge-job-") as tmp:
        request, seed, mode = build_request(record, Path(tmp))
        video = model.pipeline.generate(request, on_step=on_step)
    generated_s = time.monotonic() - began
    mp4 = write_mp4(video.frames, video.fps, None)
    frames = video.frames
    result = {
        "id": job_id, "seed": seed, "mode": mode, "prompt": record.get("prompt", ""),
        "model_uri": model.uri, "model_version": model.version, "bundle_sha256": model.bundle_sha256,
        "num_frames": int(frames.shape[0]), "width": int(frames.shape[2]), "height": int(frames.shape[1]),
        "fps": float(video.fps), "warnings": list(video.metadata.get("warnings", [])),
        "timings": {"generate_s": round(generated_s, 3), "total_s": round(time.monotonic() - began, 3)},
    }  # fmt: skip
    store.write_result(job_id, mp4, result)
    return result


def job_outcome(job_id: str, exc: Exception) -> tuple[str, str, str]:
    """(status, error code, message) of a job that `generate_job` ended with `exc`: stopped by its
    hook (cancelled, timed out, or `queued` again at a clean shutdown), refused by a model swapped
    since it was checked, our store failing (not the request's fault), or a bug of ours (logged)."""
    if isinstance(exc, JobStopped):
        return exc.status, exc.code, exc.message
    if isinstance(exc, StorageError):
        logger.error("job %s: storage failed: %s", job_id, one_line(exc))
        return "failed", "storage_error", f"the server's store failed: {one_line(exc)}"
    if isinstance(exc, ValueError):  # checked at submit, so only a model swapped since can refuse it
        return "failed", "invalid_request", one_line(exc)
    logger.error("job %s: unexpected error", job_id, exc_info=exc)
    return "failed", "internal_error", "internal error; see the server log"
