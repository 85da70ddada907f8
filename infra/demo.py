"""`reelforge demo` / `make demo`: the whole chain on synthetic footage, on one machine.

    demo footage -> ingest -> tiny training -> registered model -> one generated MP4

Every step is the real command a user would type (called in-process through its
`main`), against the embedded defaults: a local Ray instance, a SQLite MLflow store under
the demo folder, the pixel autoencoder and the offline MiniLM text encoder.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path

from infra.cli import COMMANDS
from infra.logs import setup_logging

logger = logging.getLogger(__name__)

MODEL_NAME = "reelforge-demo"
# A caption of the demo suite (infra/footage/, --suite demo), so the clip it came from shows
# what a good sample looks like. 1200 CPU steps start to memorise the demo clips; they do not compose
# unseen colour/shape/direction combinations.
PROMPT = "a red circle moving left on a light gray background"
# Guidance 1 (no classifier-free guidance): train/demo trains no null text (text_dropout 0), and on
# models this briefly trained guidance 4-5 pushed colours off anyway (2-5 dB lower PSNR).
GUIDANCE = 1.0
# The model works at 16x16: the demo also writes a nearest-neighbour upscale that players show at a
# visible size, and a PNG strip of its frames above those of the training clip with the same caption.
VIEW_SCALE = 8
FPS = 8.0  # configs/train/demo.yaml model.fps


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(command: str, argv: list[str]) -> None:
    """Call a command's `main` exactly as `reelforge COMMAND` would; a non-zero exit fails the demo."""
    print("$ reelforge " + " ".join([command, *argv]), flush=True)
    code = importlib.import_module(COMMANDS[command][0]).main(argv)
    if code:
        raise SystemExit(f"demo: `reelforge {command}` exited with {code}")


def clip_with_caption(shards: Path, caption: str) -> bytes | None:
    """The MP4 bytes of the first ingested clip whose caption is `caption`, or None."""
    import tarfile

    import pyarrow.parquet as pq

    rows = pq.read_table(shards / "manifest.parquet", columns=["id", "caption", "shard"]).to_pylist()
    match = next((row for row in rows if row["caption"] == caption), None)
    if match is None:
        return None
    with tarfile.open(shards / match["shard"]) as tar:
        member = tar.extractfile(f"{match['id']}.mp4")
        return member.read() if member is not None else None


def write_previews(video: Path, clip: bytes | None, fps: float, out_mp4: Path, out_png: Path) -> None:
    """`video` upscaled VIEW_SCALE x (nearest, so pixels stay pixels) as an MP4, and a PNG strip of
    its frames in a row, above as many frames of `clip` (the training clip the prompt describes,
    resampled to `fps` and resized alike) when there is one."""
    import numpy as np
    from PIL import Image

    from model.mp4 import write_mp4
    from model.video_io import read_video

    frames = read_video(video)  # (T, H, W, 3) uint8
    num_frames, height, width, _ = frames.shape
    big = frames.repeat_interleave(VIEW_SCALE, dim=1).repeat_interleave(VIEW_SCALE, dim=2)  # (T, 8H, 8W, 3)
    write_mp4(big, fps=fps, path=out_mp4)
    rows = [np.concatenate(list(big.numpy()), axis=1)]  # (8H, T*8W, 3)
    if clip is not None:
        real = read_video(clip, num_frames=num_frames, fps=fps, size=(width, height))  # (T, H, W, 3)
        if real.shape[0] == num_frames:
            real = real.repeat_interleave(VIEW_SCALE, dim=1).repeat_interleave(VIEW_SCALE, dim=2)
            rows.append(np.concatenate(list(real.numpy()), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo"), help="where everything is written (default ./demo)")
    parser.add_argument("--steps", type=int, default=1200, help="training steps for the tiny model (default 1200: the demo then takes ~6 min on 2 idle CPUs)")
    args = parser.parse_args(argv)
    setup_logging()
    started = time.monotonic()
    root = args.dir.resolve()
    footage, shards, runs = root / "footage", root / "shards", root / "runs"
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"

    step("1/5 demo footage (synthetic, known cuts and captions)")
    run("demo-footage", [str(footage), "--suite", "demo"])

    step("2/5 ingest: scene split, filter, caption, write shards")
    run("ingest", [str(footage), "--out", str(shards), "--config", "ingest/demo"])

    step("3/5 train the tiny DiT, demo preset (Ray Train x DeepSpeed, MLflow)")
    run(
        "train",
        [
            "--config", "train/demo",
            "--data", str(shards),
            "--out", str(runs),
            "--set", f"train.max_steps={args.steps}",
            "--set", f"mlflow.tracking_uri={tracking_uri}",
            "--set", f"registry.model_name={MODEL_NAME}",
        ],
    )

    step("4/5 generate from the registered model")
    video = root / "generated.mp4"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    run(
        "generate",
        ["--model", f"models:/{MODEL_NAME}@candidate", "--prompt", PROMPT, "--guidance", str(GUIDANCE),
         "--out", str(video), "--seed", "0"],
    )

    preview, strip = root / f"generated_x{VIEW_SCALE}.mp4", root / "generated_frames.png"
    write_previews(video, clip_with_caption(shards, PROMPT), FPS, preview, strip)

    step("5/5 where to look")
    minutes = (time.monotonic() - started) / 60
    print(
        f"""demo finished in {minutes:.1f} min
  footage        {footage}
  shards         {shards}   (open {shards / 'report.html'} in a browser)
  training runs  {runs}
  generated      {video}   (16x16, as the model makes it)
  to look at     {preview}   ({VIEW_SCALE}x larger)
                 {strip}   (its frames above the training clip's)
  prompt         "{PROMPT}"  (a training caption: the demo model draws the
                 background and a flickering patch of the shape's colour; 1200 CPU steps
                 are too few for a shape that moves, see docs/training.md "The demo preset")
  MLflow UI      .venv/bin/mlflow ui --backend-store-uri {tracking_uri}  (then open http://127.0.0.1:5000)
  registry       models:/{MODEL_NAME}@candidate"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
