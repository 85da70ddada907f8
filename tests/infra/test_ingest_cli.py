"""`reelforge ingest`'s end-of-run summary (infra/ingest.py): sources that yield no kept clip are
named and counted apart from whole-source rejects, and a rerun that finds nothing new says so
instead of repeating the last run's figures. End to end on a real local Ray and real footage."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from infra.footage import FootageSpec, varied_shots, write_video
from infra.ingest import main, summary_table

SETTINGS = ["clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=64x64", "caption.backend=none"]
ARGS = [arg for setting in SETTINGS for arg in ("--set", setting)]


def _table(text: str) -> dict[str, list[str]]:
    """The summary's main table: row name -> [this run, output total]."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] and not cells[0].startswith("-"):
            rows.setdefault(cells[0], cells[1:])
    return rows


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One source with clips, one that yields none (nothing but a frozen shot), one empty file."""
    src = tmp_path_factory.mktemp("src")
    moving = varied_shots([("moving", 2.5), ("moving", 2.5)], offset=1)
    write_video(FootageSpec("moving", "mp4", "libx264", 160, 120, Fraction(12), moving), src / "moving.mp4")
    frozen = varied_shots([("static", 3.0)], offset=3)
    write_video(FootageSpec("frozen", "mp4", "libx264", 160, 120, Fraction(12), frozen), src / "frozen.mp4")
    (src / "empty.mp4").write_bytes(b"")
    return src


@pytest.mark.slow
def test_summary_names_sources_without_clips_and_a_rerun_says_nothing_new(
    ray_local, footage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main([str(footage), "--out", str(out), *ARGS]) == 0
    first = capsys.readouterr().out
    rows = _table(first)
    # The frozen source is processed ("ok"), yields no clip, and is counted and named apart from the
    # empty file, which is rejected whole.
    assert rows["sources ok / rejected"] == ["2 / 1", "2 / 1"]
    assert rows["sources without a kept clip"] == ["1", "1"]
    assert f"| {footage / 'empty.mp4'} | probe |" in first
    named = [line for line in first.splitlines() if line.startswith(f"| {footage / 'frozen.mp4'} |")]
    assert len(named) == 1 and "filter:" in named[0]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources_without_clips"] == 1 and stats["last_run"]["no_clip_sources"][0]["uri"] == str(footage / "frozen.mp4")

    assert main([str(footage), "--out", str(out), *ARGS]) == 0
    again = capsys.readouterr().out
    rows = _table(again)
    assert rows.pop("sources ok / rejected") == ["nothing new", "2 / 1"]
    # None of the first run's figures reappears as this run's; the totals are unchanged.
    assert {name: this_run for name, (this_run, _) in rows.items()} == dict.fromkeys(rows, "")
    assert {name: total for name, (_, total) in rows.items()} == {name: total for name, (_, total) in _table(first).items() if name in rows}
    assert str(footage / "frozen.mp4") not in again


def test_summary_of_a_rerun_with_nothing_new_leaves_this_run_empty() -> None:
    run = {"sources": 3, "sources_rejected": 1, "clips_kept": 7, "rejected_by_stage": {"clips": 4}, "source_seconds": 36.0,
           "clip_seconds": 14.0, "wall_s": 12.5, "source_seconds_per_wall_s": 2.9, "new_shards": ["shard-000000.tar"],
           "rejected_sources": [{"uri": "/x/empty.mp4", "stage": "probe", "reason": "empty file"}],
           "sources_without_clips": 1, "no_clip_sources": [{"uri": "/x/frozen.mp4", "clips_rejected": 2,
                                                              "rejected_by_stage": {"filter:motion": 2}}]}  # fmt: skip
    stats = {"sources": {"total": 3, "ok": 2, "rejected": 1}, "sources_without_clips": 1,
             "clips": {"kept": 7, "rejected": 4, "rejected_by_stage": {"clips": 4}}, "sources_rejected_by_stage": {"probe": 1},
             "source_seconds": 36.0, "clip_seconds": 14.0, "shards": ["shard-000000.tar"], "last_run": run}  # fmt: skip
    fresh = summary_table(stats)
    assert _table(fresh)["clips kept"] == ["7", "7"] and "| /x/frozen.mp4 | filter:motion 2 |" in fresh
    assert "| /x/empty.mp4 | probe | empty file |" in fresh

    rerun = summary_table(stats | {"nothing_new": True})
    rows = _table(rerun)
    assert rows["sources ok / rejected"] == ["nothing new", "2 / 1"]
    assert rows["clips kept"] == ["", "7"] and rows["wall time (s)"] == ["", ""] and rows["rejected: clips"] == ["", "4"]
    assert "/x/frozen.mp4" not in rerun and "/x/empty.mp4" not in rerun
