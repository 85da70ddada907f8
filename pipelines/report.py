"""report.html: one static, self-contained page about an ingest output.

No external assets (it is opened from buckets, CI artifacts and laptops alike): histograms
are inline SVG, thumbnails are base64 JPEG data URIs, and a few lines of inline script only
annotate the page after load (how many thumbnails decoded), which the browser test reads.

Sections: totals; per filter, a histogram of `score_<filter>` over kept and rejected clips
with the configured bounds drawn as red lines; counts per reject stage with example reasons;
thumbnails of sampled kept clips and of rejected clips per stage (the bounded, stable sample
kept in `_work/report-samples.parquet` by pipelines.pack).
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
from pipelines.output import MANIFEST, REJECTS, REPORT, SAMPLES, OutputDir

logger = logging.getLogger(__name__)

NUM_BINS = 30
SVG_W, SVG_H, PAD = 420, 160, 28


def write_report(out: OutputDir, filters: FiltersConfig, stats: dict[str, Any]) -> str:
    """Render report.html into `out`; returns the HTML."""
    manifest = out.read_table(MANIFEST)
    rejects = out.read_table(REJECTS)
    samples = out.read_table(SAMPLES)
    page = render_report(manifest, rejects, samples, filters, stats)
    out.write_bytes(REPORT, page.encode())
    return page


def render_report(
    manifest: pa.Table | None,
    rejects: pa.Table | None,
    samples: pa.Table | None,
    filters: FiltersConfig,
    stats: dict[str, Any],
) -> str:
    parts = [_totals(stats)]
    parts.append("<h2>Filter scores</h2>")
    for name, (_, min_field, max_field) in FILTERS.items():
        column = f"score_{name}"
        kept = _column(manifest, column)
        rejected = _column(rejects, column)
        bounds = [(f"filters.{f}", getattr(filters, f)) for f in (min_field, max_field) if f and getattr(filters, f) is not None]
        parts.append(_histogram(name, kept, rejected, bounds))
    parts.append(_reasons(rejects))
    parts.append(_thumbnails(samples))
    return _PAGE.format(body="\n".join(parts))


def _column(table: pa.Table | None, name: str) -> np.ndarray:
    if table is None or name not in table.column_names:
        return np.zeros(0)
    values = [v for v in table.column(name).to_pylist() if v is not None]
    return np.asarray(values, dtype=np.float64)


def _totals(stats: dict[str, Any]) -> str:
    clips, sources = stats["clips"], stats["sources"]
    rows = [
        ("sources ok", sources["ok"]),
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


def _histogram(name: str, kept: np.ndarray, rejected: np.ndarray, bounds: list[tuple[str, float]]) -> str:
    """Stacked histogram (kept below, rejected on top) with a red line per configured bound."""
    values = np.concatenate([kept, rejected])
    if values.size == 0:
        return f'<figure class="hist" data-filter="{name}"><figcaption>{name}: no scores</figcaption></figure>'
    edges_lo, edges_hi = _axis_range(values, [value for _, value in bounds])
    edges = np.linspace(edges_lo, edges_hi, NUM_BINS + 1)
    kept_counts, _ = np.histogram(kept, edges)
    rejected_counts, _ = np.histogram(rejected, edges)
    tallest = max(1, int((kept_counts + rejected_counts).max()))
    plot_w, plot_h = SVG_W - 2 * PAD, SVG_H - 2 * PAD
    bar_w = plot_w / NUM_BINS

    def x_of(value: float) -> float:
        return PAD + (value - edges_lo) / (edges_hi - edges_lo) * plot_w

    shapes = []
    for i, (k, r) in enumerate(zip(kept_counts, rejected_counts)):
        x = PAD + i * bar_w
        k_h, r_h = k / tallest * plot_h, r / tallest * plot_h
        base = PAD + plot_h
        if k:
            shapes.append(_bar("kept", x, base - k_h, bar_w - 1, k_h))
        if r:
            shapes.append(_bar("rejected", x, base - k_h - r_h, bar_w - 1, r_h))
    for label, value in bounds:
        # A bound far outside the scores is pinned to the nearer edge, dashed, its label saying so.
        off_scale = "" if edges_lo <= value <= edges_hi else ("&lt; " if value < edges_lo else " &gt;")
        x = x_of(min(max(value, edges_lo), edges_hi))
        text = f"{html.escape(label)} {value:g}"
        text = f"{off_scale}{text}" if off_scale.startswith("&lt;") else f"{text}{off_scale}"
        dash = ' stroke-dasharray="4 3" data-off-scale="1"' if off_scale else ""
        shapes.append(
            f'<line class="threshold" data-value="{value:g}"{dash} x1="{x:.1f}" x2="{x:.1f}" y1="{PAD - 6}" y2="{PAD + plot_h}"/>'
            # Labels of bounds on the right half hang to the left of their line, so they stay on the canvas.
            f'<text class="threshold-label" x="{x + 3 if x < SVG_W / 2 else x - 3:.1f}" y="{PAD - 8}" '
            f'text-anchor="{"start" if x < SVG_W / 2 else "end"}">{text}</text>'
        )
    axis = (
        f'<line class="axis" x1="{PAD}" x2="{PAD + plot_w}" y1="{PAD + plot_h}" y2="{PAD + plot_h}"/>'
        f'<text x="{PAD}" y="{SVG_H - 8}">{edges_lo:.3g}</text>'
        f'<text x="{PAD + plot_w}" y="{SVG_H - 8}" text-anchor="end">{edges_hi:.3g}</text>'
        f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end">{tallest}</text>'
    )
    caption = f"{name}: {kept.size} kept, {rejected.size} rejected clips"
    return (
        f'<figure class="hist" data-filter="{name}" data-count="{values.size}">'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" viewBox="0 0 {SVG_W} {SVG_H}">'
        f"{axis}{''.join(shapes)}</svg><figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _axis_range(values: np.ndarray, bounds: list[float]) -> tuple[float, float]:
    """x range of a histogram: the scores, widened to take in each bound that lies within one
    score-span of them. Real footage scores motion 0.3-9 against max_motion 40: a range forced
    out to every bound squeezed all clips into the first few of the 30 bins."""
    lo, hi = float(values.min()), float(values.max())
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


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reelforge ingest report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
figure.hist {{ display: inline-block; margin: 0 1em 1em 0; }}
rect.kept {{ fill: #4a7fb5; }} rect.rejected {{ fill: #e0a040; }}
line.threshold {{ stroke: #d00; stroke-width: 2; }} text.threshold-label {{ fill: #d00; font-size: 10px; }}
line.axis {{ stroke: #555; }} svg text {{ font-size: 10px; fill: #555; }}
img.thumb {{ margin: 2px; border: 1px solid #ddd; }}
</style></head>
<body><h1>reelforge ingest report</h1>
<p>Histograms: kept clips in blue, rejected clips stacked in orange; red lines are the configured bounds.</p>
{body}
<p id="thumb-check">thumbnails not checked yet</p>
<script>
// Annotates the page after load so a headless browser dump shows whether every thumbnail decoded.
window.addEventListener("load", function () {{
  var images = document.querySelectorAll("img.thumb"), decoded = 0;
  images.forEach(function (img) {{
    img.setAttribute("data-natural-width", img.naturalWidth);
    if (img.complete && img.naturalWidth > 0) decoded += 1;
  }});
  var check = document.getElementById("thumb-check");
  check.setAttribute("data-decoded", decoded);
  check.setAttribute("data-total", images.length);
  check.textContent = decoded + " of " + images.length + " thumbnails decoded";
}});
</script>
</body></html>
"""
