"""report.html rendered by a real headless Chromium from a real (Ray-free) ingest output:
histograms with thresholds, reject reasons, and thumbnails that actually decode."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from infra.config import load_config
from pipelines.discover import discover_sources
from pipelines.filters import FILTERS
from infra.footage import FootageSpec, varied_shots, write_video
from pipelines.probe import probe_source, size_reject
from pipelines.process import IngestSettings, SourceProcessor
from pipelines.report import render_report, write_report
from pipelines.output import MANIFEST, REJECTS, SOURCES, OutputDir
from pipelines.pack import pack, write_stats
from pipelines.work import write_source_result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]  # fmt: skip


class _Elements(HTMLParser):
    """Every start tag with its attributes, in document order, and the page text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text = ""

    def handle_data(self, data: str) -> None:
        self.text += data

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in wanted.items())]


SETTINGS = ["clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=64x64"]


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory, bad_footage, copy_footage) -> Path:
    """Kept clips, a frozen shot (filter rejects), short-scene rejects, bad files, a source too small
    for clips.size, and a source that yields no kept clip (nothing but a frozen shot)."""
    src = tmp_path_factory.mktemp("footage")
    for i in range(2):
        shots = varied_shots([("moving", 2.5), ("static", 2.5), ("moving", 2.5)], offset=6 * i)
        write_video(FootageSpec(f"v{i}", "mp4", "libx264", 160, 120, Fraction(12), shots), src / f"v{i}.mp4")
    copy_footage(bad_footage, src / "bad")
    write_video(FootageSpec("tiny", "mp4", "libx264", 40, 30, Fraction(12), varied_shots([("moving", 1.0)])), src / "tiny.mp4")
    write_video(FootageSpec("frozen", "mp4", "libx264", 160, 120, Fraction(12), varied_shots([("static", 3.0)], offset=3)),
                src / "frozen.mp4")  # fmt: skip
    return src


def _ingest(src: Path, out_dir: Path, overrides: list[str]) -> Path:
    """What run_ingest does, without Ray: process every source, pack, stats, report."""
    cfg = load_config(None, overrides)
    processor = SourceProcessor(IngestSettings.from_config(cfg))
    out = OutputDir(str(out_dir))
    out.make_dirs()
    for source in discover_sources([str(src)]):
        row = size_reject(source.as_row() | probe_source(source.uri), cfg.clips)
        write_source_result(out, row, processor(row) if row["reject_stage"] is None else [])
    result = pack(out, cfg.filters.dedup_hamming if cfg.filters.mode == "filter" else None, cfg.shards.target_mb)
    stats = write_stats(out, result, 1.0, {}, "0123456789abcdef", {"reelforge": "test"})
    write_report(out, cfg.filters, stats)
    return Path(out.root)


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory, footage: Path) -> Path:
    return _ingest(footage, tmp_path_factory.mktemp("out"), SETTINGS)


@pytest.fixture(scope="module")
def score_output(tmp_path_factory: pytest.TempPathFactory, footage: Path) -> Path:
    return _ingest(footage, tmp_path_factory.mktemp("score-out"), [*SETTINGS, "filters.mode=score"])


def _dom(output: Path, tmp_path: Path) -> _Elements:
    dom = _Elements()
    dom.feed(_chromium(["--virtual-time-budget=5000", "--dump-dom", (output / "report.html").as_uri()], tmp_path))
    return dom


def _chromium(args: list[str], tmp_path: Path) -> str:
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium); report.html is rendered in a real browser")
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)
    return done.stdout


def test_report_renders_in_a_browser_with_histograms_reasons_and_decoded_thumbnails(output: Path, tmp_path: Path) -> None:
    dom = _dom(output, tmp_path)
    cfg = load_config(None, [])

    # One histogram per filter, bars drawn, a red line per configured bound at its value.
    for name, (_, min_field, max_field) in FILTERS.items():
        (figure,) = dom.find("figure", data_filter=name)
        assert int(figure["data-count"]) > 0
        bounds = {getattr(cfg.filters, f) for f in (min_field, max_field) if f and getattr(cfg.filters, f) is not None}
        lines = [a for t, a in dom.elements if t == "line" and a.get("class") == "threshold"]
        assert bounds <= {float(a["data-value"]) for a in lines}
    assert dom.find("rect", **{"class": "bar kept"}) and dom.find("rect", **{"class": "bar rejected"})

    # One row per reject stage, with the count rejects.parquet holds.
    stages = pq.read_table(output / REJECTS, columns=["stage"]).column("stage").to_pylist()
    rows = {a["data-stage"] for a in dom.find("tr", **{"class": "reason"})}
    assert rows == set(stages) and {"probe", "clips", "size"} <= rows and any(s.startswith("filter:") for s in rows)
    assert "source 40x30 needs 2.13x upscaling to 64x64; clips.max_upscale is 2.0" in dom.text

    # Thumbnails: a kept section and per-stage sections; the in-page script saw every one decode.
    groups = {a["data-group"] for a in dom.find("section", **{"class": "thumbs"})}
    assert "kept" in groups and any(g.startswith("filter:") for g in groups)
    images = dom.find("img", **{"class": "thumb"})
    assert images and all(int(a["data-natural-width"]) > 0 for a in images)
    (check,) = dom.find("p", id="thumb-check")
    assert check["data-decoded"] == check["data-total"] == str(len(images))


def test_report_names_every_source_without_a_kept_clip_first(output: Path, tmp_path: Path) -> None:
    """14 of 29 real sources gave no clip and the report said "sources rejected 0". Every source now
    has a row (clips kept, clips rejected by stage), those without a kept clip first and counted apart."""
    dom = _dom(output, tmp_path)
    sources = pq.read_table(output / SOURCES).to_pylist()
    rows = dom.find("tr", **{"class": "source"})
    assert len(rows) == len(sources)
    no_clip = [s for s in sources if s["status"] == "ok" and s["clips_kept"] == 0]
    assert [Path(s["uri"]).name for s in no_clip] == ["frozen.mp4"]
    statuses = [r["data-status"] for r in rows]
    assert statuses[0] == "no kept clip" and statuses.count("no kept clip") == 1
    assert statuses.index("ok") > max(i for i, status in enumerate(statuses) if status.startswith("rejected: "))
    rejects = pq.read_table(output / REJECTS).to_pylist()
    assert int(rows[0]["data-rejected"]) == sum(1 for r in rejects if r["id"] and r["uri"] == no_clip[0]["uri"]) > 0
    assert {int(r["data-kept"]) for r in rows if r["data-status"] == "ok"} == {s["clips_kept"] for s in sources if s["clips_kept"]}
    assert no_clip[0]["uri"] in dom.text and "filter:" in dom.text.split(no_clip[0]["uri"])[1][:200]
    assert "of which without a kept clip1" in dom.text  # the totals row: label cell, then the count
    (mode,) = dom.find("p", id="mode")
    assert mode["data-mode"] == "filter"


def test_score_mode_report_is_marked_and_counts_what_each_bound_would_reject(score_output: Path, tmp_path: Path) -> None:
    dom = _dom(score_output, tmp_path)
    (mode,) = dom.find("p", id="mode")
    assert mode["data-mode"] == "score" and "Score-only run" in dom.text
    rejects = pq.read_table(score_output / REJECTS, columns=["stage"]).column("stage").to_pylist()
    assert not [stage for stage in rejects if stage.startswith("filter:")]
    filters = load_config(None, []).filters
    manifest = pq.read_table(score_output / MANIFEST).to_pylist()
    bounds = {a["data-field"]: a["data-failing"] for a in dom.find("tr", **{"class": "bound"})}
    for name, (_, min_field, max_field) in FILTERS.items():
        scores = [r[f"score_{name}"] for r in manifest]
        if min_field:
            assert bounds[min_field] == str(sum(v < getattr(filters, min_field) for v in scores))
        if max_field:
            assert bounds[max_field] == str(sum(v > getattr(filters, max_field) for v in scores))
    # The frozen shots are kept in score mode, and the static bound says how many it would reject.
    assert int(bounds["max_static_fraction"]) > 0 and "would fail" in dom.text


def test_report_screenshot_is_not_blank(output: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,1600", (output / "report.html").as_uri()], tmp_path)
    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    assert pixels.size == (1200, 1600) and colours is not None and len(colours) > 50


def test_report_of_an_output_without_clips_still_renders() -> None:
    stats = {"clips": {"kept": 0, "rejected": 0}, "sources": {"ok": 0, "rejected": 1}, "source_seconds": 0.0,
             "clip_seconds": 0.0, "shards": [], "config_hash": "x"}  # fmt: skip
    page = render_report(None, None, None, load_config(None, []).filters, stats)
    assert "no scores" in page and "Nothing was rejected" in page and "No thumbnails" in page


def test_histogram_axis_follows_the_scores_and_pins_far_bounds_to_the_edge() -> None:
    """Real footage: motion 0.3-9 against filters.max_motion 40 used to squeeze every clip into the
    first bins; the axis now spans the scores and the far bound is drawn, dashed, at the edge."""
    import pyarrow as pa

    motion = [0.3, 0.7, 1.1, 2.6, 3.5, 4.4, 8.7, 9.1]
    columns = {f"score_{name}": [50.0 + i for i in range(len(motion))] for name in FILTERS}
    columns["score_motion"] = motion
    filters = load_config(None, []).filters
    stats = {"clips": {"kept": len(motion), "rejected": 0}, "sources": {"ok": 1, "rejected": 0}, "source_seconds": 1.0,
             "clip_seconds": 1.0, "shards": [], "config_hash": "x"}  # fmt: skip
    dom = _Elements()
    dom.feed(render_report(pa.table(columns), None, None, filters, stats))
    svg_start = next(i for i, (t, a) in enumerate(dom.elements) if t == "figure" and a.get("data-filter") == "motion")
    svg_end = next(i for i, (t, a) in enumerate(dom.elements) if i > svg_start and t == "figure")
    shapes = dom.elements[svg_start:svg_end]
    bars = [float(a["x"]) for t, a in shapes if t == "rect"]
    lines = {float(a["data-value"]): a for t, a in shapes if t == "line" and a.get("class") == "threshold"}
    # Bars spread over most of the plot, not the first tenth of it.
    assert max(bars) - min(bars) > 0.8 * (420 - 2 * 28 - 420 / 30)
    # min_motion 0.2 is within the scores' reach: drawn where it is; max_motion 40 is pinned, dashed.
    assert set(lines) == {filters.min_motion, filters.max_motion}
    assert "data-off-scale" not in lines[filters.min_motion]
    assert lines[filters.max_motion]["data-off-scale"] == "1"
    assert float(lines[filters.max_motion]["x1"]) == pytest.approx(420 - 28, abs=0.1)


def test_one_outlier_goes_to_an_overflow_bar_instead_of_stretching_the_axis() -> None:
    """Real footage: one sharpness outlier at 1.8e4 stretched the axis and crammed every other clip
    into three of the 30 bins."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    sharpness = [*rng.uniform(40, 600, size=60).tolist(), 1.8e4]
    columns = {f"score_{name}": [50.0] * len(sharpness) for name in FILTERS} | {"score_sharpness": sharpness}
    stats = {"clips": {"kept": len(sharpness), "rejected": 0}, "sources": {"ok": 1, "rejected": 0}, "source_seconds": 1.0,
             "clip_seconds": 1.0, "shards": [], "config_hash": "x"}  # fmt: skip
    dom = _Elements()
    dom.feed(render_report(pa.table(columns), None, None, load_config(None, []).filters, stats))
    start = next(i for i, (t, a) in enumerate(dom.elements) if t == "figure" and a.get("data-filter") == "sharpness")
    figure = dom.elements[start][1]
    end = next(i for i, (t, _) in enumerate(dom.elements) if i > start and t == "figure")
    bars = [a for t, a in dom.elements[start:end] if t == "rect"]
    assert figure["data-overflow"] == "1" and figure["data-underflow"] == "0"
    assert float(figure["data-axis-hi"]) < 2000 and float(figure["data-axis-lo"]) <= min(sharpness)
    (outlier,) = [a for a in bars if "outlier" in a["class"]]
    assert float(outlier["x"]) == max(float(a["x"]) for a in bars)  # the last bar
    regular = [float(a["x"]) for a in bars if "outlier" not in a["class"]]
    assert len(regular) > 15 and max(regular) - min(regular) > 0.8 * (420 - 2 * 28) * 30 / 31 - 420 / 31
    assert "1 above" in dom.text and "max 1.8e+04" in dom.text
