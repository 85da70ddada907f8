"""training/registry.py, `reelforge register` / `promote` (infra/) and `reelforge generate --model models:/...` against real MLflow:
a SQLite store in tmp_path, and a real `mlflow server` on a free loopback port. The model is a tiny
random-initialised DiT with the pixel autoencoder and the offline MiniLM, saved by `save_bundle`."""

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
import urllib.request
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.bundle import save_bundle
from model.dit import DiT, dit_config
from training.config import MlflowSection, RegistrySection
from model.bundle import bundle_sha256
from training.registry import TAG_BUNDLE_SHA256, find_logged_model, log_and_register
from training.tracking import TAG_CONFIG_HASH, Tracker

pytestmark = pytest.mark.slow
FRAMES, SIZE = 4, 32


def tiny_bundle(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=48, text_dim=384, depth=2, hidden_size=64, num_heads=4, max_text_tokens=16)
    return save_bundle(path, DiT(cfg), cfg, autoencoder="pixel", text_encoder="minilm", fps=8.0,
                       num_frames=FRAMES, width=SIZE, height=SIZE)  # fmt: skip


def decoded_shape(mp4: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(mp4)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return (len(frames), *frames[0].shape[:2])  # (T, H, W)


def finished_training_run(uri: str, out: Path, bundle: Path | None) -> str:
    """A run as training leaves it: metrics, tags, the bundle as run artifact `bundle/`, FINISHED."""
    tracker = Tracker(MlflowSection(tracking_uri=uri), out)
    run_id = tracker.start_or_resume(run_name="tiny", tags={TAG_CONFIG_HASH: "feedfacefeedface"})
    tracker.log_metrics({"loss": 0.5}, step=1)
    if bundle is not None:
        tracker.log_artifacts(bundle, "bundle")
    tracker.end()
    return run_id


def error_lines(stderr: str) -> list[str]:
    # MLflow logs its own INFO lines to stderr; the command's error is the line that says error
    return [line for line in stderr.splitlines() if "error:" in line]


def cli(module, argv: list[str], capsys) -> tuple[int, str, str]:
    rc = module.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("train") / "bundle")


def test_register_promote_serve_and_generate_from_sqlite_store(bundle, tmp_path, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient

    from infra import generate, promote, register

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("REELFORGE_CACHE", str(tmp_path / "cache"))
    run_id = finished_training_run(uri, tmp_path, bundle)
    client = MlflowClient(uri)

    # no logged model yet: `register` logs the run's bundle/ artifact first
    rc, out, err = cli(register, ["--run-id", run_id, "--name", "fox", "--tracking-uri", uri], capsys)
    assert rc == 0, err
    assert "fox version 1 as @candidate" in out
    assert str(client.get_model_version_by_alias("fox", "candidate").version) == "1"
    version = client.get_model_version("fox", "1")
    assert version.run_id == run_id
    assert version.tags[TAG_CONFIG_HASH] == "feedfacefeedface" and version.tags["reelforge.run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"  # logging into the run left its status alone
    logged = find_logged_model(run_id, tracking_uri=uri)

    # registering again is idempotent: same run, same bundle -> version 1 again, nothing uploaded
    client.set_registered_model_alias("fox", "candidate", "1")
    assert cli(register, ["--run-id", run_id, "--name", "fox", "--alias", "reviewed", "--out", str(tmp_path)], capsys)[0] == 0
    assert str(client.get_model_version_by_alias("fox", "reviewed").version) == "1"
    # the training driver's path (a rerun of a finished training): the bundle's hash finds version 1
    assert str(log_and_register(bundle, run_id, RegistrySection(model_name="fox"), uri).version) == "1"
    assert find_logged_model(run_id, tracking_uri=uri) == logged
    assert [str(v.version) for v in client.search_model_versions("name = 'fox'")] == ["1"]
    # other weights from the same run are a new version, and the alias moves to it
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed)
    weights = load_file(str(changed / "weights.safetensors"))
    save_file({k: v + 1 if k.endswith("bias") else v for k, v in weights.items()}, str(changed / "weights.safetensors"))
    assert str(log_and_register(changed, run_id, RegistrySection(model_name="fox"), uri).version) == "2"
    assert str(client.get_model_version_by_alias("fox", "candidate").version) == "2"
    assert client.get_model_version("fox", "2").tags[TAG_BUNDLE_SHA256] == bundle_sha256(changed) != bundle_sha256(bundle)

    rc, out, _ = cli(promote, ["fox", "--from-alias", "candidate", "--alias", "champion", "--tracking-uri", uri], capsys)
    assert (rc, out.strip()) == (0, "fox@champion -> version 2")
    assert cli(promote, ["fox", "--version", "1", "--alias", "champion", "--tracking-uri", uri], capsys)[0] == 0
    assert str(client.get_model_version_by_alias("fox", "champion").version) == "1"
    rc, _, err = cli(promote, ["fox", "--version", "9", "--alias", "champion", "--tracking-uri", uri], capsys)
    assert (rc, error_lines(err)) == (2, ["error: model 'fox' has no version 9"])
    rc, _, err = cli(promote, ["fox", "--from-alias", "nightly", "--alias", "champion", "--tracking-uri", uri], capsys)
    assert (rc, error_lines(err)) == (2, ["error: model 'fox' has no alias 'nightly'"])
    assert str(client.get_model_version_by_alias("fox", "champion").version) == "1"  # failed promotions moved nothing

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/fox@candidate")
    result = model.predict(pd.DataFrame([{"prompt": "a red fox in snow", "num_frames": 2, "steps": 1, "seed": 3}]))
    assert decoded_shape(base64.b64decode(result["video_mp4_base64"][0])) == (2, SIZE, SIZE)

    out_mp4 = tmp_path / "fox.mp4"
    argv = ["--model", "models:/fox@champion", "--prompt", "a red fox in snow", "--frames", "2", "--steps", "1",
            "--out", str(out_mp4)]  # fmt: skip
    rc, _, err = cli(generate, argv, capsys)
    assert rc == 0, err
    assert decoded_shape(out_mp4.read_bytes()) == (2, SIZE, SIZE)
    cached = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert cli(generate, argv, capsys)[0] == 0  # same version again: served from the cache
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == cached
    rc, _, err = cli(generate, [*argv[:1], "models:/fox@nope", *argv[2:]], capsys)
    assert rc == 2 and len(error_lines(err)) == 1 and "models:/fox@nope" in error_lines(err)[0]


def test_register_without_model_or_bundle_fails_in_one_line(tracking_uri, tmp_path, capsys):
    from infra import register

    uri = tracking_uri  # the training tests' shared store (conftest): a new schema costs seconds
    run_id = finished_training_run(uri, tmp_path, bundle=None)
    rc, _, err = cli(register, ["--run-id", run_id, "--name", "fox", "--tracking-uri", uri], capsys)
    assert rc == 2 and len(error_lines(err)) == 1
    assert f"run {run_id} has no logged model and no bundle/ artifact; pass --bundle DIR" in error_lines(err)[0]
    rc, _, err = cli(register, ["--run-id", run_id, "--alias", "Not An Alias", "--tracking-uri", uri], capsys)
    assert rc == 2 and "alias" in err and "'Not An Alias'" in err
    with pytest.raises(SystemExit, match="no mlflow.db there"):
        register.main(["--run-id", run_id, "--out", str(tmp_path / "nowhere")])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow_server(tmp_path: Path, log) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, once it answers /health. The port is free when
    chosen but may be taken before the server binds it (tests and other jobs run side by side):
    a server that exits while starting is started again on another port."""
    for _ in range(3):
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # no background job runner (huey workers): nothing here uses it, and it costs CPU and processes
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200 and server.poll() is None:
                        return server, url
            except OSError:
                pass
            time.sleep(0.5)
        _stop(server)
    raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")


def _stop(server: subprocess.Popen) -> None:
    # the CLI runs uvicorn as a child process: stop the whole session, not just the CLI
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking + registry + artifact server on loopback, as deployed (SQLite here)."""
    with open(tmp_path / "server.log", "wb") as log:
        server, url = _start_mlflow_server(tmp_path, log)
        try:
            yield url
        finally:
            _stop(server)


def test_train_log_register_and_serve_through_mlflow_server(mlflow_server, bundle, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = MlflowSection(tracking_uri=mlflow_server)
    tracker = Tracker(cfg, tmp_path)
    run_id = tracker.start_or_resume(run_name="server")
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.end("FAILED")
    resumed = Tracker(cfg, tmp_path)
    assert resumed.start_or_resume(run_id) == run_id
    for step in range(2, 6):
        resumed.log_metrics({"loss": 0.1}, step=step)
    resumed.flush()

    version = log_and_register(bundle, run_id, RegistrySection(model_name="fox-server"), mlflow_server)
    resumed.end()
    client = mlflow.MlflowClient(mlflow_server)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5]
    assert str(client.get_model_version_by_alias("fox-server", "candidate").version) == str(version.version) == "1"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server, nothing local

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/fox-server@candidate")
    out = model.predict(pd.DataFrame([{"prompt": "a fox", "steps": 1, "seed": 1}, {"prompt": "snow", "num_frames": 2}]))
    assert list(out["num_frames"]) == [FRAMES, 2]
    for row in out.itertuples():
        assert decoded_shape(base64.b64decode(row.video_mp4_base64)) == (row.num_frames, SIZE, SIZE)
    assert np.isfinite(out["fps"]).all()
