"""training/preflight.py errors, and `reelforge train` (training/train.py) on Ray surviving a killed worker and
resuming at another worker count.

Real Ray (the session's local instance, 2 CPUs), real DeepSpeed, real MLflow (SQLite), real shards.
The killed worker is a real SIGKILL to a Ray Train worker process, found through the pid file the
loop writes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from infra.config import load_config
from tests.training.conftest import uniform_clips, write_shards
from infra.train import main
from training.clip_index import read_clip_index, without_held_out
from training.preflight import PreflightError, check_memory, preflight, training_bytes_per_worker
from training.train import ray_restart_checkpoint

REPO = Path(__file__).resolve().parents[2]
# Ray Train's controller polls its workers this often (default 2 s): it learns of a reported
# checkpoint, a dead worker and the end of training only at a poll.
FAST_POLLS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


# --- preflight: one line naming the value, before any worker starts ---------------------------


def test_preflight_rejects_bad_data(tmp_path, tiny_shards):
    cfg = load_config("train/tiny")
    with pytest.raises(PreflightError, match="no such shard folder"):
        preflight(cfg, str(tmp_path / "nope"), None)
    unfinished = write_shards(tmp_path / "unfinished", uniform_clips(2), success=False)
    with pytest.raises(PreflightError, match="no _SUCCESS"):
        preflight(cfg, str(unfinished), None)
    short = write_shards(tmp_path / "short", uniform_clips(3, num_frames=4))
    with pytest.raises(PreflightError, match=r"all 3 clips are shorter than the model's 8 frames .*longest: 4 frames"):
        preflight(cfg, str(short), None)
    few = load_config("train/tiny", ["scaling.num_workers=8", "train.data_workers=4"])
    with pytest.raises(PreflightError, match=r"16 usable clips for 32 readers"):
        preflight(few, str(tiny_shards), None)
    # the readers share the training clips only: those data.held_out keeps for evaluation do not count
    held = len(without_held_out(read_clip_index(str(tiny_shards)), 0.25).held_out_ids)
    assert 0 < held < 16
    few_held = load_config("train/tiny", ["scaling.num_workers=8", "train.data_workers=4", "data.held_out=0.25"])
    with pytest.raises(PreflightError, match=rf"{16 - held} usable clips for 32 readers .*; {held} more held out by data.held_out=0.25\)"):
        preflight(few_held, str(tiny_shards), None)


def test_preflight_rejects_shapes_and_world_sizes(tiny_shards, tmp_path):
    with pytest.raises(PreflightError, match=r"bucket 8x30x32 .*size 30x32 is not divisible by 4"):
        preflight(load_config("train/tiny", ["model.size=30x32"]), str(tiny_shards), None)
    # 36 px / 4 (autoencoder) = 9 latent cells: not a whole number of 2x2 patches
    with pytest.raises(PreflightError, match=r"bucket 8x36x36 .*latent grid 8x9x9 .*not divisible by the DiT patch 1x2x2"):
        preflight(load_config("train/tiny", ["model.size=36x36"]), str(tiny_shards), None)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 4, "zero_stage": 2}))
    with pytest.raises(PreflightError, match=r"deepspeed.zero_stage=3 but the checkpoint was written at zero_stage=2"):
        preflight(load_config("train/tiny", ["deepspeed.zero_stage=3"]), str(tiny_shards), str(checkpoint))
    # another world size (ZeRO-2 on one worker included) is no longer refused: the universal checkpoint
    facts = preflight(load_config("train/tiny", ["scaling.num_workers=1"]), str(tiny_shards), str(checkpoint))
    assert facts["resume_state"].world_size == 4


def test_memory_rule_splits_states_by_zero_stage():
    def per_worker(stage: int) -> float:
        return training_bytes_per_worker(1000, load_config("train/tiny", [f"deepspeed.zero_stage={stage}", "scaling.num_workers=4"]))

    # fp32: weights 4 + grads 4 + Adam 8 + EMA 4 bytes per parameter, partitioned stage by stage
    assert per_worker(0) == 1000 * 20
    assert per_worker(1) == 1000 * (4 + 4 + 8 / 4 + 4)
    assert per_worker(2) == 1000 * (4 + 4 / 4 + 8 / 4 + 4)
    assert per_worker(3) == 1000 * 20 / 4


@pytest.mark.slow
def test_preflight_rejects_a_preset_too_large_for_the_workers(ray_local):
    from model.dit import count_params

    cfg = load_config("train/tiny", ["model.preset=7b"])
    with pytest.raises(PreflightError, match=r"model.preset=7b \(7\.\d+B params\) needs \d+\.\d GiB per worker"):
        check_memory(cfg, count_params("7b", 48, 384))


def test_cli_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", "train/tiny", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert str(exc.value) == f"reelforge train: --data {tmp_path / 'missing'}: no such shard folder"


# --- a killed worker, then a resume at another worker count -----------------------------------


RUN = [
    # ZeRO-2: the resume at another worker count goes through the universal checkpoint (ZeRO-0
    # resumes a full copy; it is covered by tests/training/test_loop.py and test_checkpoint.py)
    "deepspeed.zero_stage=2",
    "train.max_steps=24",
    "train.log_every_steps=1",
    "train.log_sample_ids=true",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    # 2 workers x 4 clips x 5 steps = 2.5 epochs of 16 clips: step 15 is mid-epoch
    "checkpoint.every_steps=5",
    "checkpoint.num_to_keep=3",
    "scaling.max_failures=2",
]


def trained_clips(sample_logs: list[Path], steps: range) -> Counter:
    """(epoch, clip) -> times trained, over `steps`. A step replayed after a restart was written
    again; the last record of each (rank, step) is the one that counts."""
    counts: Counter = Counter()
    for log in sample_logs:
        last: dict[int, list] = {}
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the killed worker's torn last line
            last[record["step"]] = record["ids"]
        for step in steps:
            for epochs, indices in last.get(step, []):
                counts.update(zip(epochs, indices))
    return counts


def assert_each_epoch_once(counts: Counter, num_clips: int) -> None:
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    by_epoch = Counter(epoch for epoch, _ in counts)
    last_epoch = max(by_epoch)
    # readers move on to the next epoch independently, so only the newest two may be partial
    for epoch in range(last_epoch - 1):
        assert by_epoch[epoch] == num_clips, (epoch, by_epoch)


def mlflow_losses(tracking_uri: str, run_id: str) -> dict[int, float]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def killed_run(ray_local, tiny_shards, tmp_path_factory, tracking_uri):
    """`reelforge train` (a real CLI process on the test's Ray) whose rank-1 worker is SIGKILLed
    after the first checkpoint; Ray restarts the group from it."""
    out = tmp_path_factory.mktemp("killed") / "run"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=str(REPO), **FAST_POLLS)
    command = [
        sys.executable, "-m", "infra", "train", "--config", "train/tiny", "--data", str(tiny_shards), "--out", str(out),
        "--no-register", *[arg for item in RUN for arg in ("--set", item)], "--set", f"mlflow.tracking_uri={tracking_uri}",
        "--set", "mlflow.experiment=test-killed",
    ]
    # Output to a file, not a pipe: a pipe nobody reads while we poll fills up and blocks the run.
    log = out.parent / "train.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    pid_file = out / "workers" / "rank-1.pid"
    killed_pid = None
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None:
        # Once Ray has registered the checkpoint (its snapshot names it), not merely stored its
        # files: a worker killed before the controller's next poll would restart from step 0.
        if ray_restart_checkpoint(out) is not None and pid_file.is_file():
            killed_pid = int(pid_file.read_text())
            os.kill(killed_pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    try:
        process.wait(timeout=max(10, deadline - time.time()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert killed_pid is not None, output[-3000:]
    assert process.returncode == 0, output[-3000:]
    return {"out": out, "tracking_uri": tracking_uri, "output": output, "killed_pid": killed_pid}


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_ends_at_max_steps(killed_run, tiny_shards):
    from mlflow import MlflowClient

    out, output = killed_run["out"], killed_run["output"]
    assert "| steps | 24 |" in output
    restarted_pid = int((out / "workers" / "rank-1.pid").read_text())
    assert restarted_pid != killed_run["killed_pid"]  # the group really restarted
    run_id = next(line.split("|")[2].strip() for line in output.splitlines() if line.startswith("| mlflow_run_id"))
    client = MlflowClient(killed_run["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("test-killed").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the restart continued the same run
    assert runs[0].info.status == "FINISHED"
    losses = mlflow_losses(killed_run["tracking_uri"], run_id)
    assert sorted(losses) == list(range(1, 25))  # every step once, none past max_steps
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < 0.85 * first, losses  # ZeRO-2 learns (ZeRO 0 and 3: tests/training/test_loop.py)
    counts = trained_clips(sorted((out / "workers").glob("samples-rank-*.jsonl")), range(1, 25))
    assert sum(counts.values()) == 24 * 2 * 4
    assert_each_epoch_once(counts, num_clips=16)
    assert (out / "bundle" / "weights.safetensors").is_file()


@pytest.mark.slow
def test_its_out_refuses_another_config_or_dataset_unless_resume(killed_run, tiny_shards, tmp_path):
    """The killed run's --out, written by the real command, holds one run: the same command with
    another setting or other shards is refused in one line before any work (training/run_dir.py)."""
    out = killed_run["out"]
    record = json.loads((out / "run.json").read_text())
    assert record["data"] == str(tiny_shards) and "train.max_steps" not in record["config"]
    before = sorted(str(p) for p in out.rglob("*"))
    base = ["--config", "train/tiny", "--data", str(tiny_shards), "--out", str(out), "--no-register",
            *[arg for item in RUN for arg in ("--set", item)], "--set", f"mlflow.tracking_uri={killed_run['tracking_uri']}",
            "--set", "mlflow.experiment=test-killed"]  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        main([*base, "--set", "train.lr=1e-3"])
    assert str(refused.value) == (
        f"reelforge train: --out {out} holds a training run of another config (train.lr 0.003 -> 0.001); "
        "use another --out, or pass --resume to continue that run with these settings"
    )
    other = write_shards(tmp_path / "other", uniform_clips(16, num_frames=10))
    with pytest.raises(SystemExit, match=rf"holds a training run of another dataset \(manifest sha256 \w{{12}} of {tiny_shards}, this run \w{{12}} of {other}\)"):
        main([*base[:2], "--data", str(other), *base[4:]])
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing touched


def adam_step_count(checkpoint: Path) -> int:
    """Adam's step count in a ZeRO-1/2 checkpoint of one worker (DeepSpeed's own file layout)."""
    import torch

    (shard,) = checkpoint.glob("deepspeed/step-*/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    optimizer = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    steps = {int(state["step"]) for state in optimizer["base_optimizer_state"]["state"].values()}
    assert len(steps) == 1, steps
    return steps.pop()


def experiment_runs(tracking_uri: str, experiment: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return [run.info.run_id for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])]


@pytest.mark.slow
def test_resume_with_another_worker_count_sees_each_clip_once(killed_run, tiny_shards, tmp_path, monkeypatch):
    """ZeRO-2 shards of 2 workers, resumed mid-epoch by 1 worker (2 DataLoader readers) through the
    universal checkpoint; then the same command again, which Ray resumes at its final step."""
    from training.checkpoint import UNIVERSAL_DIR, read_trainer_state
    from training.train import train

    first = killed_run["out"]
    checkpoint = next(
        path.parent
        for path in sorted((first / "ray" / first.name).glob("checkpoint_*/trainer_state.json"))
        if read_trainer_state(path.parent).step == 15
    )
    state = read_trainer_state(checkpoint)
    assert (state.world_size, state.zero_stage, state.data_position["epoch"]) == (2, 2, 7)  # mid-epoch 7
    cfg = load_config(
        "train/tiny",
        [*RUN, "train.max_steps=28", "scaling.num_workers=1", "train.data_workers=2",
         f"mlflow.tracking_uri={killed_run['tracking_uri']}", "mlflow.experiment=test-killed",
         "registry.model_name=test-killed"],
    ).training()
    out = tmp_path / "resumed"
    for name, value in FAST_POLLS.items():
        monkeypatch.setenv(name, value)  # read by the driver's TorchTrainer, passed on to its controller
    summary = train(cfg, str(tiny_shards), out, resume=str(checkpoint))
    assert summary["steps"] == 28 and summary["mlflow_run_id"] == state.mlflow_run_id
    assert (checkpoint / UNIVERSAL_DIR / "latest_universal").is_file()  # converted once, beside the shards
    # Adam's moments came along: its step count went on from the checkpoint's 15, not from 0
    assert adam_step_count(Path(summary["checkpoint"])) == 28
    # steps 1-15 from the first run (2 workers), 16-28 from the resumed one (1 worker, 2 readers)
    counts = trained_clips(sorted((first / "workers").glob("samples-rank-*.jsonl")), range(1, 16))
    counts += trained_clips([out / "workers" / "samples-rank-0.jsonl"], range(16, 29))
    assert sum(counts.values()) == 15 * 8 + 13 * 4
    assert_each_epoch_once(counts, num_clips=16)
    losses = mlflow_losses(killed_run["tracking_uri"], state.mlflow_run_id)
    assert sorted(losses) == list(range(1, 29))
    assert all(math.isfinite(loss) for loss in losses.values())
    # the weights came along: the loss goes on near where it was, far below the untrained start
    start, before, after = (sum(losses[s] for s in steps) / 3 for steps in ((1, 2, 3), (13, 14, 15), (16, 17, 18)))
    assert after < 0.85 * start and after < 1.5 * before, losses
    assert experiment_runs(killed_run["tracking_uri"], "test-killed") == [state.mlflow_run_id]

    # The same command again: Ray finds the run in <out>/ray and hands the workers its final
    # checkpoint; the driver continues that checkpoint's MLflow run instead of opening an empty one,
    # and the bundle re-exported from that checkpoint is byte-identical, so no second version.
    again = train(cfg, str(tiny_shards), out)
    assert again["steps"] == 28 and again["mlflow_run_id"] == state.mlflow_run_id
    assert experiment_runs(killed_run["tracking_uri"], "test-killed") == [state.mlflow_run_id]
    assert sorted(mlflow_losses(killed_run["tracking_uri"], state.mlflow_run_id)) == list(range(1, 29))
    assert summary["registered"] == again["registered"] == "models:/test-killed@candidate (version 1)"
