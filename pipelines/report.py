"""report.html: one static, self-contained page about an ingest output.

No external assets (it is opened from buckets, CI artifacts and laptops alike): histograms
are inline SVG, thumbnails are base64 JPEG data URIs, and a few lines of inline script only
annotate the page after load (how many thumbnails decoded), which the browser test reads.

Sections: totals (a score-only run, `filters.mode=score`, is marked as such); per filter bound,
how many clips fail it (would fail, in score mode); per filter, a histogram of `score_<filter>`
over kept and rejected clips with the configured bounds drawn as red lines and far outliers
gathered in an overflow bar; counts per reject stage with example reasons; one row per source
(clips kept, clips rejected by stage), sources without a kept clip first; thumbnails of sampled
kept clips and of rejected clips per stage (the bounded, stable sample kept in
`_work/report-samples.parquet` by pipelines.pack).
"""

from __future__ import annotations

import base64
import html
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import FiltersConfig
from pipelines.filters import FILTERS
from pipelines.output import MANIFEST, REJECTS, REPORT, SAMPLES, SOURCES, OutputDir

logger = logging.getLogger(__name__)

NUM_BINS = 30
SVG_W, SVG_H, PAD = 420, 160, 28
# Scores past Tukey's far fences (this many interquartile ranges beyond the quartiles) go into an
# overflow bar instead of stretching the axis.
OUTLIER_IQRS = 3.0
# Rows of the per-source table; sources without a kept clip and rejected ones come first.
MAX_SOURCE_ROWS = 500


def write_report(out: OutputDir, filters: FiltersConfig, stats: dict[str, Any]) -> str:
    """Render report.html into `out`; returns the HTML."""
    manifest = out.read_table(MANIFEST)
    rejects = out.read_table(REJECTS)
    samples = out.read_table(SAMPLES)
    sources = out.read_table(SOURCES)
    page = render_report(manifest, rejects, samples, filters, stats, sources)
    out.write_bytes(REPORT, page.encode())
    return page


def render_report(
    manifest: pa.Table | None,
    rejects: pa.Table | None,
    samples: pa.Table | None,
    filters: FiltersConfig,
    stats: dict[str, Any],
    sources: pa.Table | None = None,
) -> str:
    parts = [_mode(filters), _totals(stats), _bounds(manifest, rejects, filters)]
    parts.append("<h2>Filter scores</h2>")
    for name, (_, min_field, max_field) in FILTERS.items():
        column = f"score_{name}"
        kept = _column(manifest, column)
        rejected = _column(rejects, column)
        bounds = [(f"filters.{f}", getattr(filters, f)) for f in (min_field, max_field) if f and getattr(filters, f) is not None]
        parts.append(_histogram(name, kept, rejected, bounds))
    parts.append(_reasons(rejects))
    parts.append(_sources(sources, rejects))
    parts.append(_thumbnails(samples))
    return _PAGE.format(body="\n".join(parts), thumb_check=THUMB_CHECK)


def _mode(filters: FiltersConfig) -> str:
    if filters.mode == "score":
        return (
            '<p id="mode" data-mode="score" class="banner"><b>Score-only run</b> (filters.mode=score): no clip was '
            "rejected by a filter; the bounds below say how many clips each one would reject.</p>"
        )
    return '<p id="mode" data-mode="filter">Filters applied (filters.mode=filter).</p>'


def _column(table: pa.Table | None, name: str) -> np.ndarray:
    if table is None or name not in table.column_names:
        return np.zeros(0)
    values = [v for v in table.column(name).to_pylist() if v is not None]
    return np.asarray(values, dtype=np.float64)


def _totals(stats: dict[str, Any]) -> str:
    clips, sources = stats["clips"], stats["sources"]
    rows = [
        ("sources ok", sources["ok"]),
        ("of which without a kept clip", stats.get("sources_without_clips", "?")),
        ("sources rejected", sources["rejected"]),
        ("clips kept", clips["kept"]),
        ("clips rejected", clips["rejected"]),
        ("source hours", f"{stats['source_seconds'] / 3600:.3f}"),
        ("clip hours", f"{stats['clip_seconds'] / 3600:.3f}"),
        ("shards", len(stats["shards"])),
        ("config hash", stats["config_hash"]),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<h2>Totals</h2><table id="totals">{cells}</table>'


def _bounds(manifest: pa.Table | None, rejects: pa.Table | None, filters: FiltersConfig) -> str:
    """Per configured bound, the scored clips beyond it. Each bound is counted on its own: in filter
    mode a clip rejected by one filter also counts under every other bound it fails."""
    verb = "would fail" if filters.mode == "score" else "fail"
    rows = []
    for name, (_, min_field, max_field) in FILTERS.items():
        scores = np.concatenate([_column(manifest, f"score_{name}"), _column(rejects, f"score_{name}")])
        for field, below in ((min_field, True), (max_field, False)):
            if field is None:
                continue
            bound = getattr(filters, field)
            failing = "" if bound is None else int((scores < bound).sum() if below else (scores > bound).sum())
            shown = "off" if bound is None else f"{'&lt;' if below else '&gt;'} {bound:g}"
            rows.append(f'<tr class="bound" data-field="{field}" data-failing="{failing}"><td>{name}</td>'
                        f"<td>filters.{field}</td><td>{shown}</td><td>{failing}</td><td>{scores.size}</td></tr>")  # fmt: skip
    head = f"<tr><th>filter</th><th>bound</th><th>value</th><th>clips that {verb} it</th><th>of scored clips</th></tr>"
    return f'<h2>Filter bounds</h2><table id="bounds">{head}{"".join(rows)}</table>'


def _histogram(name: str, kept: np.ndarray, rejected: np.ndarray, bounds: list[tuple[str, float]]) -> str:
    """Stacked histogram (kept below, rejected on top) with a red line per configured bound, and a
    bar at either end for the scores beyond the axis (far outliers, see _axis_range)."""
    values = np.concatenate([kept, rejected])
    if values.size == 0:
        return f'<figure class="hist" data-filter="{name}"><figcaption>{name}: no scores</figcaption></figure>'
    lo, hi = _axis_range(values, [value for _, value in bounds])
    under = (int((kept < lo).sum()), int((rejected < lo).sum()))
    over = (int((kept > hi).sum()), int((rejected > hi).sum()))
    edges = np.linspace(lo, hi, NUM_BINS + 1)
    slots = [under] if sum(under) else []  # (kept, rejected) per bar, left to right
    slots += list(zip(np.histogram(kept, edges)[0].tolist(), np.histogram(rejected, edges)[0].tolist()))
    slots += [over] if sum(over) else []
    tallest = max(1, max(k + r for k, r in slots))
    plot_w, plot_h = SVG_W - 2 * PAD, SVG_H - 2 * PAD
    bar_w = plot_w / len(slots)
    axis_lo = PAD + (bar_w if sum(under) else 0.0)  # where the regular bins start and end
    axis_hi = axis_lo + NUM_BINS * bar_w

    shapes = []
    for i, (k, r) in enumerate(slots):
        x, base = PAD + i * bar_w, PAD + plot_h
        k_h, r_h = k / tallest * plot_h, r / tallest * plot_h
        outlier = " outlier" if (i == 0 and sum(under)) or (i == len(slots) - 1 and sum(over)) else ""
        if k:
            shapes.append(_bar(f"kept{outlier}", x, base - k_h, bar_w - 1, k_h))
        if r:
            shapes.append(_bar(f"rejected{outlier}", x, base - k_h - r_h, bar_w - 1, r_h))
    shapes += [_bound_line(label, value, lo, hi, axis_lo, axis_hi, plot_h) for label, value in bounds]
    axis = (
        f'<line class="axis" x1="{PAD}" x2="{PAD + plot_w}" y1="{PAD + plot_h}" y2="{PAD + plot_h}"/>'
        f'<text x="{axis_lo}" y="{SVG_H - 8}">{lo:.3g}</text>'
        f'<text x="{axis_hi}" y="{SVG_H - 8}" text-anchor="end">{hi:.3g}</text>'
        f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end">{tallest}</text>'
    )
    caption = f"{name}: {kept.size} kept, {rejected.size} rejected clips"
    if sum(under):
        caption += f"; {sum(under)} below {lo:.3g} (min {values.min():.3g}) in the first bar"
    if sum(over):
        caption += f"; {sum(over)} above {hi:.3g} (max {values.max():.3g}) in the last bar"
    return (
        f'<figure class="hist" data-filter="{name}" data-count="{values.size}" data-underflow="{sum(under)}" '
        f'data-overflow="{sum(over)}" data-axis-lo="{lo:g}" data-axis-hi="{hi:g}">'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" viewBox="0 0 {SVG_W} {SVG_H}">'
        f"{axis}{''.join(shapes)}</svg><figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _bound_line(label: str, value: float, lo: float, hi: float, axis_lo: float, axis_hi: float, plot_h: float) -> str:
    """A red line at a bound; one far outside the axis is pinned to the nearer edge, dashed, its label saying so."""
    off_scale = "" if lo <= value <= hi else ("&lt; " if value < lo else " &gt;")
    x = axis_lo + (min(max(value, lo), hi) - lo) / (hi - lo) * (axis_hi - axis_lo)
    text = f"{html.escape(label)} {value:g}"
    text = f"{off_scale}{text}" if off_scale.startswith("&lt;") else f"{text}{off_scale}"
    dash = ' stroke-dasharray="4 3" data-off-scale="1"' if off_scale else ""
    return (
        f'<line class="threshold" data-value="{value:g}"{dash} x1="{x:.1f}" x2="{x:.1f}" y1="{PAD - 6}" y2="{PAD + plot_h}"/>'
        # Labels of bounds on the right half hang to the left of their line, so they stay on the canvas.
        f'<text class="threshold-label" x="{x + 3 if x < SVG_W / 2 else x - 3:.1f}" y="{PAD - 8}" '
        f'text-anchor="{"start" if x < SVG_W / 2 else "end"}">{text}</text>'
    )


def _axis_range(values: np.ndarray, bounds: list[float]) -> tuple[float, float]:
    """x range of a histogram: the scores without far outliers, widened to take in each bound that
    lies within one score-span of them.

    Far outliers are scores past Tukey's far fences, OUTLIER_IQRS interquartile ranges beyond the
    quartiles; the histogram counts them in a bar at the end. Real footage: one sharpness outlier at
    1.8e4 stretched the axis and crammed every other clip into three of the 30 bins. Bounds: real
    footage scores motion 0.3-9 against max_motion 40, and a range forced out to every bound
    squeezed all clips into the first few bins."""
    q1, q3 = (float(q) for q in np.percentile(values, [25, 75]))
    inliers = values
    if q3 > q1:  # with no spread (most scores equal) nothing is an outlier
        inliers = values[(values >= q1 - OUTLIER_IQRS * (q3 - q1)) & (values <= q3 + OUTLIER_IQRS * (q3 - q1))]
    lo, hi = float(inliers.min()), float(inliers.max())
    span = max(hi - lo, 1e-9)
    near = [b for b in bounds if lo - span <= b <= hi + span]
    lo, hi = min([lo, *near]), max([hi, *near])
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _bar(kind: str, x: float, y: float, width: float, height: float) -> str:
    return f'<rect class="bar {kind}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}"/>'


def _reasons(rejects: pa.Table | None) -> str:
    if rejects is None or rejects.num_rows == 0:
        return '<h2>Reject reasons</h2><p id="no-rejects">Nothing was rejected.</p>'
    stages = rejects.column("stage").to_pylist()
    reasons = rejects.column("reason").to_pylist()
    ids = rejects.column("id").to_pylist()
    counts = Counter(stages)
    examples: dict[str, list[str]] = {}
    for stage, reason in zip(stages, reasons):
        bucket = examples.setdefault(stage, [])
        if reason and reason not in bucket and len(bucket) < 3:
            bucket.append(reason)
    rows = []
    for stage, count in counts.most_common():
        sources = sum(1 for s, i in zip(stages, ids) if s == stage and i is None)
        example = "<br>".join(html.escape(r) for r in examples[stage])
        rows.append(f'<tr class="reason" data-stage="{html.escape(stage)}"><td>{html.escape(stage)}</td>'
                    f"<td>{count}</td><td>{sources}</td><td>{example}</td></tr>")  # fmt: skip
    head = "<tr><th>stage</th><th>rejects</th><th>of which whole sources</th><th>example reasons</th></tr>"
    return f'<h2>Reject reasons</h2><table id="reasons">{head}{"".join(rows)}</table>'


def _sources(sources: pa.Table | None, rejects: pa.Table | None) -> str:
    """One row per source: clips kept and clips rejected by stage. Sources without a kept clip come
    first, then those rejected whole, then the rest, so none of them is lost below the fold."""
    if sources is None or sources.num_rows == 0:
        return '<h2>Sources</h2><p id="no-sources">No source was processed.</p>'
    by_source: dict[str, Counter] = {}
    if rejects is not None and "source_key" in rejects.column_names:
        columns = (rejects.column(n).to_pylist() for n in ("source_key", "id", "stage"))
        for key, clip_id, stage in zip(*columns):
            if clip_id is not None:
                by_source.setdefault(key, Counter())[stage] += 1
    rows = []
    for row in sources.select(["source_key", "uri", "status", "reject_stage", "clips_kept"]).to_pylist():
        status = f"rejected: {row['reject_stage']}" if row["status"] == "rejected" else "ok" if row["clips_kept"] else "no kept clip"
        rows.append((0 if status == "no kept clip" else 1 if row["status"] == "rejected" else 2, row["uri"], status, row))
    cells = []
    for _, uri, status, row in sorted(rows, key=lambda r: r[:2])[:MAX_SOURCE_ROWS]:
        rejected = by_source.get(row["source_key"], Counter())
        by_stage = ", ".join(f"{stage} {count}" for stage, count in sorted(rejected.items()))
        cells.append(f'<tr class="source" data-status="{html.escape(status)}" data-kept="{row["clips_kept"]}" '
                     f'data-rejected="{sum(rejected.values())}"><td>{html.escape(uri)}</td><td>{html.escape(status)}</td>'
                     f"<td>{row['clips_kept']}</td><td>{html.escape(by_stage)}</td></tr>")  # fmt: skip
    more = len(rows) - MAX_SOURCE_ROWS
    tail = f'<p id="more-sources">... and {more} more sources (sources.parquet).</p>' if more > 0 else ""
    head = "<tr><th>source</th><th>status</th><th>clips kept</th><th>clips rejected, by stage</th></tr>"
    return f'<h2>Sources</h2><table id="sources">{head}{"".join(cells)}</table>{tail}'


def _thumbnails(samples: pa.Table | None) -> str:
    if samples is None or samples.num_rows == 0:
        return "<h2>Thumbnails</h2><p>No thumbnails.</p>"
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in samples.to_pylist():
        groups.setdefault(row["group"], []).append(row)
    order = ["kept"] + sorted(g for g in groups if g != "kept")
    parts = ["<h2>Thumbnails</h2>"]
    for group in (g for g in order if g in groups):
        title = "sampled kept clips" if group == "kept" else f"rejected: {group}"
        images = []
        for row in groups[group]:
            data = base64.b64encode(row["thumbnail"]).decode()
            tip = html.escape(row["id"] + (f" — {row['reason']}" if row["reason"] else ""))
            images.append(f'<img class="thumb" alt="{tip}" title="{tip}" src="data:image/jpeg;base64,{data}">')
        parts.append(
            f'<section class="thumbs" data-group="{html.escape(group)}"><h3>{html.escape(title)}</h3>{"".join(images)}</section>'
        )
    return "\n".join(parts)


# Annotates a report page after load so that a headless browser's DOM dump shows whether every
# thumbnail (img.thumb) decoded; the browser tests read #thumb-check. Shared with the caption report.
THUMB_CHECK = """<p id="thumb-check">thumbnails not checked yet</p>
<script>
// Annotates the page after load so a headless browser dump shows whether every thumbnail decoded.
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img.thumb"), decoded = 0;
  images.forEach(function (img) {
    img.setAttribute("data-natural-width", img.naturalWidth);
    if (img.complete && img.naturalWidth > 0) decoded += 1;
  });
  var check = document.getElementById("thumb-check");
  check.setAttribute("data-decoded", decoded);
  check.setAttribute("data-total", images.length);
  check.textContent = decoded + " of " + images.length + " thumbnails decoded";
});
</script>
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reelforge ingest report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
figure.hist {{ display: inline-block; margin: 0 1em 1em 0; }}
rect.kept {{ fill: #4a7fb5; }} rect.rejected {{ fill: #e0a040; }} rect.outlier {{ opacity: 0.55; }}
p.banner {{ background: #fff3cd; border: 1px solid #e0c060; padding: 6px 10px; }}
line.threshold {{ stroke: #d00; stroke-width: 2; }} text.threshold-label {{ fill: #d00; font-size: 10px; }}
line.axis {{ stroke: #555; }} svg text {{ font-size: 10px; fill: #555; }}
img.thumb {{ margin: 2px; border: 1px solid #ddd; }}
</style></head>
<body><h1>reelforge ingest report</h1>
<p>Histograms: kept clips in blue, rejected clips stacked in orange; red lines are the configured bounds;
a paler bar at either end holds the scores beyond the axis (far outliers).</p>
{body}
{thumb_check}</body></html>
"""
