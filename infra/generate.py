"""`reelforge generate`: one video from an inference bundle, written as an H.264 MP4.

    reelforge generate --model runs/tiny/bundle --prompt "a red fox running through snow" --out fox.mp4
    reelforge generate --model BUNDLE --prompt "..." --image first.png --out anim.mp4
    reelforge generate --model BUNDLE --prompt "..." --video clip.mp4 --mode extend --seconds 20 --out long.mp4
    reelforge generate --model BUNDLE --prompt "..." --video a.mp4 --video2 b.mp4 --out joined.mp4
    reelforge generate --model BUNDLE --prompt "in watercolor" --video clip.mp4 --mode edit --strength 0.5 --out edit.mp4
    reelforge generate --model BUNDLE --prompt "a fox in snow" --expand-prompt --expand-endpoint http://gpu:8000/v1 \
        --expand-model Qwen/Qwen2.5-7B-Instruct --out fox.mp4

`--expand-prompt` rewrites the prompt into a caption in the style of the model's training captions
(model/prompt_expansion.py) with a local transformers model (`--expand-model DIR|ID`) or an
OpenAI-compatible endpoint (`--expand-endpoint URL --expand-model NAME`); on failure the original
prompt is used, with a warning. Next to OUT.mp4, OUT.json records the prompts, seed and mode.

Bad input (missing or unreadable file, size not divisible, frames out of range, ...) prints one
line `reelforge generate: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
        epilog="A table of requests instead: `reelforge generate --batch REQUESTS.parquet --out DIR --model M` "
        "(`--batch X --help` lists its options; docs/batch-generation.md).",
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
    parser.add_argument(
        "--allow-untrained-mode", action="store_true",
        help="run a mode the model's card says was never trained (refused otherwise); the output may ignore its inputs",
    )  # fmt: skip
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="DiT weights dtype (default: as saved)")
    parser.add_argument("--out", required=True, help="output .mp4 path (and OUT.json: prompts, seed, mode)")
    expansion = parser.add_argument_group("prompt expansion")
    expansion.add_argument("--expand-prompt", action="store_true", help="rewrite the prompt in the style of the training captions first")
    expansion.add_argument("--expand-model", help="a transformers model folder or hub id, or the endpoint's model name")
    expansion.add_argument("--expand-endpoint", help="an OpenAI-compatible base URL (default: run --expand-model locally)")
    expansion.add_argument("--expand-api-key-env", default="OPENAI_API_KEY", help="variable holding the endpoint's API key")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg == "--batch" or arg.startswith("--batch=") for arg in argv):
        from infra.generate_batch import main as batch_main  # a table of requests: a Ray Data job

        return batch_main(argv, resolve_model_path)
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except ValueError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    import torch

    from model.card import load_card
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
        allow_untrained_mode=args.allow_untrained_mode,
    )  # fmt: skip
    if args.expand_prompt and not args.expand_model:
        raise ValueError("--expand-prompt needs --expand-model (a local model, or the endpoint's model name with --expand-endpoint)")
    bundle = resolve_model_path(args.model)
    # What the model's card alone can refuse (mode, size, length, budget, inputs' headers) fails
    # before the model loads, which for a large one takes minutes.
    load_card(bundle).check_request(request)
    pipeline = load_pipeline(bundle, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    expansion = _expand(args, bundle) if args.expand_prompt else None
    if expansion is not None:
        request = dataclasses.replace(request, prompt=expansion.prompt)
    # generate() checks the whole request before it reads any input: bad values fail in a second.
    video = pipeline.generate(request)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(video.frames, video.fps, out)
    record = {k: v for k, v in video.metadata.items() if isinstance(v, (str, int, float, bool, type(None)))}
    record["warnings"] = list(video.metadata["warnings"])
    record |= expansion.record() if expansion else {"original_prompt": args.prompt, "prompt": args.prompt, "expanded": False}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, sort_keys=True))
    frames, h, w, _ = video.frames.shape
    print(f"{out}: {frames} frames {w}x{h} at {video.fps:g} fps ({video.metadata['mode']}, seed {video.metadata['seed']})")
    for warning in video.metadata["warnings"]:  # what the model's card says it never trained
        print(f"warning: {warning}")
    if expansion is not None:
        print(f"prompt: {expansion.prompt}" if expansion.expanded else f"warning: {expansion.warning}")
    return 0


def _expand(args: argparse.Namespace, bundle: Path):
    """The prompt expanded in the style of the bundle's training captions (model/prompt_expansion.py)."""
    from model.bundle import read_bundle_config
    from model.chat import BackendUnavailable
    from model.chat_backends import BackendSpec, make_backend
    from model.prompt_expansion import ExpandedPrompt, expand_prompt, style_examples

    kind = "openai" if args.expand_endpoint else "hf"
    # Someone is waiting on this one request: two retries, not the five a batch job affords.
    spec = BackendSpec(kind, args.expand_model, endpoint=args.expand_endpoint, api_key_env=args.expand_api_key_env,
                       device=args.device, max_retries=2, timeout_s=60.0)  # fmt: skip
    try:
        backend = make_backend(spec)
    except BackendUnavailable as exc:
        why = one_line(exc)
        logger.warning("prompt expansion unavailable (%s); generating with the original prompt", why)
        return ExpandedPrompt(args.prompt, args.prompt, False, args.expand_model, f"prompt expansion failed ({why}); the original prompt was used")
    try:
        return expand_prompt(args.prompt, style_examples(read_bundle_config(bundle).extra), backend)
    finally:
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
