"""`reelforge generate`: one video from an inference bundle, written as an H.264 MP4.

    reelforge generate --model runs/tiny/bundle --prompt "a red fox running through snow" --out fox.mp4
    reelforge generate --model BUNDLE --prompt "..." --image first.png --out anim.mp4
    reelforge generate --model BUNDLE --prompt "..." --video clip.mp4 --mode extend --seconds 20 --out long.mp4
    reelforge generate --model BUNDLE --prompt "..." --video a.mp4 --video2 b.mp4 --out joined.mp4
    reelforge generate --model BUNDLE --prompt "in watercolor" --video clip.mp4 --mode edit --strength 0.5 --out edit.mp4

Bad input (missing or unreadable file, size not divisible, frames out of range, ...) prints one
line `reelforge generate: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from infra.logs import setup_logging
from model.errors import one_line

logger = logging.getLogger(__name__)

PROG = "reelforge generate"


def resolve_model_path(ref: str) -> Path:
    """The local bundle folder a `--model` reference names.

    A bundle folder as given; a registry reference (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
    `runs:/RUN_ID/model`) is downloaded from the store `$MLFLOW_TRACKING_URI` names (cached per version)."""
    if ref.startswith(("models:/", "runs:/")):
        from training.registry import download_registered_bundle  # imports mlflow: only for registry references

        return download_registered_bundle(ref)
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model {ref!r}: no such bundle folder")
    if not (path / "model_config.json").is_file():
        raise ValueError(f"--model {ref!r}: not an inference bundle (no model_config.json)")
    return path


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 256x256")
    return int(match.group(1)), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    from model.conditioning import MODES

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate a video from a trained reelforge bundle (text, image, extend, connect or edit).",
    )
    parser.add_argument("--model", required=True, help="bundle folder (or a registry reference where supported)")
    parser.add_argument("--prompt", default="", help="what to generate; may be empty when conditioning on an image/video")
    parser.add_argument("--image", help="first frame to animate (mode image)")
    parser.add_argument("--video", help="video to extend, edit, or connect from")
    parser.add_argument("--video2", help="video to connect into (mode connect)")
    parser.add_argument(
        "--mode", choices=MODES,
        help="default: image with --image, connect with --video2, text without inputs; required with --video alone",
    )  # fmt: skip
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="any duration; long videos are generated in overlapping windows")
    length.add_argument("--frames", type=int, help="frame count, up to the trained clip length")
    parser.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the trained size)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the bundle's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=0.6, help="edit: 0 keeps the input video, 1 ignores it")
    parser.add_argument("--overlap", type=int, help="frames taken from input videos and shared between windows")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="DiT weights dtype (default: as saved)")
    parser.add_argument("--out", required=True, help="output .mp4 path")
    return parser


def _mode(args: argparse.Namespace) -> str:
    if args.mode:
        return args.mode
    if args.video2:
        return "connect"
    if args.video:
        raise ValueError("--video needs --mode extend, extend-backward, connect or edit")
    return "image" if args.image else "text"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except ValueError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    import torch

    from model.pipeline import GenerationRequest, load_pipeline
    from model.mp4 import write_mp4

    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {args.out!r} must end in .mp4")
    width, height = args.size if args.size else (None, None)
    request = GenerationRequest(
        prompt=args.prompt, mode=_mode(args), image=args.image, video=args.video, video2=args.video2,
        num_frames=args.frames, seconds=args.seconds, width=width, height=height, steps=args.steps,
        guidance=args.guidance, seed=args.seed, strength=args.strength, overlap_frames=args.overlap,
    )  # fmt: skip
    pipeline = load_pipeline(
        resolve_model_path(args.model), device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None
    )
    # generate() checks the whole request before it reads any input: bad values fail in a second.
    video = pipeline.generate(request)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(video.frames, video.fps, out)
    frames, h, w, _ = video.frames.shape
    print(f"{out}: {frames} frames {w}x{h} at {video.fps:g} fps ({video.metadata['mode']}, seed {video.metadata['seed']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
