"""Fixtures of the pipelines tests: real footage through the real SourceProcessor (no Ray)."""

from __future__ import annotations

import copy
import shutil
from fractions import Fraction
from pathlib import Path

import pytest

from infra.config import load_config
from infra.footage import FootageSpec, varied_shots, write_video
from pipelines.discover import discover_sources
from pipelines.output import OutputDir
from pipelines.probe import probe_source
from pipelines.process import IngestSettings, SourceProcessor
from pipelines.work import write_source_result

# Tiny clips so each source yields a few kept clips in well under a second.
OVERRIDES = ["clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=64x64", "filters.dedup_hamming=0"]


@pytest.fixture(scope="session")
def processed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, list[dict]]]:
    """{name: (probe row + discovery facts, processor rows)} for three sources and an exact copy."""
    src = tmp_path_factory.mktemp("footage")
    for i, (container, codec) in enumerate([("mp4", "libx264"), ("avi", "mpeg4"), ("mkv", "libx264")]):
        shots = varied_shots([("moving", 2.5), ("moving", 2.5), ("moving", 2.5)], offset=5 * i)
        write_video(FootageSpec(f"v{i}", container, codec, 160, 120, Fraction(12), shots), src / f"v{i}.{container}")
    shutil.copy(src / "v0.mp4", src / "v0_copy.mp4")
    processor = SourceProcessor(IngestSettings.from_config(load_config(None, OVERRIDES)))
    result = {}
    for source in discover_sources([str(src)]):
        row = source.as_row() | probe_source(source.uri)
        result[Path(source.uri).stem] = (row, processor(row))
    return result


@pytest.fixture(scope="session")
def write_processed(processed):
    """`write_processed(out, names)`: the work results of those `processed` sources, as a worker writes them."""

    def write(out: OutputDir, names: list[str]) -> None:
        for name in names:
            source, rows = copy.deepcopy(processed[name])
            write_source_result(out, source, iter(rows))

    return write
