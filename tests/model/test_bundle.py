"""model/bundle.py: save a tiny random DiT as a bundle and load it back through the real loaders."""

from __future__ import annotations

import json

import pytest
import torch

from model.autoencoders import load_autoencoder
from model.bundle import GenerationDefaults, load_bundle, read_bundle_config, save_bundle
from model.dit import DiT, dit_config


def _tiny_cfg(**overrides):
    # pixel AE (48 channels) + MiniLM (384-d); a 2-block DiT is enough to exercise every weight kind.
    return dit_config("tiny", in_channels=48, text_dim=384, depth=2, hidden_size=64, num_heads=4, max_text_tokens=32, **overrides)


def _perturbed(model: DiT) -> DiT:
    # adaLN-Zero leaves many weights at exactly 0; random values make a wrong load visible.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg(patch_size=(1, 2, 2))
    model = _perturbed(DiT(cfg))
    out = save_bundle(
        tmp_path / "bundle", model, cfg, autoencoder=load_autoencoder("pixel"), text_encoder="minilm",
        fps=8, num_frames=8, width=32, height=32, extra={"run_id": "abc", "generation": {"steps": 4}},
    )
    config = json.loads((out / "model_config.json").read_text())
    assert config["autoencoder"] == "pixel" and config["text_encoder"] == "minilm"
    assert (config["num_frames"], config["width"], config["height"], config["fps"]) == (8, 32, 32, 8.0)
    assert config["dit"]["patch_size"] == [1, 2, 2] and config["run_id"] == "abc"
    assert config["generation"] == {"steps": 4, "guidance": 5.0}
    assert config["text_max_length"] == 32  # capped by the DiT's text table
    assert config["reelforge_version"] != ""

    bundle = load_bundle(out)
    assert bundle.dit.config == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(bundle.dit.state_dict()[name], tensor), name
    assert bundle.autoencoder.latent_channels == 48 and bundle.text_encoder.max_length == 32
    assert not any(p.requires_grad for p in bundle.dit.parameters())

    # Same outputs as the saved model.
    x = torch.randn(1, 48, 2, 8, 8)
    text, mask = bundle.text_encoder.encode(["a red fox"])
    t = torch.tensor([0.5])
    torch.testing.assert_close(bundle.dit(x, t, text, mask), model.eval()(x, t, text, mask))

    half = load_bundle(out, dtype=torch.bfloat16)
    assert next(half.dit.parameters()).dtype == torch.bfloat16


def test_state_dict_from_wrapped_model_and_keyword(tmp_path):
    cfg = _tiny_cfg()
    model = DiT(cfg)
    # What DeepSpeed / torch.compile / activation checkpointing name the same weights.
    wrapped = {f"module._orig_mod.{k}".replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."): v
               for k, v in model.state_dict().items()}
    save_bundle(tmp_path / "b", None, cfg, state_dict=wrapped, autoencoder="pixel", text_encoder="minilm",
                fps=8, num_frames=4, width=16, height=16)
    assert read_bundle_config(tmp_path / "b").weights_dtype == "float32"
    assert load_bundle(tmp_path / "b").dit.config == cfg


def test_bad_bundles_fail_with_the_reason(tmp_path):
    cfg = _tiny_cfg()
    model = DiT(cfg)
    common = dict(autoencoder="pixel", text_encoder="minilm", fps=8, num_frames=4, width=16, height=16)
    with pytest.raises(ValueError, match="missing \\['final_layer.linear.bias'\\]"):
        sd = model.state_dict()
        sd.pop("final_layer.linear.bias")
        save_bundle(tmp_path / "x", sd, cfg, **common)
    with pytest.raises(ValueError, match="exactly one of"):
        save_bundle(tmp_path / "x", model, cfg, state_dict=model.state_dict(), **common)
    with pytest.raises(ValueError, match="would overwrite a bundle field"):
        save_bundle(tmp_path / "x", model, cfg, extra={"fps": 3}, **common)
    with pytest.raises(ValueError, match="not an inference bundle"):
        load_bundle(tmp_path / "nothing")

    # A DiT built for another autoencoder: caught at load, naming both widths.
    save_bundle(tmp_path / "mismatch", model, cfg, **{**common, "autoencoder": "pixel:s=2"})
    with pytest.raises(ValueError, match="has 12 latent channels, the DiT expects 48"):
        load_bundle(tmp_path / "mismatch")


def test_config_is_read_once_into_typed_fields(tmp_path):
    cfg = _tiny_cfg()
    extra = {"config_hash": "0123456789abcdef", "ema_decay": 0.999, "generation": {"guidance": 1.0, "shift": None}}
    save_bundle(tmp_path / "b", DiT(cfg), cfg, autoencoder="pixel", text_encoder="minilm",
                fps=8, num_frames=4, width=16, height=24, extra=extra)  # fmt: skip
    config = read_bundle_config(tmp_path / "b")
    assert config.dit == cfg and (config.fps, config.num_frames, config.width, config.height) == (8.0, 4, 16, 24)
    assert config.generation == GenerationDefaults(steps=30, guidance=1.0, shift=None)
    assert config.extra == {"config_hash": "0123456789abcdef", "ema_decay": 0.999}
    # No shift recorded means the resolution default, so the file says nothing, as bundles before shift did.
    assert "shift" not in json.loads((tmp_path / "b" / "model_config.json").read_text())["generation"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something-else"}, "is not a reelforge-bundle v<=1 config"),
        ({"format_version": 2}, "is not a reelforge-bundle v<=1 config"),
        ({"generation": {"steps": 4, "temperature": 0.7}}, "unknown generation defaults \\['temperature'\\]"),
        ({"generation": {"shift": 0}}, "generation shift 0 must be a number > 0"),
        ({"generation": {"steps": 0}}, "generation steps 0 must be an integer >= 1"),
        ({"fps": None}, "missing fps"),
        ({"dit": {"in_channels": 48, "text_dim": 384, "layers": 2}}, "unexpected keyword argument 'layers'"),
    ],
)
def test_bad_config_on_disk_fails_on_read_naming_the_value(tmp_path, change, message):
    cfg = _tiny_cfg()
    save_bundle(tmp_path / "b", DiT(cfg), cfg, autoencoder="pixel", text_encoder="minilm",
                fps=8, num_frames=4, width=16, height=16)  # fmt: skip
    path = tmp_path / "b" / "model_config.json"
    raw = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({key: value for key, value in raw.items() if value is not None}))
    with pytest.raises(ValueError, match=message) as exc:
        read_bundle_config(tmp_path / "b")
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=message):
        load_bundle(tmp_path / "b")


def test_inference_modules_import_without_heavy_dependencies():
    """model/ ships alone inside a registered model: loading a bundle must not need Ray, DeepSpeed,
    MLflow or pydantic, and diffusers / transformers load only when a spec needs them."""
    import subprocess
    import sys

    code = (
        "import sys, model.pipeline, model.bundle;"
        "print(','.join(m for m in ('ray','deepspeed','mlflow','pydantic','diffusers','transformers','infra') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
