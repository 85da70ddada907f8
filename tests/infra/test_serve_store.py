"""The serving engine's job store on object storage (a moto S3 server on loopback): jobs, videos and
idempotency keys written to s3://, found again by a new engine, and swept when they expire. In
process (no HTTP): the HTTP surface is tests/infra/test_serve.py's."""

from __future__ import annotations

import dataclasses
import io
import time

import av
import numpy as np

from infra.serve.engine import Engine
from infra.serve.settings import ServeSettings
from tests.model.test_pyfunc import FRAMES, HEIGHT, WIDTH, tiny_bundle
from tests.pipelines.test_faults import S3Server


def ready(engine: Engine) -> Engine:
    deadline = time.monotonic() + 120
    while engine.state != "ready":
        assert engine.state == "loading" and time.monotonic() < deadline, engine.load_error
        time.sleep(0.05)
    return engine


def test_jobs_on_object_storage_survive_a_restart_and_expire(tmp_path, monkeypatch):
    s3 = S3Server(tmp_path / "moto.log")
    try:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        # No expiry while the jobs are written and read back (a sweep runs as an engine starts and
        # every ttl/4 s: with a 1 s TTL a slow machine lost the video between two engines); the
        # 1 s TTL is applied for the sweep at the end.
        settings = ServeSettings(model=str(tiny_bundle(tmp_path / "bundle")), store="s3://bucket/serve", ttl_s=3600,
                                 reload_every_s=0, warmup=False)  # fmt: skip
        engine = Engine(settings)
        engine.start()
        try:
            record, plan = ready(engine).check({"prompt": "a fox", "steps": 2, "seed": 3})
            status, new = engine.submit(record, plan, key="fox", body_sha256="digest")
            assert new and engine.wait(status["id"], 60)["status"] == "completed"
        finally:
            engine.stop()
        job_id = status["id"]
        assert sorted(s3.fs.get_file_info(f"bucket/serve/jobs/{job_id}/{name}").type.name
                      for name in ("request.json", "status.json", "video.mp4", "result.json")) == ["File"] * 4  # fmt: skip

        again = Engine(settings)  # a new server on the same bucket prefix
        again.start()
        try:
            assert again.get(job_id)["status"] == "completed" and again.store.result(job_id)["seed"] == 3
            with av.open(io.BytesIO(again.store.video(job_id))) as container:
                frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
            # the key is remembered across servers: the same submit returns the same job
            assert again.submit(record, plan, key="fox", body_sha256="digest") == (again.public(again.get(job_id)), False)

            again.settings = dataclasses.replace(settings, ttl_s=1)
            time.sleep(max(0.0, again.get(job_id)["completed_at"] + again.settings.ttl_s + 1 - time.time()))
            again._sweep()
            assert job_id not in again.jobs and again.store.job_ids() == []
            assert again.store.idempotent_job("fox") is None
        finally:
            again.stop()
    finally:
        s3.close()
