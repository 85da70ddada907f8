"""training/tracking.py against a real MLflow SQLite store with local artifacts (no mocks)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path

import pytest

from training.config import MlflowSection
from training.tracking import (
    MAX_PARAM_VALUE_CHARS,
    TAG_CONFIG_HASH,
    TAG_GIT_COMMIT,
    TAG_INGEST_CONFIG_HASH,
    TAG_MANIFEST_SHA256,
    Tracker,
    prompt_slug,
    resolve_tracking_uri,
    normal_step_s,
    restart_lost_s,
    run_params,
    run_tags,
)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    # one store per module: creating a SQLite store runs MLflow's schema migrations (seconds)
    return tmp_path_factory.mktemp("run")


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(tracker: Tracker):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.tracking_uri)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    assert resolve_tracking_uri(MlflowSection(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(MlflowSection(), tmp_path) == "http://127.0.0.1:5999"
    explicit = MlflowSection(tracking_uri=f"sqlite:///{tmp_path}/other.db")
    assert resolve_tracking_uri(explicit, tmp_path) == explicit.tracking_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="mlflow.tracking_uri"):
        resolve_tracking_uri(MlflowSection(), None)


def test_other_ranks_are_no_ops(tmp_path):
    tracker = Tracker(MlflowSection(), tmp_path, rank=1)
    assert tracker.start_or_resume(run_name="x") is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.log_sample_video(b"x", "p", step=1) is None
    tracker.end()
    assert list(tmp_path.iterdir()) == []  # nothing written: no store, no artifacts


@pytest.mark.slow
def test_resume_continues_same_run_and_never_logs_a_step_twice(out_dir):
    cfg = MlflowSection(experiment="resume")
    first = Tracker(cfg, out_dir)
    run_id = first.start_or_resume(run_name="tiny")
    for step in range(0, 10):
        first.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
    first.log_metrics({"eval/loss": 0.5}, step=5)
    first.end("FAILED")  # the crash

    second = Tracker(cfg, out_dir)
    assert second.start_or_resume(run_id) == run_id
    assert second.last_logged_step == 9
    assert _client(second).get_run(run_id).info.status == "RUNNING"
    # the resumed worker replays steps 6..9 from its checkpoint at step 6, then goes on
    for step in range(6, 15):
        second.log_metrics({"loss": 100.0 + step, "lr": 1e-4}, step=step)
        if step == 10:
            second.log_metrics({"eval/loss": 0.25}, step=step)
    second.end()

    client = _client(second)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert [s for s, _ in loss] == list(range(15))
    # replayed steps kept their first values; new steps have the resumed run's values
    assert dict(loss)[9] == pytest.approx(0.1) and dict(loss)[10] == 110.0
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/loss")) == [5, 10]
    wall = client.get_metric_history(run_id, "goodput/wall_s")
    assert sorted(m.step for m in wall) == list(range(15))


@pytest.mark.slow
def test_params_flattened_long_values_cut_and_resume_keeps_first(out_dir, tmp_path, caplog):
    from training.config import TrainingConfig
    from training.tracking import flat_params

    cfg = TrainingConfig.model_validate({"train": {"lr": 0.0003}, "registry": {"model_name": "fox"}})
    assert flat_params(cfg)["train.max_steps"] == cfg.train.max_steps and all("." in key for key in flat_params(cfg))
    flat = flat_params(cfg) | {"notes": "x" * (MAX_PARAM_VALUE_CHARS + 500)}
    tracker = Tracker(MlflowSection(experiment="params"), out_dir)
    run_id = tracker.start_or_resume(run_name="params")
    tracker.log_params(flat)
    tracker.end()

    params = _client(tracker).get_run(run_id).data.params
    assert params["train.lr"] == "0.0003"
    assert params["registry.model_name"] == "fox"
    assert params["mlflow.tracking_uri"] == "None"
    assert set(flat_params(cfg)) <= set(params)
    assert len(params["notes"]) == MAX_PARAM_VALUE_CHARS and params["notes"].endswith(f"[{MAX_PARAM_VALUE_CHARS + 500} chars]")

    resumed = Tracker(MlflowSection(experiment="params"), out_dir)
    resumed.start_or_resume(run_id)
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        resumed.log_params(flat | {"train.lr": "0.001", "train.new_key": 3})
    resumed.end()
    client = _client(resumed)
    params = client.get_run(run_id).data.params
    assert params["train.lr"] == "0.0003" and params["train.new_key"] == "3"
    assert "train.lr: '0.0003' -> '0.001'" in caplog.text
    # the full configs, uncut, as artifacts: the first one and the changed one of the resume
    first = json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text())
    assert first["notes"] == flat["notes"] and first["train.lr"] == 0.0003
    (resumed_name,) = [a.path for a in client.list_artifacts(run_id) if a.path.startswith("config-resumed-")]
    second = json.loads(Path(client.download_artifacts(run_id, resumed_name, str(tmp_path))).read_text())
    assert second["train.lr"] == "0.001" and second["train.new_key"] == 3


@pytest.mark.slow
def test_tags_samples_and_artifacts_land_under_out(out_dir, tmp_path):
    manifest = tmp_path / "shards" / "manifest.parquet"
    manifest.parent.mkdir()
    manifest.write_bytes(b"PAR1 not really parquet, any bytes hash the same way")
    tags = run_tags("0123456789abcdef", manifest.parent)
    assert tags[TAG_CONFIG_HASH] == "0123456789abcdef"
    assert tags[TAG_MANIFEST_SHA256] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert tags[TAG_GIT_COMMIT] == head.stdout.strip()

    tracker = Tracker(MlflowSection(experiment="artifacts"), out_dir)
    run_id = tracker.start_or_resume(run_name="art", tags=tags)
    mp4 = b"\x00\x00\x00\x18ftypmp42 fake-but-opaque bytes"
    path = tracker.log_sample_video(mp4, "A red fox, in snow!", step=100)
    assert path == "samples/step-000100/a-red-fox-in-snow.mp4"
    (tmp_path / "state.json").write_text('{"step": 100}')
    tracker.log_artifact(tmp_path / "state.json", "checkpoints")
    tracker.end()

    client = _client(tracker)
    assert client.get_run(run_id).data.tags[TAG_MANIFEST_SHA256] == tags[TAG_MANIFEST_SHA256]
    local = client.download_artifacts(run_id, path, str(tmp_path / "dl"))
    assert Path(local).read_bytes() == mp4
    # the embedded default keeps artifacts beside the store, under <out>/mlartifacts
    assert list((out_dir / "mlartifacts").rglob("a-red-fox-in-snow.mp4"))
    assert list((out_dir / "mlartifacts").rglob("state.json"))


@pytest.mark.slow
def test_goodput_counts_checkpoint_time_and_restart_gap(out_dir):
    cfg = MlflowSection(experiment="goodput")
    tracker = Tracker(cfg, out_dir)
    run_id = tracker.start_or_resume(run_name="goodput")
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0}, step=step)
        time.sleep(0.02)
    with tracker.checkpoint_timer():
        time.sleep(0.1)
    tracker.log_metrics({"loss": 1.0}, step=4)
    tracker.end("FAILED")
    time.sleep(0.3)  # the outage: nothing trains

    resumed = Tracker(cfg, out_dir)
    resumed.start_or_resume(run_id)
    resumed.log_metrics({"loss": 1.0}, step=5)
    resumed.end()
    metrics = _client(resumed).get_run(run_id).data.metrics
    assert metrics["goodput/checkpoint_s"] >= 0.1
    assert metrics["goodput/restart_s"] >= 0.25
    lost = metrics["goodput/checkpoint_s"] + metrics["goodput/restart_s"]
    assert metrics["goodput/fraction"] == pytest.approx(1 - lost / metrics["goodput/wall_s"], abs=0.05)


@pytest.mark.slow
def test_resuming_a_run_the_store_lacks_names_both(out_dir):
    tracker = Tracker(MlflowSection(experiment="missing"), out_dir)
    with pytest.raises(ValueError, match=r"MLflow run 0123abcd \(from the checkpoint\) is not in sqlite:///.*mlflow.db"):
        tracker.start_or_resume("0123abcd")


def test_restart_lost_subtracts_steps_trained_in_the_gap():
    # 100 s gap, 20 new steps at 2 s/step were real work: 60 s lost
    assert restart_lost_s(1000.0, 50, 1100.0, 70, 2.0) == pytest.approx(60.0)
    assert restart_lost_s(1000.0, 50, 1010.0, 70, 2.0) == 0.0


def test_normal_step_time_ignores_a_gap_stretched_by_a_checkpoint():
    from mlflow.entities import Metric

    def history(times_s: list[float], every_steps: int = 10) -> list:
        return [Metric("loss", 1.0, int(t * 1000), (i + 1) * every_steps) for i, t in enumerate(times_s)]

    # 2 s per 10 steps, except one interval that also saved a checkpoint (+5 s)
    assert normal_step_s(history([0.0, 2.0, 4.0, 11.0, 13.0])) == pytest.approx(0.2)
    assert normal_step_s(history([0.0, 2.0, 9.0])) == pytest.approx(0.2)
    assert normal_step_s(history([0.0])) == 0.0


def test_prompt_slug():
    assert prompt_slug("A red fox, in snow!") == "a-red-fox-in-snow"
    assert prompt_slug("???") == "prompt"
    assert len(prompt_slug("word " * 40)) <= 60


@pytest.mark.slow
def test_failed_metric_batches_are_logged_not_raised_until_flush(out_dir, caplog):
    """Metric batches go out on the tracker's own thread: a batch the store rejects (here: the run was
    deleted under the training) never raises into the step that logged it; the failure is logged once
    it is noticed, and `flush()` / `end()` raise it."""
    from mlflow.exceptions import MlflowException

    tracker = Tracker(MlflowSection(experiment="async"), out_dir)
    run_id = tracker.start_or_resume(run_name="async")
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.flush()
    client = _client(tracker)
    # batches land in the order they were logged, every one of them
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]

    client.delete_run(run_id)
    tracker.log_metrics({"loss": 0.2}, step=4)  # returns at once although the store will refuse it
    with pytest.raises(MlflowException):
        tracker.flush()
    with caplog.at_level(logging.ERROR, logger="training.tracking"):
        step, deadline = 5, time.monotonic() + 60
        while "MLflow metrics batch failed" not in caplog.text:
            assert time.monotonic() < deadline, "a failed batch was never reported"
            tracker.log_metrics({"loss": 0.1}, step=step)  # each call reports the batches that failed so far
            step += 1
            time.sleep(0.05)
    with pytest.raises(MlflowException):
        tracker.end()


def test_run_records_the_ingest_config_its_shards_were_made_with(tmp_path):
    """Params `ingest.*` and the ingest config hash come from the shards' own record (its format:
    docs/data-format.md, "The work area"), never from the embedded ingest defaults. The record as
    the real ingest writes it: tests/infra/test_ray_job.py."""
    from infra.config import load_config
    from model.storage import config_hash
    from tests.training.conftest import uniform_clips, write_shards

    ingest = load_config("ingest/demo", ["clips.fps=12", "clips.size=48x48", "scenes.threshold=31"]).ingest()
    assert load_config().ingest().clips.fps != 12  # the embedded default differs
    sections = {name: getattr(ingest, name).model_dump(mode="json") for name in ("scenes", "clips", "filters", "caption")}
    shards = write_shards(tmp_path / "shards", uniform_clips(4))
    (shards / "_work").mkdir()
    (shards / "_work" / "config.json").write_text(json.dumps({"config_hash": config_hash(sections), "sections": sections}))
    training = load_config("train/tiny").training()
    params = run_params(training, shards)
    assert (params["ingest.clips.fps"], params["ingest.clips.size"], params["ingest.scenes.threshold"]) == (12, "48x48", 31)
    assert params["ingest.caption.backend"] == "sidecar" and params["train.lr"] == training.train.lr
    assert run_tags("0123456789abcdef", shards)[TAG_INGEST_CONFIG_HASH] == config_hash(sections)

    # shards whose _work/ is gone still carry the hash in stats.json; shards with neither, nothing
    bare = write_shards(tmp_path / "bare", uniform_clips(2))
    assert TAG_INGEST_CONFIG_HASH not in run_tags("0123456789abcdef", bare)
    assert not [key for key in run_params(training, bare) if key.startswith("ingest.")]
    (bare / "stats.json").write_text(json.dumps({"config_hash": config_hash(sections), "sources": {}}))
    assert run_tags("0123456789abcdef", bare)[TAG_INGEST_CONFIG_HASH] == config_hash(sections)
    assert not [key for key in run_params(training, bare) if key.startswith("ingest.")]
