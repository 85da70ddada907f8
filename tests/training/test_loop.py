"""training/loop.py under Ray Train: 2 real workers x 1 CPU, real DeepSpeed (gloo), real shards,
real MLflow (SQLite). Loss falls at ZeRO 0 and 3 (ZeRO 2: the killed-worker run in
test_train_ray.py, which saves a Ray start), and the exported bundle holds exactly the
weights DeepSpeed's own consolidation (zero_to_fp32) reads from the ZeRO shards."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch

from infra.config import load_config
from training.export import BUNDLE_DIR
from training.loop import WorkerArgs

# No conditioning frames, no text dropout, raw weights exported (ema_decay 0): the loss curve and
# the bundle then depend only on the optimizer, which is what these tests look at.
PLAIN = [
    "train.text_dropout=0",
    "train.conditioning.first_frame=0",
    "train.conditioning.first_k=0",
    "train.conditioning.last_k=0",
    "train.conditioning.both_ends=0",
    "train.conditioning.random=0",
    "train.ema_decay=0",
]


def run_ray(shards: Path, out: Path, overrides: list[str], tracking_uri: str):
    """Fit `train_loop` on the Ray instance the `ray_local` fixture started; returns Ray's Result."""
    from training.train import build_trainer

    cfg = load_config("train/tiny", [*overrides, f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=test-loop"]).training()
    args = WorkerArgs(config=cfg, data=str(shards), out=str(out))
    # Ray Train's controller polls its workers every 2 s by default: the fit ends only at the
    # poll after the workers finish. The driver's environment passes this on to the controller.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        return build_trainer(cfg, args, out, run_name=out.name).fit()


def loss_history(tracking_uri: str, out: Path) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("test-loop").experiment_id], filter_string=f"attributes.run_name = '{out.name}'"
    )
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps))  # no step logged twice
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])  # ZeRO-2 learning: tests/training/test_train_ray.py
def test_loss_falls_and_bundle_holds_the_trained_weights(ray_local, tiny_shards, tmp_path, tracking_uri, stage):
    out = tmp_path / f"zero{stage}"
    overrides = [
        *PLAIN,
        f"deepspeed.zero_stage={stage}",
        "train.max_steps=12",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.log_every_steps=1",
        "checkpoint.every_steps=100",  # only the final checkpoint
    ]
    result = run_ray(tiny_shards, out, overrides, tracking_uri)
    assert result.error is None
    assert result.metrics["step"] == 12 and result.metrics["samples_seen"] == 12 * 2 * 4

    losses = loss_history(tracking_uri, out)
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, losses

    from safetensors.torch import load_file

    from model.bundle import load_bundle  # noqa: F401  (the bundle must load through model/ alone)
    from model.dit import DiT, dit_config

    bundle = load_file(str(out / BUNDLE_DIR / "weights.safetensors"))
    DiT(dit_config("tiny", 48, 384)).load_state_dict(bundle, strict=True)
    # Trained with train.text_dropout=0 (PLAIN): no null text learned, so no guidance by default.
    generation = json.loads((out / BUNDLE_DIR / "model_config.json").read_text())["generation"]
    assert generation["guidance"] == 1.0, generation
    checkpoint = Path(result.checkpoint.path)
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "deepspeed"), tag="step-000012")
    else:
        consolidated = torch.load(checkpoint / "deepspeed" / "step-000012" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    consolidated = {k.removeprefix("dit."): v for k, v in consolidated.items()}
    assert consolidated.keys() == bundle.keys()
    for name, tensor in bundle.items():
        assert torch.equal(tensor, consolidated[name].float()), name


@pytest.mark.slow
def test_trains_on_a_caption_set_and_the_run_records_it(ray_local, tmp_path, tracking_uri):
    """data.caption_set=NAME end to end: only clips with a usable caption in the set are trained
    on, and the MLflow run says which set (its id, model, revision, prompt hash)."""
    from mlflow import MlflowClient

    from tests.training.conftest import uniform_clips, write_shards
    from tests.training.test_data import write_caption_set
    from training.clip_index import read_clip_index

    shards = write_shards(tmp_path / "shards", uniform_clips(8), clips_per_shard=4)
    ids = read_clip_index(str(shards)).ids
    usable = {k for k in range(len(ids)) if k % 4}
    set_id = write_caption_set(shards, "dense", {i: (f"dense caption {k}" if k in usable else None) for k, i in enumerate(ids)})
    out = tmp_path / "run"
    overrides = [*PLAIN, "data.caption_set=dense", "train.max_steps=3", "scaling.num_workers=1", "train.log_every_steps=1",
                 "checkpoint.every_steps=100", "train.eval_every_steps=0"]  # fmt: skip
    result = run_ray(shards, out, overrides, tracking_uri)
    assert result.error is None and result.metrics["step"] == 3
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("test-loop").experiment_id], filter_string=f"attributes.run_name = '{out.name}'")
    # 12 clips trained on = all 6 with a caption, twice: the 2 without one were met and skipped
    assert sum(m.value for m in client.get_metric_history(run.info.run_id, "skipped_clips")) >= len(ids) - len(usable)
    params = run.data.params
    assert (params["data.caption_set"], params["data.caption_set_id"], params["data.caption_set_model"]) == ("dense", set_id, "dense-captioner")
    assert params["data.caption_set_revision"] == "r1" and len(params["data.caption_set_prompt_hash"]) == 16
    # the bundle keeps a few of the set's captions: the style prompt expansion writes in at generation
    style = json.loads((out / BUNDLE_DIR / "model_config.json").read_text())["prompt_style"]
    assert style["source"] == "caption_set:dense" and style["caption_set_id"] == set_id
    assert style["examples"] and set(style["examples"]) <= {f"dense caption {k}" for k in usable}
