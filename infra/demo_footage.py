"""`reelforge demo-footage DIR [--suite demo|standard|storm|bad|all]`: write synthetic footage with known
cuts and captions (infra/footage), plus truth.json. `storm` is continuous, fast-changing content (a
music visualiser) on which PySceneDetect's ContentDetector fires on nearly every frame."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from infra.footage import GeneratedVideo, bad_files, damaged_files, demo_suite, standard_suite, storm_suite, write_truth
from infra.logs import setup_logging

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reelforge demo-footage",
        description="Write synthetic footage with known cuts and captions, plus truth.json.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the files and truth.json into")
    parser.add_argument("--suite", choices=("demo", "standard", "storm", "bad", "all"), default="demo")
    args = parser.parse_args(argv)
    setup_logging()

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"out_dir {str(out_dir)!r} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    videos: list[GeneratedVideo] = []
    bad: dict[str, Path] = {}
    damaged: dict[str, Path] = {}
    if args.suite in ("demo", "all"):
        videos += demo_suite(out_dir)
    if args.suite in ("standard", "all"):
        videos += standard_suite(out_dir)
    if args.suite in ("storm", "all"):
        videos += storm_suite(out_dir)
    if args.suite in ("bad", "all"):
        bad = bad_files(out_dir)
        damaged = damaged_files(out_dir)
    truth = write_truth(videos, out_dir / "truth.json", bad, damaged)

    print("| file | size | fps | frames | seconds | hard cuts |")
    print("|---|---|---|---|---|---|")
    for v in videos:
        s = v.spec
        print(f"| {v.path.name} | {s.width}x{s.height} | {float(s.fps):.3f}{' vfr' if s.vfr else ''} | "
              f"{v.num_frames} | {v.duration_s:.2f} | {len(v.cut_times_s)} |")  # fmt: skip
    for kind, files in (("bad", bad), ("damaged", damaged)):
        for name, file_path in files.items():
            print(f"| {file_path.name} | {kind}: {name} | | | | |")
    logger.info("wrote %d videos, %d bad and %d damaged files, and %s", len(videos), len(bad), len(damaged), truth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
