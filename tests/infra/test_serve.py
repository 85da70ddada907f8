"""`reelforge serve` as a real process on loopback: MLflow's surface, async jobs, bounds, restarts.

The model is a tiny random-initialised DiT (pixel autoencoder, offline MiniLM): what it generates is
noise, but every byte of the serving path is the real one. Clients are plain HTTP (requests).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import requests
from PIL import Image

from model.bundle import bundle_sha256
from tests.infra.conftest import stop_group
from tests.model.test_pyfunc import FRAMES, HEIGHT, WIDTH, tiny_bundle

ROOT = Path(__file__).resolve().parents[2]
LONG = {"prompt": "a long job", "steps": 1000, "seed": 1}  # ~6 s on the tiny model: time to cancel or kill it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m infra serve ...` in its own session, on a free port, once /health says ready."""

    ready_within_s = 120

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args, self.log_path, self.env = args, log, env or {}
        self.start()

    @property
    def threads(self) -> list[str]:
        """One torch thread unless a test says otherwise: the tiny model runs fastest so, and a busy
        machine cannot stall it (OpenMP threads spinning on an oversubscribed CPU took 300 of its
        steps from about 1 s to over a minute)."""
        return [] if "--threads" in self.args or "--ray" in self.args else ["--threads", "1"]

    def start(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "infra", "serve", *self.args, *self.threads, "--port", str(self.port)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.env},
        )  # fmt: skip
        deadline = time.monotonic() + self.ready_within_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            time.sleep(0.2)
        self.stop()  # never leave a server behind
        raise AssertionError(f"server not ready in {self.ready_within_s} s: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_group(self.process, sig)
        self.log.close()

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(self.url + path, timeout=60)

    def wait_for(self, job_id: str, until: tuple[str, ...] = ("completed", "failed", "cancelled"), step: int = 0,
                 timeout: float = 60) -> dict:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get(f"/v1/videos/{job_id}").json()
            if status["status"] in until and status.get("step", 0) >= step:
                return status
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {until}: {status}")


def frames_of(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def b64_png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")  # 1-bit: a huge image in a small body
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("serve") / "bundle")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """One server for the request tests: --max-queue 1, so a second accepted job is a 429; a sync
    budget of 1 s, which the tiny requests fit and LONG (about 6 s) does not."""
    root = tmp_path_factory.mktemp("served")
    served = Server(["--model", str(bundle), "--store", str(root / "store"), "--max-queue", "1", "--max-body-mb", "1",
                     "--sync-budget", "1"], root / "log")  # fmt: skip
    yield served
    served.stop()


def test_health_version_and_sync_invocations(server, bundle):
    assert server.get("/ping").status_code == 200 and server.get("/health").json() == {"status": "ready"}
    version = server.get("/version").json()
    assert version["bundle_sha256"] == bundle_sha256(bundle) and version["model_uri"] == str(bundle)
    assert version["trained"] == {"num_frames": FRAMES, "width": WIDTH, "height": HEIGHT, "fps": 8.0}

    split = {"dataframe_split": {"columns": ["prompt", "num_frames", "steps", "seed"], "data": [["a fox", 2, 2, 7]]}}
    first = server.post("/invocations", json=split)
    assert first.status_code == 200, first.text
    (prediction,) = first.json()["predictions"]
    assert (prediction["num_frames"], prediction["seed"], prediction["mode"]) == (2, 7, "text")
    assert frames_of(base64.b64decode(prediction["video_mp4_base64"])).shape == (2, HEIGHT, WIDTH, 3)
    # the same request in MLflow's other formats: same seed, same bytes
    records = server.post("/invocations", json={"dataframe_records": [{"prompt": "a fox", "num_frames": 2, "steps": 2, "seed": 7}]})
    csv = server.post("/invocations", data="prompt,num_frames,steps,seed\na fox,2,2,7\n", headers={"Content-Type": "text/csv"})
    for response in (records, csv):
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["video_mp4_base64"] == prediction["video_mp4_base64"]


def test_async_job_idempotency_listing_and_delete(server):
    body = {"prompt": "a red fox running through snow", "steps": 2, "seed": 11, "size": f"{WIDTH}x{HEIGHT}"}
    created = server.post("/v1/videos", json=body, headers={"Idempotency-Key": "fox-1"})
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] == "queued" and job["queue_position"] == 1 and created.headers["Location"] == f"/v1/videos/{job['id']}"
    again = server.post("/v1/videos", json=body, headers={"Idempotency-Key": "fox-1"})
    assert again.status_code == 202 and again.json()["id"] == job["id"]  # a retried submit: the same job
    other = server.post("/v1/videos", json={**body, "seed": 12}, headers={"Idempotency-Key": "fox-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"

    done = server.wait_for(job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    assert (done["step"], done["total_steps"], done["seed"]) == (2, 2, 11)
    content = server.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert frames_of(content.content).shape == (FRAMES, HEIGHT, WIDTH, 3)
    listed = server.get("/v1/videos?limit=100").json()
    assert job["id"] in [item["id"] for item in listed["data"]] and listed["object"] == "list"

    deleted = server.delete(f"/v1/videos/{job['id']}")
    assert deleted.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert server.get(f"/v1/videos/{job['id']}").status_code == 404
    assert server.get(f"/v1/videos/{job['id']}/content").status_code == 404


def test_malformed_requests_get_one_line_4xx_and_the_server_keeps_serving(server):
    ok = {"prompt": "a fox", "steps": 1}
    cases = [
        # (what, method, path, kwargs, status, text the one-line message holds, param)
        ("missing prompt", "post", "/v1/videos", {"json": {"steps": 1}}, 400, "missing field 'prompt'", "prompt"),
        ("prompt not a string", "post", "/v1/videos", {"json": {"prompt": 5}}, 400, "prompt", None),
        ("steps a string", "post", "/v1/videos", {"json": {**ok, "steps": "ten"}}, 400, "steps: expected a number", "steps"),
        ("frames fractional", "post", "/v1/videos", {"json": {**ok, "num_frames": 2.5}}, 400, "num_frames: expected a whole number", "num_frames"),
        ("unknown field", "post", "/v1/videos", {"json": {**ok, "colour": "red"}}, 400, "unknown field 'colour'", "colour"),
        ("unknown mode", "post", "/v1/videos", {"json": {**ok, "mode": "dream"}}, 400, "unknown mode 'dream'", "mode"),
        ("mode without its media", "post", "/v1/videos", {"json": {**ok, "mode": "image"}}, 400, "needs image", "mode"),
        ("bad base64", "post", "/v1/videos", {"json": {**ok, "mode": "image", "image": "not base64!"}}, 400, "not valid base64", "image"),
        ("image that is not an image", "post", "/v1/videos",
         {"json": {**ok, "mode": "image", "image": base64.b64encode(b"plain text").decode()}}, 400, "image", "image"),
        ("oversized image", "post", "/v1/videos", {"json": {**ok, "mode": "image", "image": b64_png(9000, 9000)}}, 400, "image", "image"),
        ("width over the limit", "post", "/v1/videos", {"json": {**ok, "width": 100000}}, 400, "width 100000", "width"),
        ("size not WxH", "post", "/v1/videos", {"json": {**ok, "size": "big"}}, 400, "size must be 'WIDTHxHEIGHT'", "size"),
        ("frames over the trained length", "post", "/v1/videos", {"json": {**ok, "num_frames": 999}}, 400, "num_frames 999", "num_frames"),
        ("seconds over the budget", "post", "/v1/videos", {"json": {**ok, "seconds": 3600}}, 400, "seconds", "seconds"),
        ("steps over the bound", "post", "/v1/videos", {"json": {**ok, "steps": 5000}}, 400, "steps 5000", "steps"),
        ("negative guidance", "post", "/v1/videos", {"json": {**ok, "guidance": -1}}, 400, "guidance -1", "guidance"),
        ("garbage JSON", "post", "/v1/videos", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON", None),
        ("a JSON list", "post", "/v1/videos", {"json": [ok]}, 400, "must be a JSON object", None),
        ("wrong content type", "post", "/v1/videos", {"data": b"prompt=x", "headers": {"Content-Type": "text/plain"}}, 415, "application/json", None),
        ("body too large", "post", "/v1/videos", {"json": {**ok, "prompt": "x" * (2 << 20)}}, 413, "exceeds the limit", None),
        ("unknown job id", "get", "/v1/videos/video_000000000000000000000000", {}, 404, "no job", "id"),
        ("malformed job id", "get", "/v1/videos/..%2Fstore", {}, 404, None, None),
        ("bad list limit", "get", "/v1/videos?limit=0", {}, 400, "limit must be", "limit"),
        ("unknown endpoint", "get", "/v2/nothing", {}, 404, "no such endpoint", None),
        ("invocations garbage", "post", "/invocations", {"data": b"\x00\x01", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON", None),
        ("invocations no format key", "post", "/invocations", {"json": {"rows": []}}, 400, "exactly one of", None),
        ("invocations wrong content type", "post", "/invocations", {"data": b"x", "headers": {"Content-Type": "image/png"}}, 415, "content type", None),
        ("invocations rows over the queue", "post", "/invocations", {"json": {"dataframe_records": [ok, ok]}}, 400,
         "2 rows exceed --max-queue 1", None),
        ("invocations bad cell", "post", "/invocations", {"json": {"dataframe_records": [{"prompt": "x", "num_frames": 2.5}]}}, 400,
         "row 0: num_frames: expected a whole number", None),
    ]  # fmt: skip
    assert len(cases) >= 20
    for what, method, path, kwargs, status, text, param in cases:
        response = getattr(requests, method)(server.url + path, timeout=60, **kwargs)
        assert response.status_code == status, (what, response.status_code, response.text[:300])
        body = response.json()
        error = body if path == "/invocations" else body["error"]
        message = error["message"]
        assert "\n" not in message and "Traceback" not in response.text and "File \"" not in response.text, (what, response.text)
        if text is not None:
            assert text in message, (what, message)
        if path == "/invocations":
            assert body["error_code"] == ("INVALID_PARAMETER_VALUE" if status == 400 else "BAD_REQUEST"), (what, body)
        elif param is not None:
            assert error["param"] == param, (what, error)
    # content before completion is a 409; and the server still serves
    job = server.post("/v1/videos", json={**ok, "steps": 50}).json()
    early = server.get(f"/v1/videos/{job['id']}/content")
    assert early.status_code == 409 and "not completed" in early.json()["error"]["message"]
    server.wait_for(job["id"])
    assert server.get("/health").status_code == 200
    assert server.wait_for(server.post("/v1/videos", json=ok).json()["id"])["status"] == "completed"


def test_over_budget_invocations_become_a_job_a_full_queue_429s_and_a_cancel_stops_within_a_step(server):
    # estimated past --sync-budget: 202 and the job to poll instead of a request that times out
    accepted = server.post("/invocations", json={"dataframe_records": [LONG]})
    assert accepted.status_code == 202, accepted.text
    (running,) = accepted.json()["data"]
    assert accepted.headers["Location"] == f"/v1/videos/{running['id']}" and running["estimated_s"] > 1
    server.wait_for(running["id"], until=("in_progress",), step=5)
    full = server.post("/v1/videos", json={"prompt": "second", "steps": 1})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["Retry-After"]) >= 1

    cancelled = server.delete(f"/v1/videos/{running['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    assert 5 <= cancelled["step"] < LONG["steps"]
    time.sleep(0.5)
    assert server.get(f"/v1/videos/{running['id']}").json()["step"] == cancelled["step"]  # nothing ran after the cancel
    assert server.post("/v1/videos", json={"prompt": "now there is room", "steps": 1}).status_code == 202


def test_a_killed_server_loses_no_queued_job(bundle, tmp_path, capsys):
    store = tmp_path / "store"
    served = Server(["--model", str(bundle), "--store", str(store), "--max-queue", "4", "--no-warmup"], tmp_path / "log")
    try:
        interrupted = served.post("/v1/videos", json={**LONG, "steps": 300}).json()["id"]
        queued = served.post("/v1/videos", json={"prompt": "waiting", "steps": 2, "seed": 4}).json()["id"]
        served.wait_for(interrupted, until=("in_progress",), step=1)
        served.stop(signal.SIGKILL)
        held = {p.name for p in (store / "jobs").iterdir()}
        assert held == {interrupted, queued}

        served.start()  # the same store: the dead server's lease is taken over
        restarted = served.wait_for(interrupted)  # first in, first out: it runs again, from the start
        assert (restarted["status"], restarted["attempts"], restarted["restarted"]) == ("completed", 2, True)
        assert served.wait_for(queued)["status"] == "completed"
        for job_id in (interrupted, queued):
            assert frames_of(served.get(f"/v1/videos/{job_id}/content").content).shape == (FRAMES, HEIGHT, WIDTH, 3)

        # a second server on a store in use is refused in one line, before it loads anything
        assert serve_main(capsys, "--model", str(bundle), "--store", str(store)) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("reelforge serve: error: --store") and "in use by another serve run" in line
    finally:
        served.stop()


class FoxRegistry:
    """A SQLite registry (MLFLOW_TRACKING_URI set while it is open) with model `fox`: version 1, a
    tiny bundle, at @champion; `promote_changed()` registers version 2 (weights doubled) and moves
    @champion to it through the promotion path."""

    def __init__(self, tmp_path: Path) -> None:
        from training.config import RegistrySection
        from training.registry import log_and_register, promote
        from tests.training.test_registry import finished_training_run

        self.tmp_path, self.uri = tmp_path, f"sqlite:///{tmp_path}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = self.uri
        self.first = tiny_bundle(tmp_path / "v1")
        self.run_id = finished_training_run(self.uri, tmp_path, self.first)
        log_and_register(self.first, self.run_id, RegistrySection(model_name="fox"), self.uri)
        promote("fox", "champion", tracking_uri=self.uri, version=1)
        self.env = {"MLFLOW_TRACKING_URI": self.uri, "REELFORGE_CACHE": str(tmp_path / "cache")}

    def promote_changed(self) -> None:
        from safetensors.torch import load_file, save_file

        from training.config import RegistrySection
        from training.registry import log_and_register, promote

        changed = self.tmp_path / "v2"
        shutil.copytree(self.first, changed)
        weights = load_file(str(changed / "weights.safetensors"))
        save_file({k: v * 2 for k, v in weights.items()}, str(changed / "weights.safetensors"))
        log_and_register(changed, self.run_id, RegistrySection(model_name="fox"), self.uri)
        promote("fox", "champion", tracking_uri=self.uri, from_alias="candidate")

    def close(self) -> None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def fox(tmp_path):
    registry = FoxRegistry(tmp_path)
    yield registry
    registry.close()


def test_registry_model_matches_mlflow_scoring_and_reloads_after_a_promote(fox, tmp_path):
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    uri, env = fox.uri, fox.env
    served = Server(["--model", "models:/fox@champion", "--store", str(tmp_path / "store"), "--reload-every", "0.5"],
                    tmp_path / "log", env=env)  # fmt: skip
    try:
        version = served.get("/version").json()
        assert version["model_version"] == "1"
        assert version["bundle_sha256"] == MlflowClient(uri).get_model_version("fox", "1").tags["reelforge.bundle_sha256"]
        request = {"dataframe_records": [{"prompt": "a fox in snow", "num_frames": 2, "steps": 2, "seed": 9}]}
        ours = served.post("/invocations", json=request)
        assert ours.status_code == 200, ours.text
        mlflow_app = TestClient(scoring_server.init(mlflow.pyfunc.load_model("models:/fox/1")))
        theirs = mlflow_app.post("/invocations", json=request)
        assert theirs.status_code == 200, theirs.text[:300]
        # the same request and seed: the same MP4 bytes through reelforge serve and MLflow's scoring app
        assert ours.json()["predictions"] == theirs.json()["predictions"]

        fox.promote_changed()
        deadline = time.monotonic() + 60
        while served.get("/version").json()["model_version"] != "2":
            assert time.monotonic() < deadline, "the server never loaded version 2"
            time.sleep(0.2)
        job = served.post("/v1/videos", json={"prompt": "a fox", "steps": 2, "seed": 9}).json()
        assert served.wait_for(job["id"])["model_version"] == "2"
    finally:
        served.stop()


def serve_main(capsys, *args: str) -> int:
    """`reelforge serve` in this process, for settings it refuses before it serves (so it returns)."""
    from infra.serve import main

    capsys.readouterr()
    return main(list(args))


def test_bad_settings_fail_before_serving(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert serve_main(capsys, "--model", str(bundle), "--max-queue", "0", "--store", str(tmp_path / "a")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "reelforge serve: error: --max-queue must be > 0, got 0"
    assert serve_main(capsys, "--model", str(tmp_path / "nowhere"), "--store", str(tmp_path / "b")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("no such bundle folder")
    assert serve_main(capsys, "--model", "models:/nothing@champion", "--store", str(tmp_path / "c")) == 2
    assert "models:/nothing@champion" in capsys.readouterr().err.strip().splitlines()[-1]
    # --ray's flags too, before Ray starts
    for flags, line in ((["--replicas", "0:2"], "--replicas 0:2 must be MIN[:MAX] with 1 <= MIN <= MAX"),
                        (["--replicas", "two"], "--replicas 'two' must be MIN[:MAX], e.g. 1 or 1:4"),
                        (["--gpus-per-replica", "-1"], "--gpus-per-replica must be >= 0, got -1.0")):  # fmt: skip
        assert serve_main(capsys, "--ray", "--model", str(bundle), "--store", str(tmp_path / "d"), *flags) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"reelforge serve: error: {line}"
    assert serve_main(capsys, "--ray", "--model", "models:/nothing@champion", "--store", str(tmp_path / "d")) == 2
    assert "models:/nothing@champion" in capsys.readouterr().err.strip().splitlines()[-1]
