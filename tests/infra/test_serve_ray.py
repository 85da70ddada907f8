"""`reelforge serve --ray` (serve.run of infra/serve/on_ray.py) as a real process on a local Ray
instance of its own: the ingress checks requests without weights, a generator replica generates,
cancels within a step and follows a promoted alias; the same seed gives the bytes MLflow's pyfunc
gives. Everything embedded serving asserts about the app itself is in test_serve.py (same app)."""

from __future__ import annotations

import base64
import signal
import time

import pandas as pd
import psutil
import pytest

from tests.infra.test_serve import LONG, FoxRegistry, Server, frames_of
from tests.model.test_pyfunc import FRAMES, HEIGHT, WIDTH


class RayServer(Server):
    """The server and the local Ray it starts (raylet, GCS, replicas): all stopped, whatever happens."""

    ready_within_s = 300  # Ray, Serve's controller and proxy, then both deployments: slow on a busy machine

    def stop(self, sig: int = signal.SIGTERM) -> None:
        try:
            spawned = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            spawned = []
        super().stop(sig)  # SIGTERM: the command deletes its Serve app and shuts its Ray down
        for process in spawned:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(spawned, timeout=30)


@pytest.fixture
def fox(tmp_path):
    registry = FoxRegistry(tmp_path)
    yield registry
    registry.close()


@pytest.mark.slow
def test_on_ray_checks_generates_cancels_and_follows_a_promote(fox, tmp_path):
    import mlflow.pyfunc

    env = fox.env | {"RAY_ADDRESS": "local"}
    served = RayServer(["--ray", "--model", "models:/fox@champion", "--store", str(tmp_path / "store"), "--reload-every", "0.5",
                        "--max-queue", "4", "--cpus-per-replica", "1"], tmp_path / "log", env=env)  # fmt: skip
    try:
        assert served.get("/version").json()["model_version"] == "1"
        # sync: the same request and seed give the pyfunc's bytes
        row = {"prompt": "a fox in snow", "num_frames": 2, "steps": 2, "seed": 9}
        ours = served.post("/invocations", json={"dataframe_records": [row]})
        assert ours.status_code == 200, ours.text
        (prediction,) = ours.json()["predictions"]
        theirs = mlflow.pyfunc.load_model("models:/fox/1").predict(pd.DataFrame([row]))
        assert prediction["video_mp4_base64"] == theirs["video_mp4_base64"][0]
        assert frames_of(base64.b64decode(prediction["video_mp4_base64"])).shape == (2, HEIGHT, WIDTH, 3)

        # the ingress refuses without a generator (it has no weights), naming the field
        refused = served.post("/v1/videos", json={"prompt": "a fox", "num_frames": 99})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "num_frames", refused.text

        # a queued job cancelled never starts; a running one stops within a step, and the replica
        # is free for the next job
        running = served.post("/v1/videos", json=LONG).json()["id"]
        waiting = served.post("/v1/videos", json={**LONG, "seed": 2}).json()["id"]
        served.wait_for(running, until=("in_progress",), step=1)
        assert served.delete(f"/v1/videos/{waiting}").json()["status"] == "cancelled"
        cancelled = served.delete(f"/v1/videos/{running}").json()
        assert cancelled["status"] == "cancelled" and cancelled["error"]["message"].startswith("cancelled at step "), cancelled
        assert cancelled["step"] < LONG["steps"]
        after = served.post("/v1/videos", json={"prompt": "next", "steps": 2, "seed": 3}).json()["id"]
        done = served.wait_for(after)
        assert done["status"] == "completed" and done["model_version"] == "1", done
        assert frames_of(served.get(f"/v1/videos/{after}/content").content).shape == (FRAMES, HEIGHT, WIDTH, 3)
        assert served.get(f"/v1/videos/{waiting}").json().get("started_at") is None  # it never ran

        # promote: the replica loads version 2 without a redeploy; jobs say which version ran
        fox.promote_changed()
        deadline = time.monotonic() + 90
        while True:
            job = served.post("/v1/videos", json={"prompt": "a fox", "steps": 2, "seed": 9}).json()
            if served.wait_for(job["id"])["model_version"] == "2":
                break
            assert time.monotonic() < deadline, "the generator never loaded version 2"
            time.sleep(0.5)
        assert served.get("/version").json()["model_version"] == "2"
    finally:
        served.stop()
    log = served.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "deleting the reelforge application" in log


def test_a_serve_config_builds_the_deployments_the_flags_say(tmp_path):
    """`serve run infra.serve.cli:app_builder k=v ...` (and a RayService's import_path): the flags,
    checked as the command checks them, reach Serve's deployment options. (Serve keeps some of
    them on private attributes; the end-to-end test above runs what they build.)"""
    from infra.serve.cli import app_builder

    app = app_builder({"model": "models:/fox@champion", "store": str(tmp_path), "replicas": "1:3", "max_queue": 5,
                       "gpus_per_replica": 1, "no_warmup": True})  # fmt: skip
    ingress = app._bound_deployment
    settings, max_body_bytes, generator_app = ingress.init_args
    generator = generator_app._bound_deployment
    assert (ingress.name, ingress.ray_actor_options, settings["warmup"], max_body_bytes) == ("ingress", {"num_cpus": 0}, False, 64 << 20)
    assert (generator.name, generator.max_ongoing_requests, generator.user_config) == ("generator", 1, {"model": "models:/fox@champion"})
    assert generator.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0}
    config = generator._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas, config.max_queued_requests) == (1, 3, 5)
    with pytest.raises(ValueError, match="--replicas 3:1 must be MIN"):
        app_builder({"model": "models:/fox@champion", "replicas": "3:1"})
