"""The same loop without Ray: `torchrun --nproc_per_node 2 -m infra train --launcher torchrun` (gloo, 2 CPU processes)
at ZeRO-3, then `--resume` from its middle checkpoint with ONE process (the ZeRO-3 shards go
through DeepSpeed's universal checkpoint) continues the same MLflow run to a later max_steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import uniform_clips, write_shards
from training.sessions import latest_torchrun_checkpoint

REPO = Path(__file__).resolve().parents[2]
EVAL_PROMPT = "a red square moving right"


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "infra", "train", "--launcher", "torchrun", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_torchrun_trains_checkpoints_and_resumes(tmp_path, tracking_uri):
    from mlflow import MlflowClient

    # 16 good clips, one undecodable and one too short: both are skipped and counted, never a crash
    clips = uniform_clips(16) + [{**uniform_clips(1)[0], "bad": True}, uniform_clips(1, num_frames=3)[0]]
    tiny_shards = write_shards(tmp_path / "shards", clips, clips_per_shard=6)
    out = tmp_path / "run"
    common = ["--config", "train/tiny", "--data", str(tiny_shards), "--out", str(out)]
    settings = ["deepspeed.zero_stage=3", "train.log_every_steps=1", "checkpoint.every_steps=3", f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=test-torchrun",
                # eval samples at steps 3 and 6 (2 Euler steps, one prompt); a non-default shift the bundle must record
                "train.eval_every_steps=3", f"train.eval_prompts=[{EVAL_PROMPT!r}]", "train.eval_sampling_steps=2", "train.timestep_shift=4.0"]
    first = torchrun([*common, *[a for s in [*settings, "train.max_steps=6"] for a in ("--set", s)]])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000003", "step-000006"]
    # both ranks' ZeRO-3 optimizer shards landed in the one shared folder
    shards = sorted(p.name for p in (checkpoints / "step-000003" / "deepspeed" / "step-000003").glob("zero_pp_rank_*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = json.loads((checkpoints / "step-000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["samples_seen"] == 3 * 2 * 4 and len(state["rng"]) == 2
    assert (out / "bundle" / "weights.safetensors").is_file()
    assert json.loads((out / "bundle" / "model_config.json").read_text())["generation"]["shift"] == 4.0
    _check_eval_samples(tracking_uri, state["mlflow_run_id"], [3, 6])

    second = torchrun(
        [*common, "--resume", str(checkpoints / "step-000003"), *[a for s in [*settings, "train.max_steps=8"] for a in ("--set", s)]],
        nproc=1,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "from step 3" in second.stderr
    assert (checkpoints / "step-000003" / "universal" / "latest_universal").is_file()
    # Adam's moments and step count were re-cut for one process, not restarted: 3 + 5 steps
    assert _adam_step_count(checkpoints / "step-000008") == 8
    # what `--resume` without a path would continue now: the newest complete checkpoint
    assert latest_torchrun_checkpoint(out) == checkpoints / "step-000008"
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test-torchrun").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]
    steps = [m.step for m in client.get_metric_history(state["mlflow_run_id"], "loss")]
    assert sorted(steps) == list(range(1, 9))  # replayed steps 4-6 were not logged again
    skipped = client.get_metric_history(state["mlflow_run_id"], "skipped_clips")
    assert sum(m.value for m in skipped) >= 2  # 8 steps x 8 clips = 4 epochs, each meets both bad clips
    _check_throughput_metrics(client, state["mlflow_run_id"])


def _adam_step_count(checkpoint: Path) -> int:
    """Adam's step count in a one-process ZeRO-3 checkpoint (DeepSpeed's own file layout)."""
    import torch

    shard = checkpoint / "deepspeed" / checkpoint.name / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optimizer = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
    steps = {int(state["step"]) for state in optimizer["state"].values()}
    assert len(steps) == 1, steps
    return steps.pop()


def _check_throughput_metrics(client, run_id: str) -> None:
    """tokens/s is the sum of the per-bucket rates, grad norm is a real number, and no MFU on a CPU."""
    metrics = client.get_run(run_id).data.metrics
    buckets = {key: value for key, value in metrics.items() if key.startswith("bucket/")}
    assert buckets and all(key.endswith("/tokens_per_s") for key in buckets)
    assert metrics["tokens_per_s"] > 0
    assert sum(buckets.values()) == pytest.approx(metrics["tokens_per_s"], rel=1e-6)
    # each clip of this run is 8 frames at 32x32 -> (8, 8, 8) pixel latents -> 8*4*4 tokens of patch (1,2,2)
    assert metrics["tokens_per_s"] == pytest.approx(128 * metrics["clips_per_s"], rel=1e-6)
    assert 0 < metrics["grad_norm"] < float("inf")
    assert "mfu" not in metrics


def _check_eval_samples(tracking_uri: str, run_id: str, steps: list[int]) -> None:
    """Each eval step logged samples/step-NNNNNN/<slug>.mp4 that decodes to the trained clip format."""
    import mlflow.artifacts

    from model.video_io import read_video

    for step in steps:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"samples/step-{step:06d}/a-red-square-moving-right.mp4", tracking_uri=tracking_uri
        )
        frames = read_video(local)
        assert tuple(frames.shape) == (8, 32, 32, 3)  # tiny.yaml: 8 frames of 32x32
        assert frames.float().std() > 0  # decoded pixels, not an empty clip


def test_bad_resume_path_is_one_line(tiny_shards, tmp_path):
    from infra.train import main

    argv = ["--launcher", "torchrun", "--config", "train/tiny", "--data", str(tiny_shards), "--resume", str(tmp_path)]
    with pytest.raises(SystemExit, match=f"--resume {tmp_path}: not a reelforge checkpoint"):
        main(argv)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 2, "zero_stage": 3}))
    with pytest.raises(SystemExit, match=r"deepspeed.zero_stage=2 but the checkpoint was written at zero_stage=3"):
        main(argv)
