"""training/registry.py, `reelforge register` / `promote` (infra/) and `reelforge generate --model models:/...` against real MLflow:
a SQLite store in tmp_path (the same against a real `mlflow server` on PostgreSQL and S3:
tests/infra/test_production_stores.py). The model is a tiny
random-initialised DiT with the pixel autoencoder and the offline MiniLM, saved by `save_bundle`."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import av
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
