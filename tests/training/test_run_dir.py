"""training/run_dir.py: an --out or MLflow store that Ray deletes with the session is refused, and an
--out holds one run (another config or dataset is refused unless --resume; a longer max_steps is
the same run). Real configs, real shards; the CLI refusals come from `reelforge train` itself,
before Ray starts. The refusal inside a real Ray job: tests/infra/test_ray_job.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from infra.config import load_config
from infra.train import main
from tests.training.conftest import uniform_clips, write_shards
from training.preflight import PreflightError
from training.run_dir import RUN_RECORD, check_outputs_last, check_run_record, run_identity, write_run_record

SESSION = "session_2026-11-29_16-19-01_082432_24849"  # how Ray names a session folder


def test_out_and_store_inside_a_ray_job_working_dir_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "ray" / SESSION / "runtime_resources" / "working_dir_files" / "_ray_pkg_404b8ab48718ba9d"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    job_config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_404b8ab48718ba9d.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    with pytest.raises(PreflightError) as refused:
        check_outputs_last(Path("runs/tiny"), "https://mlflow.example:5000")
    assert str(refused.value) == (
        f"--out runs/tiny resolves inside this Ray job's working-dir copy {copy}, which Ray deletes with the session; "
        "pass an --out that outlasts the job, an absolute path every node sees (e.g. --out /shared/runs/NAME) or object storage"
    )
    kept = tmp_path / "shared" / "runs" / "tiny"
    with pytest.raises(PreflightError, match=r"^MLflow store sqlite:///mlflow.db resolves inside this Ray job's working-dir copy"):
        check_outputs_last(kept, "sqlite:///mlflow.db")  # relative: beside the job's code
    with pytest.raises(PreflightError, match=r"^MLflow store file:///.*/_ray_pkg_\w+/mlruns resolves inside"):
        check_outputs_last(kept, (copy / "mlruns").as_uri())
    # storage that outlasts the job passes: an absolute path elsewhere, a server, a SQLite file elsewhere
    check_outputs_last(kept, "https://mlflow.example:5000")
    check_outputs_last(kept, f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")
    check_outputs_last(kept, "postgresql://mlflow@db/mlflow")


def test_ray_session_and_temp_dirs_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(PreflightError, match=rf"^--out .* resolves inside the Ray session folder {tmp_path / SESSION},"):
        check_outputs_last(tmp_path / SESSION / "runs", "https://mlflow.example")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))  # Ray's temp dir is then <RAY_TMPDIR>/ray
    with pytest.raises(PreflightError, match=rf"resolves inside Ray's temp dir {tmp_path / 'raytmp' / 'ray'},"):
        check_outputs_last(tmp_path / "raytmp" / "ray" / "runs", "https://mlflow.example")
    check_outputs_last(tmp_path / "raytmp" / "runs", "https://mlflow.example")


# --- one --out, one run -------------------------------------------------------------------------


def tiny(*overrides: str):
    return load_config("train/tiny", list(overrides)).training()


def test_another_config_or_dataset_is_refused_a_longer_run_is_not(tiny_shards, tmp_path):
    out = tmp_path / "run"
    write_run_record(out, run_identity(tiny("train.max_steps=24", "train.lr=3e-3"), str(tiny_shards)))
    # the same run, trained longer: a continuation
    check_run_record(out, run_identity(tiny("train.max_steps=48", "train.lr=3e-3"), str(tiny_shards)), resume=False)
    # the same shards copied elsewhere are the same dataset
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "copy"))
    check_run_record(out, run_identity(tiny("train.max_steps=24", "train.lr=3e-3"), str(copy)), resume=False)

    with pytest.raises(PreflightError) as refused:
        check_run_record(out, run_identity(tiny("train.lr=1e-3", "train.batch_size=2"), str(tiny_shards)), resume=False)
    assert str(refused.value) == (
        f"--out {out} holds a training run of another config (train.batch_size 4 -> 2, train.lr 0.003 -> 0.001); "
        "use another --out, or pass --resume to continue that run with these settings"
    )
    other = write_shards(tmp_path / "other", uniform_clips(6))
    with pytest.raises(PreflightError, match=rf"holds a training run of another dataset \(manifest sha256 \w{{12}} of {tiny_shards}, this run \w{{12}} of {other}\);"):
        check_run_record(out, run_identity(tiny("train.lr=3e-3"), str(other)), resume=False)
    # --resume is the user's word: allowed, and the record then describes the new run
    check_run_record(out, run_identity(tiny("train.lr=1e-3"), str(other)), resume=True)
    # checking writes nothing: train() records the new identity once every launch check has passed
    assert json.loads((out / RUN_RECORD).read_text())["config"]["train.lr"] == 0.003


def test_cli_refuses_a_changed_run_in_one_line_before_ray(tiny_shards, tmp_path):
    out = tmp_path / "run"
    write_run_record(out, run_identity(tiny(), str(tiny_shards)))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as refused:
        main(["--config", "train/tiny", "--data", str(tiny_shards), "--out", str(out), "--set", "deepspeed.zero_stage=1"])
    assert str(refused.value) == (
        f"reelforge train: --out {out} holds a training run of another config (deepspeed.zero_stage 2 -> 1); "
        "use another --out, or pass --resume to continue that run with these settings"
    )
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written: no store, no checkpoint


@pytest.mark.parametrize("launcher", ["ray", "torchrun"])
def test_cli_resume_alone_needs_a_run_to_continue(tiny_shards, tmp_path, launcher):
    out = tmp_path / "empty"
    with pytest.raises(SystemExit) as refused:
        main(["--config", "train/tiny", "--data", str(tiny_shards), "--out", str(out), "--launcher", launcher, "--resume"])
    assert str(refused.value) == (
        f"reelforge train: --resume without CKPT continues the run in --out {out}, which holds none; "
        "pass --resume CKPT or no --resume"
    )
    assert not out.exists()
