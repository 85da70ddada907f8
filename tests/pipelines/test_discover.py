"""discover_sources on real folders: files, folders, globs, file:// URIs, sidecars and typos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.discover import discover_sources, is_video_name, source_key


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for name in ["a.mp4", "b.MOV", "sub/c.mkv", "sub/deep/d.webm", "sub/deep/e.ogv", "f.mts"]:
        _touch(tmp_path / name)
    for name in ["a.txt", "a.json", "sub/c.srt", "notes.md", ".hidden.mp4", "._b.MOV", ".cache/g.mp4"]:
        _touch(tmp_path / name)
    return tmp_path


def _names(sources, root: Path) -> list[str]:
    return [os.path.relpath(s.uri, root) for s in sources]


def test_folder_is_walked_recursively_keeping_only_videos(tree: Path) -> None:
    sources = discover_sources([str(tree)])
    assert _names(sources, tree) == ["a.mp4", "b.MOV", "f.mts", "sub/c.mkv", "sub/deep/d.webm", "sub/deep/e.ogv"]
    assert all(s.size_bytes == 1 and len(s.source_key) == 32 for s in sources)


def test_globs_keep_star_within_one_folder_and_globstar_across(tree: Path) -> None:
    assert _names(discover_sources([str(tree / "*.mp4")]), tree) == ["a.mp4"]
    assert _names(discover_sources([str(tree / "sub" / "*")]), tree) == ["sub/c.mkv"]
    assert _names(discover_sources([str(tree / "**" / "*.ogv")]), tree) == ["sub/deep/e.ogv"]
    assert _names(discover_sources([str(tree / "[ab].*")]), tree) == ["a.mp4", "b.MOV"]


def test_mixed_srcs_are_deduplicated_and_sorted(tree: Path) -> None:
    srcs = [f"file://{tree / 'sub'}", str(tree / "a.mp4"), str(tree / "sub" / "c.mkv"), str(tree / "*.mp4")]
    assert _names(discover_sources(srcs), tree) == ["a.mp4", "sub/c.mkv", "sub/deep/d.webm", "sub/deep/e.ogv"]


def test_an_explicit_file_is_a_source_whatever_its_extension(tree: Path) -> None:
    # The operator named it: probe decides (and rejects it with a reason) rather than discovery dropping it.
    assert _names(discover_sources([str(tree / "notes.md")]), tree) == ["notes.md"]


def test_missing_src_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.mp4"):
        discover_sources([str(tmp_path / "nope.mp4")])


def test_no_videos_at_all_is_an_error(tmp_path: Path) -> None:
    _touch(tmp_path / "readme.txt")
    with pytest.raises(ValueError, match="no video sources"):
        discover_sources([str(tmp_path)])


def test_key_changes_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = _touch(tmp_path / "a.mp4", b"one")
    first = discover_sources([str(path)])[0]
    assert discover_sources([str(path)])[0].source_key == first.source_key
    _touch(path, b"three")
    os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    assert discover_sources([str(path)])[0].source_key != first.source_key
    assert source_key("a", 1, 2) != source_key("a", 1, 3)


def test_video_names() -> None:
    assert is_video_name("x/y.M2TS") and is_video_name("clip.3gp") and not is_video_name("clip.srt")
    assert not is_video_name("x/.clip.mp4") and not is_video_name("noext")
