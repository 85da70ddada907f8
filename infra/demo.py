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
# A caption of the demo suite (pipelines/footage.py, --suite demo), so the clip it came from shows
# what a good sample looks like. 300 CPU steps memorise the demo clips; they do not yet compose
# unseen colour/shape/direction combinations.
PROMPT = "a red circle moving left on a light gray background"
# Guidance 1 (no classifier-free guidance): on a model this briefly trained, guidance 4-5 pushes
# colours off (measured: 2-4 dB lower PSNR against the matching clip).
GUIDANCE = 1.0


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(command: str, argv: list[str]) -> None:
    """Call a command's `main` exactly as `reelforge COMMAND` would; a non-zero exit fails the demo."""
    print("$ reelforge " + " ".join([command, *argv]), flush=True)
    code = importlib.import_module(COMMANDS[command][0]).main(argv)
    if code:
        raise SystemExit(f"demo: `reelforge {command}` exited with {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelforge demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo"), help="where everything is written (default ./demo)")
    parser.add_argument("--steps", type=int, default=800, help="training steps for the tiny model (800: ~5 min on 2 idle CPUs)")
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

    step("5/5 where to look")
    minutes = (time.monotonic() - started) / 60
    print(
        f"""demo finished in {minutes:.1f} min
  footage        {footage}
  shards         {shards}   (open {shards / 'report.html'} in a browser)
  training runs  {runs}
  generated      {video}
  MLflow UI      .venv/bin/mlflow ui --backend-store-uri {tracking_uri}  (then open http://127.0.0.1:5000)
  registry       models:/{MODEL_NAME}@candidate"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
