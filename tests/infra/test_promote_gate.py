"""The promotion gate and `reelforge eval` against a real SQLite MLflow store in tmp_path, real
registered pyfunc versions and real shards.

Two tiny versions, made without training. "Good" has weights set by hand so that its velocity is
x_t - c for a fixed latent c: one Euler step from pure noise lands exactly on c, a still picture,
whatever the noise (so it neither flickers nor drifts). "Broken" is the same with the final layer's
weights scaled by 0.1: the noise is no longer removed, and its videos are noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.bundle import save_bundle
from model.dit import DiT, dit_config
from tests.training.conftest import uniform_clips, write_shards
from training.config import MlflowSection, RegistrySection, TrainingConfig
from training.evaluation import TAG_EVAL_PREFIX, TAG_FORCE_REASON, TAG_FORCED
from training.registry import log_and_register
from training.run_dir import run_identity, write_run_record
from training.tracking import TAG_OUT, Tracker, run_tags

pytestmark = pytest.mark.slow
FAST = ["--steps", "1", "--prompts", "1", "--clips", "1"]  # one Euler step: the good version's output is exact


def hand_set_bundle(path: Path, final_scale: float) -> Path:
    """A tiny DiT (pixel autoencoder, 48 latent channels, patch 1) whose velocity is ~ x_t - c.

    Every block is the identity at init (adaLN-Zero) and the timestep embedding is zeroed, so the
    final layer sees the patch embedding z = [x, -x, +b, -b]: mean 0, and a std set by the large
    constant b, so its LayerNorm is ~ a fixed scaling of x. The final linear undoes that scaling and
    its bias subtracts c."""
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=48, text_dim=384, depth=1, hidden_size=128, num_heads=4,
                     max_text_tokens=16, patch_size=(1, 1, 1))  # fmt: skip
    model = DiT(cfg)
    big = 1000.0  # |x| ~ 7 per token, so the LayerNorm's std is b's to 1e-5
    with torch.no_grad():
        embed = model.patch_embed  # (128, 49): 48 latent channels + the clean-frame mask
        embed.weight.zero_()
        embed.weight[:48, :48] = torch.eye(48)
        embed.weight[48:96, :48] = -torch.eye(48)
        embed.bias.zero_()
        embed.bias[96:112], embed.bias[112:] = big, -big
        model.t_embedder.mlp[2].weight.zero_()
        model.t_embedder.mlp[2].bias.zero_()
        final = model.final_layer.linear  # (48, 128)
        final.weight.zero_()
        final.weight[:, :48] = torch.eye(48) * (big / 2) * final_scale  # std of z is ~ big / 2
        target = torch.linspace(-0.6, 0.6, 48)  # c: one fixed 4x4 RGB pattern per latent cell
        final.bias.copy_(-target)
    return save_bundle(path, model, cfg, autoencoder="pixel", text_encoder="minilm", fps=8.0,
                       num_frames=4, width=32, height=32)  # fmt: skip


def training_run(uri: str, out: Path, shards: Path) -> str:
    """A finished run as training leaves one: tags naming its output folder and data, run.json there."""
    write_run_record(out, run_identity(TrainingConfig(), str(shards)))
    tracker = Tracker(MlflowSection(tracking_uri=uri), out)
    tags = run_tags("feedfacefeedface", str(shards)) | {TAG_OUT: str(out)}
    run_id = tracker.start_or_resume(run_name=out.name, tags=tags)
    tracker.end()
    return run_id


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny matmuls gain nothing from two, and OpenMP threads spin-waiting
    against other jobs on a shared 2-core runner made each evaluation ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    shards = write_shards(root / "shards", uniform_clips(3, num_frames=8), clips_per_shard=2)
    runs = {}
    for name, scale in (("good", 1.0), ("broken", 0.1)):
        bundle = hand_set_bundle(root / name / "bundle", scale)
        runs[name] = (training_run(uri, root / name, shards), bundle)
    return {"uri": uri, "shards": shards, "runs": runs}


def register(store, name: str) -> str:
    run_id, bundle = store["runs"][name]
    return str(log_and_register(bundle, run_id, RegistrySection(model_name="fox", alias="candidate"), store["uri"]).version)


def run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gate_refuses_a_worse_candidate_force_overrides_and_records(store, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from infra.promote import main as promote

    monkeypatch.setenv("REELFORGE_CACHE", str(tmp_path / "cache"))
    uri, client = store["uri"], MlflowClient(store["uri"])
    gate = ["fox", "--from-alias", "candidate", "--alias", "champion", "--tracking-uri", uri,
            "--data", str(store["shards"]), *FAST]  # fmt: skip

    good = register(store, "good")
    code, out, err = run(promote, gate, capsys)  # no champion yet: the candidate is evaluated, then promoted
    assert (code, out.strip()) == (0, f"fox@champion -> version {good}"), err
    tags = client.get_model_version("fox", good).tags  # its metrics are recorded all the same
    assert {f"{TAG_EVAL_PREFIX}{metric}" for metric in ("flicker", "flow_accel", "drift", "fidelity_psnr")} <= set(tags)

    broken = register(store, "broken")
    code, out, err = run(promote, gate, capsys)
    refusals = [line for line in err.splitlines() if line.startswith("refused:")]
    assert code == 1 and out == "" and len(refusals) == 1, err
    assert f"candidate version {broken} is worse than champion version {good} on " in refusals[0]
    assert "flicker (" in refusals[0] and "tolerance 10%" in refusals[0]
    assert "| flicker **worse** | lower |" in err  # the comparison table, on stderr
    assert str(client.get_model_version_by_alias("fox", "champion").version) == good  # alias unchanged
    assert TAG_FORCED not in client.get_model_version("fox", broken).tags

    code, out, err = run(promote, [*gate, "--force"], capsys)
    assert code == 0 and out.startswith(f"fox@champion -> version {broken} (forced: candidate version {broken}"), err
    assert str(client.get_model_version_by_alias("fox", "champion").version) == broken
    tags = client.get_model_version("fox", broken).tags
    assert tags[TAG_FORCED] == "true" and tags[TAG_FORCE_REASON].startswith("@champion: candidate version")

    # the other way round a better candidate passes the gate, and --no-eval skips it
    client.set_registered_model_alias("fox", "candidate", good)
    assert run(promote, gate, capsys)[:2] == (0, f"fox@champion -> version {good}\n")
    assert TAG_FORCED not in client.get_model_version("fox", good).tags
    client.set_registered_model_alias("fox", "candidate", broken)
    assert run(promote, [*gate, "--no-eval"], capsys)[:2] == (0, f"fox@champion -> version {broken}\n")


def test_eval_prints_and_logs_metrics_on_the_version(store, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from infra.cli import main as reelforge

    monkeypatch.setenv("REELFORGE_CACHE", str(tmp_path / "cache"))
    uri, client = store["uri"], MlflowClient(store["uri"])
    version = register(store, "good")
    # no --data: the shards come from the training run's output folder (run.json)
    code, out, err = run(reelforge, ["eval", f"models:/fox/{version}", "--tracking-uri", uri, *FAST], capsys)
    assert code == 0, err
    for metric in ("fidelity_psnr", "fidelity_ssim", "flicker", "flow_accel", "drift"):
        assert f"| {metric} |" in out
    assert f"held-out clip(s) of {store['shards']}" in out
    assert "trained on these shards" in out  # no held-out split in training yet, and the output says so

    model_version = client.get_model_version("fox", version)
    run_id = model_version.tags[f"{TAG_EVAL_PREFIX}run_id"]
    model_id = model_version.model_id or model_version.source.removeprefix("models:/")  # SQLite: in source only
    logged = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert set(logged) == {"fidelity_psnr", "fidelity_ssim", "flicker", "flow_accel", "drift"}
    assert logged["fidelity_psnr"] > 40  # the pixel autoencoder gives the anchors back exactly
    assert float(model_version.tags[f"{TAG_EVAL_PREFIX}flicker"]) == pytest.approx(logged["flicker"], rel=1e-5)
    eval_run = client.get_run(run_id)
    assert eval_run.data.params["eval.data"] == str(store["shards"]) and eval_run.data.metrics.keys() == logged.keys()

    code, _, err = run(reelforge, ["eval", "models:/fox@nope", "--tracking-uri", uri], capsys)
    assert code == 2 and "error: model 'models:/fox@nope': no such registered version" in err
