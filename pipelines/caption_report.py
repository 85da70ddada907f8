"""captions/<NAME>/report.html: one static, self-contained page about a caption set.

Like the ingest report (pipelines/report.py): no external assets, thumbnails as data URIs, and a
few lines of script that annotate the page after load for the headless-browser test.

Sections: what made the set (model, revision, prompt and its hash, set id) and its counts; a
histogram of caption lengths in tokens of the training text encoder; failures by kind with example
clips; how often each boilerplate opening was stripped; and a sample of clips (a stable one: the
smallest hashes of clip ids, failures included) with the shard's old caption beside the new one.
The thumbnails are decoded from the shards at report time, so parts carry no image bytes.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import tarfile
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.caption_sets import CAPTIONS_DIR, read_set
from pipelines.output import OutputDir
from pipelines.materialize import tar_samples
from pipelines.report import THUMB_CHECK
from pipelines.transcode import jpeg_thumbnail

logger = logging.getLogger(__name__)

REPORT = "report.html"
SAMPLE_CLIPS = 24
SAMPLE_FAILED = 8
EXAMPLES_PER_REASON = 5
NUM_BINS = 24
SVG_W, SVG_H, PAD = 420, 160, 28


# What the report reads of every row; caption texts are read for the sampled clips only.
REPORT_COLUMNS = ["clip_id", "shard", "status", "reason", "stripped", "tokens"]
SAMPLE_COLUMNS = ["clip_id", "shard", "status", "reason", "caption", "old_caption"]


def write_caption_report(out: OutputDir, table: pa.Table, record: dict[str, Any], summary: dict[str, Any]) -> str:
    """Render report.html into the set folder `out`. `table` holds REPORT_COLUMNS of every row
    (pyarrow, so a million rows stay a few tens of MB); the sample's texts are read here."""
    ids = _sample_ids(table)
    sample = sorted(read_set(out, SAMPLE_COLUMNS, ids=set(ids)).to_pylist(), key=lambda r: ids.index(r["clip_id"]))
    thumbnails = _thumbnails_from_shards(_shards_of(out), sample)
    page = render_caption_report(table, sample, thumbnails, record, summary, out.uri)
    out.write_bytes(REPORT, page.encode())
    return page


def render_caption_report(
    table: pa.Table,
    sample: list[dict[str, Any]],
    thumbnails: dict[str, bytes],
    record: dict[str, Any],
    summary: dict[str, Any],
    uri: str,
) -> str:
    ok = pc.equal(table.column("status"), "ok")
    parts = [
        _header(record, summary, uri),
        _lengths(table.filter(ok).column("tokens").drop_null().to_numpy(zero_copy_only=False)),
        _failures(table.filter(pc.invert(ok)).select(["clip_id", "reason"]).to_pylist()),
        _stripped(table.filter(ok).column("stripped").drop_null()),
        _side_by_side(sample, thumbnails),
    ]
    return _PAGE.format(body="\n".join(parts), thumb_check=THUMB_CHECK)


def _sample_ids(table: pa.Table) -> list[str]:
    """A stable sample: the clips whose ids hash lowest, up to SAMPLE_FAILED of them failures."""
    ranked = sorted(zip(table.column("clip_id").to_pylist(), table.column("status").to_pylist()), key=lambda r: hashlib.sha1(r[0].encode()).hexdigest())
    failed = [clip_id for clip_id, status in ranked if status == "failed"][:SAMPLE_FAILED]
    ok = [clip_id for clip_id, status in ranked if status == "ok"][: SAMPLE_CLIPS - len(failed)]
    return ok + failed


def _shards_of(out: OutputDir) -> OutputDir:
    """The ingest output a set belongs to: SHARDS/captions/<NAME> -> SHARDS."""
    base = out.uri.rstrip("/").rsplit("/", 2)
    assert base[1] == CAPTIONS_DIR, out.uri
    return OutputDir(base[0])


def _thumbnails_from_shards(shards: OutputDir, sample: list[dict[str, Any]]) -> dict[str, bytes]:
    """{clip id: JPEG of its middle frame} for the sampled clips, read from their shards; a clip
    whose member cannot be read or decoded simply has no thumbnail (its row says why it failed)."""
    wanted: dict[str, set[str]] = {}
    for row in sample:
        wanted.setdefault(row["shard"], set()).add(row["clip_id"])
    thumbnails = {}
    for shard, ids in sorted(wanted.items()):
        try:
            with shards.fs.open_input_stream(shards.path(shard)) as stream:
                for clip in tar_samples(stream):
                    thumb = _middle_frame(clip["mp4"]) if clip["__key__"] in ids and "mp4" in clip else None
                    if thumb is not None:
                        thumbnails[clip["__key__"]] = thumb
        except (OSError, tarfile.TarError) as exc:
            logger.warning("report: cannot read thumbnails from %s: %s", shard, exc)
    return thumbnails


def _middle_frame(data: bytes) -> bytes | None:
    """A thumbnail of a clip's middle frame; only that frame is converted to RGB."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = list(container.decode(video=0))
            rgb = frames[len(frames) // 2].to_ndarray(format="rgb24") if frames else None
    except (av.FFmpegError, EOFError, OSError, ValueError):
        return None
    return jpeg_thumbnail(rgb, 160) if rgb is not None else None


def _header(record: dict[str, Any], summary: dict[str, Any], uri: str) -> str:
    facts = [
        ("caption set", uri),
        ("set id", summary.get("set_id") or ""),
        ("backend", record["backend"]),
        ("model", record["model"]),
        ("revision", record["revision"] or "(none given)"),
        ("prompt hash", record["prompt_hash"]),
        ("sampling", ", ".join(f"{k}={v}" for k, v in record["sampling"].items())),
        ("frames per clip", f"{record['frames']['count']} at most {record['frames']['max_pixels']} pixels"),
        ("text encoder (token cap)", record["cleaning"]["text_encoder"]),
    ]
    counts = [
        ("clips in the shards", summary["clips"]),
        ("captioned", summary["captioned"]),
        ("ok", summary["ok"]),
        ("failed", summary["failed"]),
        ("boilerplate opening stripped", summary["stripped"]),
        ("cut at the token cap or an unfinished sentence", summary["truncated"]),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    numbers = "".join(
        f'<tr><th>{html.escape(k)}</th><td class="count" data-key="{html.escape(k)}">{v}</td></tr>' for k, v in counts
    )
    prompt = html.escape(record["prompt"])
    return f"<table>{rows}</table><h2>Counts</h2><table id=\"counts\">{numbers}</table><h3>Prompt</h3><pre>{prompt}</pre>"


def _lengths(tokens: np.ndarray) -> str:
    """Histogram of the kept captions' lengths in tokens of the training text encoder."""
    if tokens.size == 0:
        return "<h2>Caption lengths</h2><p>No captions.</p>"
    tokens = tokens.astype(np.float64)
    lo, hi = float(tokens.min()), float(max(tokens.max(), tokens.min() + 1))
    counts, _ = np.histogram(tokens, np.linspace(lo, hi, NUM_BINS + 1))
    tallest = max(1, int(counts.max()))
    plot_w, plot_h = SVG_W - 2 * PAD, SVG_H - 2 * PAD
    bar_w = plot_w / NUM_BINS
    bars = "".join(
        f'<rect class="len" x="{PAD + i * bar_w:.1f}" y="{PAD + plot_h - c / tallest * plot_h:.1f}" '
        f'width="{bar_w - 1:.1f}" height="{c / tallest * plot_h:.1f}"/>'
        for i, c in enumerate(counts.tolist())
        if c
    )
    axis = (
        f'<line class="axis" x1="{PAD}" x2="{PAD + plot_w}" y1="{PAD + plot_h}" y2="{PAD + plot_h}"/>'
        f'<text x="{PAD}" y="{SVG_H - 8}">{lo:.0f}</text><text x="{PAD + plot_w}" y="{SVG_H - 8}" text-anchor="end">{hi:.0f}</text>'
        f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end">{tallest}</text>'
    )
    caption = f"{tokens.size} captions: {np.median(tokens):.0f} tokens median, {tokens.min():.0f}-{tokens.max():.0f}"
    return (
        f'<h2>Caption lengths</h2><figure class="hist" data-count="{tokens.size}">'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}">{axis}{bars}</svg>'
        f"<figcaption>{html.escape(caption)} (tokens of the training text encoder)</figcaption></figure>"
    )


def _failures(failed: list[dict[str, Any]]) -> str:
    """Failures by kind (the reason up to its first colon), with a few example clips each."""
    if not failed:
        return "<h2>Failures</h2><p>None.</p>"
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in failed:
        by_kind.setdefault((row["reason"] or "unknown").split(":", 1)[0], []).append(row)
    lines = []
    for kind, rows in sorted(by_kind.items(), key=lambda item: (-len(item[1]), item[0])):
        items = "".join(f"<li><code>{html.escape(r['clip_id'])}</code>: {html.escape(r['reason'] or '')}</li>" for r in rows[:EXAMPLES_PER_REASON])
        lines.append(f'<tr class="failure" data-kind="{html.escape(kind)}"><td>{html.escape(kind)}</td><td>{len(rows)}</td><td><ul>{items}</ul></td></tr>')
    return f"<h2>Failures</h2><table><tr><th>kind</th><th>clips</th><th>examples</th></tr>{''.join(lines)}</table>"


def _stripped(openings: pa.ChunkedArray) -> str:
    if len(openings) == 0:
        return "<h2>Boilerplate openings stripped</h2><p>None.</p>"
    counts = sorted(((c["values"], c["counts"]) for c in pc.value_counts(openings).to_pylist()), key=lambda vc: (-vc[1], vc[0]))
    lines = "".join(f'<tr class="stripped"><td>{html.escape(p)}</td><td>{c}</td></tr>' for p, c in counts)
    return f"<h2>Boilerplate openings stripped</h2><table><tr><th>opening</th><th>captions</th></tr>{lines}</table>"


def _side_by_side(sample: list[dict[str, Any]], thumbnails: dict[str, bytes]) -> str:
    if not sample:
        return "<h2>Sampled clips</h2><p>No clips.</p>"
    lines = []
    for row in sample:
        thumb = thumbnails.get(row["clip_id"])
        image = (
            f'<img class="thumb" alt="{html.escape(row["clip_id"])}" src="data:image/jpeg;base64,{base64.b64encode(thumb).decode()}">'
            if thumb
            else "(no thumbnail)"
        )
        new = html.escape(row["caption"]) if row["status"] == "ok" else f'<span class="failed">failed: {html.escape(row["reason"] or "")}</span>'
        lines.append(
            f'<tr class="clip" data-status="{row["status"]}"><td>{image}<br><code>{html.escape(row["clip_id"])}</code></td>'
            f"<td>{html.escape(row['old_caption'] or '')}</td><td>{new}</td></tr>"
        )
    return f"<h2>Sampled clips</h2><table><tr><th>clip</th><th>old caption</th><th>new caption</th></tr>{''.join(lines)}</table>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reelforge caption set report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
tr.clip td {{ max-width: 40em; }} span.failed {{ color: #b00; }}
rect.len {{ fill: #4a7fb5; }} line.axis {{ stroke: #555; }} svg text {{ font-size: 10px; fill: #555; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: 6px; }}
</style></head>
<body><h1>reelforge caption set report</h1>
{body}
{thumb_check}</body></html>
"""
