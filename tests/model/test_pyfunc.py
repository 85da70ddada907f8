"""model/pyfunc.py: the MLflow pyfunc saved and loaded for real (mlflow.pyfunc.save_model/load_model),
around a tiny random-initialised DiT with the lossless pixel autoencoder and the offline MiniLM."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from model.bundle import save_bundle
from model.dit import DiT, dit_config
from model.pyfunc import (
    AUTOENCODER_ARTIFACT,
    BUNDLE_ARTIFACT,
    TEXT_ENCODER_ARTIFACT,
    InvalidRequest,
    VideoGenerationModel,
    build_request,
    component_artifacts,
    input_example,
    model_signature,
    relocate_bundle,
    serving_requirements,
)
from tests.model.test_card import header_only_png

FRAMES, WIDTH, HEIGHT = 4, 32, 32


def tiny_bundle(path: Path, autoencoder: str = "pixel", text_encoder: str = "minilm") -> Path:
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=48, text_dim=384, depth=2, hidden_size=64, num_heads=4, max_text_tokens=16)
    return save_bundle(path, DiT(cfg), cfg, autoencoder=autoencoder, text_encoder=text_encoder,
                       fps=8.0, num_frames=FRAMES, width=WIDTH, height=HEIGHT)  # fmt: skip


def decode_mp4(b64: str) -> np.ndarray:
    with av.open(io.BytesIO(base64.b64decode(b64))) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # (T, H, W, 3)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("pyfunc")
    bundle = tiny_bundle(root / "bundle")
    model_dir = root / "model"
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=VideoGenerationModel(),
        artifacts=component_artifacts(bundle),
        code_paths=[str(Path(__file__).resolve().parents[2] / "model")],
        signature=model_signature(),
        pip_requirements=serving_requirements(),
    )
    return model_dir


@pytest.fixture(scope="module")
def loaded_model(saved_model):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(saved_model))


@pytest.fixture(scope="module")
def scoring_client(loaded_model):
    """MLflow's own scoring app (what `mlflow models serve` runs), in-process."""
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    return TestClient(scoring_server.init(loaded_model))


def test_signature_needs_only_prompt():
    signature = model_signature()
    required = [col.name for col in signature.inputs.inputs if col.required]
    assert required == ["prompt"]
    assert signature.outputs.input_names() == ["video_mp4_base64", "num_frames", "fps", "width", "height", "seed", "mode", "warnings"]


def test_local_component_folders_become_artifacts_and_are_relocated(tmp_path):
    vae, t5 = tmp_path / "train-host" / "vae", tmp_path / "train-host" / "t5"
    for folder in (vae, t5):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    bundle = tiny_bundle(tmp_path / "bundle", autoencoder=f"kl:{vae}", text_encoder=f"t5:{t5}")
    artifacts = component_artifacts(bundle)
    assert artifacts == {BUNDLE_ARTIFACT: str(bundle.resolve()), AUTOENCODER_ARTIFACT: str(vae), TEXT_ENCODER_ARTIFACT: str(t5)}
    # built-in specs ship nothing extra
    assert set(component_artifacts(tiny_bundle(tmp_path / "plain"))) == {BUNDLE_ARTIFACT}

    served = {BUNDLE_ARTIFACT: str(bundle), AUTOENCODER_ARTIFACT: str(tmp_path / "dl" / "vae"),
              TEXT_ENCODER_ARTIFACT: str(tmp_path / "dl" / "t5")}  # fmt: skip
    local = relocate_bundle(bundle, served, tmp_path / "local")
    config = json.loads((local / "model_config.json").read_text())
    assert config["autoencoder"] == f"kl:{tmp_path / 'dl' / 'vae'}"
    assert config["text_encoder"] == f"t5:{tmp_path / 'dl' / 't5'}"
    assert (local / "weights.safetensors").read_bytes() == (bundle / "weights.safetensors").read_bytes()
    assert json.loads((bundle / "model_config.json").read_text())["autoencoder"] == f"kl:{vae}"  # source untouched


def test_old_bundle_loads_and_round_trips_through_relocation(tmp_path):
    """A bundle written before generation.shift existed, with keys only training knows about: it loads
    with the defaults of its day, and relocating it rewrites the two specs and nothing else."""
    from model.bundle import load_bundle
    from model.pipeline import VideoPipeline

    vae, t5 = tmp_path / "train-host" / "vae", tmp_path / "train-host" / "t5"
    for folder in (vae, t5):
        folder.mkdir(parents=True)
    old_style = {"generation": {"steps": 25, "guidance": 4.5}, "reelforge_version": "0.1.0",
                 "config_hash": "0123456789abcdef", "ema_decay": 0.9999, "mlflow_run_id": "abc", "step": 1200}  # fmt: skip
    bundles = {}
    for name, specs in (("plain", {}), ("local", {"autoencoder": f"kl:{vae}", "text_encoder": f"t5:{t5}"})):
        bundles[name] = tiny_bundle(tmp_path / name, **specs)
        path = bundles[name] / "model_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **old_style}, indent=2))

    pipeline = VideoPipeline(load_bundle(bundles["plain"]))
    assert (pipeline.generation.steps, pipeline.generation.guidance, pipeline.generation.shift) == (25, 4.5, None)
    assert pipeline.bundle.config.extra == {"config_hash": "0123456789abcdef", "ema_decay": 0.9999,
                                            "mlflow_run_id": "abc", "step": 1200}  # fmt: skip

    for name, served in (
        ("plain", {BUNDLE_ARTIFACT: str(bundles["plain"])}),
        ("local", {BUNDLE_ARTIFACT: str(bundles["local"]), AUTOENCODER_ARTIFACT: str(tmp_path / "dl" / "vae"),
                   TEXT_ENCODER_ARTIFACT: str(tmp_path / "dl" / "t5")}),
    ):  # fmt: skip
        before = json.loads((bundles[name] / "model_config.json").read_text())
        after = json.loads((relocate_bundle(bundles[name], served, tmp_path / f"{name}-local") / "model_config.json").read_text())
        if name == "local":
            assert (after["autoencoder"], after["text_encoder"]) == (f"kl:{tmp_path / 'dl' / 'vae'}", f"t5:{tmp_path / 'dl' / 't5'}")
            before |= {"autoencoder": after["autoencoder"], "text_encoder": after["text_encoder"]}
        assert after == before and list(after) == list(before)


def test_input_example_is_a_valid_cheap_request(tmp_path):
    example = input_example(tiny_bundle(tmp_path / "b"))
    row = example.iloc[0]
    assert (row["num_frames"], row["width"], row["height"], row["steps"]) == (FRAMES, WIDTH, HEIGHT, 2)


@pytest.mark.slow
def test_loaded_pyfunc_predicts_decodable_videos(loaded_model):
    model = loaded_model
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[:, : WIDTH // 2] = (200, 40, 40)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    requests = pd.DataFrame(
        [
            {"prompt": "a red fox running through snow", "num_frames": 2, "width": 32, "height": 32, "steps": 2, "seed": 7},
            {"prompt": "the same fox, a painting", "steps": 1, "mode": "image", "image": base64.b64encode(png.getvalue()).decode()},
            {"prompt": "a long fox", "steps": 1, "seconds": 1.5},  # longer than trained: overlapped windows
        ]
    )
    out = model.predict(requests)
    assert list(out["num_frames"]) == [2, FRAMES, 12]  # 1.5 s at the bundle's 8 fps
    assert list(out["seed"])[0] == 7 and 0 <= out["seed"][1] < 2**31  # no seed given: a random one, reported
    assert list(out["mode"]) == ["text", "image", "text"]
    assert [json.loads(w) for w in out["warnings"]] == [[], [], []]  # a bundle without a card: every mode allowed
    for row in out.itertuples():
        frames = decode_mp4(row.video_mp4_base64)
        assert frames.shape == (row.num_frames, row.height, row.width, 3)
        assert (row.width, row.height, row.fps) == (WIDTH, HEIGHT, 8.0)
    # image mode keeps the image as frame 0 (up to H.264 + yuv420p loss)
    first = decode_mp4(out["video_mp4_base64"][1])[0].astype(int)
    assert np.abs(first - image.astype(int)).mean() < 12


def test_bad_requests_fail_naming_the_cell(tmp_path):
    with pytest.raises(ValueError, match="row 0 column image: not valid base64"):
        build_request({"prompt": "x", "mode": "image", "image": "not base64!!"}, tmp_path)
    with pytest.raises(ValueError, match="row 3 column num_frames: expected a whole number, got 2.5"):
        build_request({"prompt": "x", "num_frames": 2.5}, tmp_path, row=3)
    with pytest.raises(ValueError, match="row 0: empty prompt"):
        build_request({"prompt": "  "}, tmp_path)
    with pytest.raises(ValueError, match="row 0 column allow_untrained_mode: expected true or false, got 1"):
        build_request({"prompt": "x", "allow_untrained_mode": 1}, tmp_path)
    request, seed, mode = build_request({"prompt": "x", "steps": float("nan"), "seed": 3.0}, tmp_path)
    assert (request.steps, seed, mode) == (None, 3, "text")  # NaN (a missing cell in pandas) = default
    assert build_request({"prompt": "x", "allow_untrained_mode": np.bool_(True)}, tmp_path)[0].allow_untrained_mode is True


@pytest.mark.slow
def test_json_requests_through_mlflow_scoring_app(scoring_client):
    """The REST path `mlflow models serve` runs (MLflow's own scoring app, in-process): JSON records where
    each row sets different optional columns, i.e. ints, booleans and missing cells in one column."""
    records = [{"prompt": "a fox", "steps": 1, "num_frames": 2, "allow_untrained_mode": True},
               {"prompt": "snow", "guidance": 3, "steps": 1, "seed": 5}]  # fmt: skip
    response = scoring_client.post("/invocations", json={"dataframe_records": records})
    assert response.status_code == 200, response.text[:500]
    predictions = response.json()["predictions"]
    assert [(p["num_frames"], p["mode"]) for p in predictions] == [(2, "text"), (FRAMES, "text")]
    assert predictions[1]["seed"] == 5
    for prediction in predictions:
        assert decode_mp4(prediction["video_mp4_base64"]).shape == (prediction["num_frames"], HEIGHT, WIDTH, 3)
        assert json.loads(prediction["warnings"]) == []


@pytest.mark.slow
def test_request_errors_reach_an_mlflow_client_as_invalid_parameter_value(loaded_model, scoring_client):
    """Every request error is HTTP 400, error code INVALID_PARAMETER_VALUE, and our one line as the whole
    message: no echo of the request table, no server stack trace. A bad row refuses the whole batch."""
    from model.pipeline import GenerationRequest

    pipeline = loaded_model.unwrap_python_model().pipeline

    def reason(**fields) -> str:  # what the pipeline itself says about a request
        with pytest.raises(ValueError) as exc:
            pipeline.check_request(GenerationRequest(prompt="x", **fields))
        return str(exc.value)

    cases = [
        ([{"prompt": "x", "width": 100000}], f"row 0: {reason(width=100000)}"),
        ([{"prompt": "ok", "steps": 1}, {"prompt": "x", "seconds": 3600}], f"row 1: {reason(seconds=3600)}"),
        ([{"prompt": "x", "num_frames": 2.5}], "row 0 column num_frames: expected a whole number, got 2.5"),
        ([{"prompt": "x", "allow_untrained_mode": "yes"}], "row 0 column allow_untrained_mode: expected true or false, got 'yes'"),
    ]
    for records, message in cases:
        response = scoring_client.post("/invocations", json={"dataframe_records": records})
        body = response.json()
        assert (response.status_code, body["error_code"], body["message"]) == (400, "INVALID_PARAMETER_VALUE", message)
        assert "stack_trace" not in body and "\n" not in body["message"]
    image = base64.b64encode(header_only_png(9000, 9000)).decode()
    response = scoring_client.post("/invocations", json={"dataframe_records": [{"prompt": "x", "mode": "image", "image": image}]})
    assert response.status_code == 400 and response.json()["message"].startswith("row 0: image: 9000x9000 = 81,000,000 pixels exceeds")

    # In-process the same refusal is an MlflowException with that code, and a ValueError.
    with pytest.raises(InvalidRequest) as exc:
        loaded_model.predict(pd.DataFrame([{"prompt": "x", "height": 100000}]))
    assert isinstance(exc.value, ValueError) and exc.value.error_code == "INVALID_PARAMETER_VALUE"
    assert exc.value.message == f"row 0: {reason(height=100000)}"


@pytest.mark.slow
def test_model_loads_its_shipped_code_in_a_fresh_process(saved_model, tmp_path):
    """code_paths=["model"]: another process, started outside the checkout, imports `model` from the
    copy inside the saved model, not from this repository."""
    import os
    import subprocess
    import sys

    script = (
        "import mlflow.pyfunc, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({str(saved_model)!r})\n"
        "import model\n"
        "out = m.predict(pd.DataFrame([{'prompt': 'a fox', 'steps': 1, 'num_frames': 2}]))\n"
        "print(model.__file__, int(out['num_frames'][0]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    module_file, num_frames = done.stdout.split()[-2:]
    assert Path(module_file).is_relative_to(saved_model / "code") and num_frames == "2"
