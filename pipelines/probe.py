"""Probe one source video: identity (size, sha256) and stream facts, or a reject reason.

`probe_source(uri)` is the first stage of ingestion. It never raises for bad input: a file
that is empty, not a container, audio only, undecodable or missing comes back as the same
row with `reject_stage="probe"` and a human `reject_reason`, so the job can write it to
rejects.parquet and move on. A source it cannot read at all (its store does not answer, an
I/O or permission error) raises SourceUnavailable instead: that is our environment, not the
source, and the job retries it, then stops with the source unprocessed (docs/reliability.md).

Sources are local paths or any URI pyarrow understands (`s3://`, `gs://`, `file://`);
`open_source` is the one place that turns a URI into something PyAV can read.
"""

from __future__ import annotations

import functools
import logging
from contextlib import AbstractContextManager
from fractions import Fraction
from typing import Any, BinaryIO, Iterable

import av
import numpy as np
import pyarrow.fs as pafs

from model.errors import one_line
from model.storage import file_sha256, resolve_uri
from pipelines.config import ClipsConfig
from pipelines.decode import FrameGeometry, normalize_rotation
from pipelines.output import StorageError, storage_errors

logger = logging.getLogger(__name__)

# Every probe row has exactly these keys (Arrow schema stability across good and bad sources).
PROBE_FIELDS = (
    "uri",
    "size_bytes",
    "sha256",
    "duration_s",
    "fps",
    "num_frames",
    "width",
    "height",
    "codec",
    "pix_fmt",
    "rotation",
    "has_audio",
    "container",
    "reject_stage",
    "reject_reason",
)

# Preferred H.264 encoders, best first: libx264 is deterministic with threads=1; the others
# are what a build without GPL x264 (openh264) or a GPU node (nvenc/qsv/amf) may have.
H264_ENCODERS = ("libx264", "libopenh264", "h264_nvenc", "h264_qsv", "h264_amf", "h264_v4l2m2m")


class SourceUnavailable(StorageError):
    """A source that cannot be read because its store or our access to it fails (the store stops
    answering, an I/O error, no permission): not a property of the source, so never a reject.
    Deliberately no OSError: the decode loop turns OSError from FFmpeg into "decode" rejects."""


def open_source(uri: str, filesystem: pafs.FileSystem | None = None) -> str | BinaryIO:
    """Something `av.open` accepts: a plain path for local files (FFmpeg reads those fastest),
    otherwise a seekable file on the store (MP4 moov atoms may sit at the end) whose read errors
    come out as SourceUnavailable, which PyAV passes through from its read callback unchanged."""
    fs, path = resolve_uri(uri, filesystem)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    with _unavailable(uri):
        return _StoreFile(uri, fs.open_input_file(path))


class _StoreFile:
    """A pyarrow input file as PyAV reads it (read/seek/tell), store errors as SourceUnavailable."""

    def __init__(self, uri: str, handle: pafs.NativeFile) -> None:
        self.uri, self.handle = uri, handle

    def read(self, size: int = -1) -> bytes:
        with _unavailable(self.uri):
            return self.handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        with _unavailable(self.uri):
            return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.handle.close()


def _unavailable(uri: str) -> AbstractContextManager[None]:
    return storage_errors(f"cannot read source {uri}", SourceUnavailable)


def empty_probe_row(uri: str) -> dict[str, Any]:
    return {field: None for field in PROBE_FIELDS} | {"uri": uri}


def probe_source(uri: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """A probe row for `uri`: size, sha256 and stream facts, or `reject_stage="probe"` with a reason."""
    row = empty_probe_row(uri)
    try:
        fs, path = resolve_uri(uri, filesystem)
    except (OSError, ValueError) as exc:
        return _reject(row, f"cannot open source ({one_line(exc)})")
    with _unavailable(uri):  # the store not answering says nothing about the source
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return _reject(row, "file not found")
    if info.type != pafs.FileType.File:
        return _reject(row, f"not a file ({info.type.name})")
    row["size_bytes"] = int(info.size)
    if info.size == 0:
        return _reject(row, "empty file")
    try:
        row["sha256"] = file_sha256(path, fs)
    except FileNotFoundError:
        return _reject(row, "file not found")  # deleted since it was listed
    except OSError as exc:
        raise SourceUnavailable(f"cannot read source {uri}: {one_line(exc)}") from exc
    try:
        handle = open_source(path, fs)
        with av.open(handle, mode="r", metadata_errors="ignore") as container:
            return _probe_container(container, row)
    except StorageError:
        raise
    except av.error.FFmpegError as exc:
        return _reject(row, f"not a video container ({one_line(exc)})")
    except (OSError, ValueError, RuntimeError) as exc:
        return _reject(row, f"cannot probe source ({one_line(exc)})")


def _probe_container(container: av.container.InputContainer, row: dict[str, Any]) -> dict[str, Any]:
    row["container"] = container.format.name
    row["has_audio"] = len(container.streams.audio) > 0
    if not container.streams.video:
        return _reject(row, "no video stream (audio only)" if row["has_audio"] else "no video stream")
    stream = container.streams.video[0]
    codec_name = stream.codec.name if stream.codec is not None else "unknown"
    row["codec"] = codec_name
    if stream.codec_context is None or not can_decode(codec_name):
        return _reject(row, f"codec {codec_name} cannot be decoded here")
    row["width"] = stream.codec_context.width
    row["height"] = stream.codec_context.height
    row["pix_fmt"] = stream.codec_context.pix_fmt
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    row["fps"] = float(fps) if fps else None
    row["duration_s"] = _duration_s(container, stream)

    # Decode the first frame: a header can promise a stream whose data never decodes.
    first = _first_frame(container, stream)
    if isinstance(first, str):
        return _reject(row, first)
    row["rotation"] = int(first.rotation) % 360
    row["width"] = row["width"] or first.width
    row["height"] = row["height"] or first.height
    row["pix_fmt"] = row["pix_fmt"] or first.format.name
    if row["fps"] is None:
        row["fps"] = 25.0
        logger.warning("%s: no frame rate in the container; assuming 25 fps", row["uri"])
    if stream.frames:
        row["num_frames"] = int(stream.frames)
    elif row["duration_s"] is not None:
        # MKV/WebM and raw streams do not count frames; estimate from duration and rate.
        row["num_frames"] = max(1, round(row["duration_s"] * row["fps"]))
    return row


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> av.VideoFrame | str:
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as exc:
        return f"zero decodable frames ({one_line(exc)})"
    return "zero decodable frames"


# Demuxers of bare elementary streams: no container, no timestamps, so FFmpeg's duration is a guess
# from the bitrate, and a wild one (0.02 s for 5.4 s of MPEG-1 in a real .mpg). Unknown instead:
# the processor decodes to the end anyway, and the ingest records the duration it decoded.
RAW_STREAM_FORMATS = frozenset({"mpegvideo", "h261", "h263", "h264", "hevc", "vvc", "m4v", "cavsvideo", "vc1", "avs2", "avs3"})


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if container.format.name in RAW_STREAM_FORMATS:
        return None
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _reject(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row["reject_stage"] = "probe"
    row["reject_reason"] = reason
    logger.info("reject %s: %s", row["uri"], reason)
    return row


# --- size: a source too small for clips.size is rejected, never silently upscaled -------


def upscale_factor(row: dict[str, Any], clips: ClipsConfig) -> float:
    """The scale a probed source needs so that, rotated for display, it covers `clips.size`
    (aspect kept; the excess is center-cropped). Below 1 means a downscale."""
    geometry = FrameGeometry(
        source_width=row["width"],
        source_height=row["height"],
        rotation=normalize_rotation(row.get("rotation")),
        clip_width=clips.width,
        clip_height=clips.height,
        detect_width=clips.width,  # unused here
    )
    # resize_size is in coded orientation. The covering axis lands exactly on the clip size and
    # the other is rounded up before the crop, so the smaller of the two ratios is the scale.
    resized_w, resized_h = geometry.resize_size
    return min(resized_w / row["width"], resized_h / row["height"])


def size_reject(row: dict[str, Any], clips: ClipsConfig) -> dict[str, Any]:
    """`row` with `reject_stage="size"` and a human reason when it needs more upscaling than
    `clips.max_upscale` allows; rows already rejected or without a size pass through unchanged.
    Decided from the probe alone, so a too-small source is never decoded."""
    if row.get("reject_stage") or not row.get("width") or not row.get("height") or clips.max_upscale is None:
        return row
    factor = upscale_factor(row, clips)
    if factor <= clips.max_upscale:
        return row
    reason = (
        f"source {_display_size(row)} needs {factor:.2f}x upscaling to {clips.size}; "
        f"clips.max_upscale is {clips.max_upscale}"
    )
    logger.info("reject %s: %s", row["uri"], reason)
    return row | {"reject_stage": "size", "reject_reason": reason}


def _display_size(row: dict[str, Any]) -> str:
    if normalize_rotation(row.get("rotation")) in (90, 270):
        return f"{row['height']}x{row['width']}"
    return f"{row['width']}x{row['height']}"


# --- what this machine can do: the encoder (checked on the driver before any work), decoders --


@functools.lru_cache(maxsize=1)
def h264_encoder() -> str:
    """The H.264 encoder clips are written with: the first of H264_ENCODERS that opens and
    encodes a frame here (listing a codec is not enough: nvenc is listed on CPU machines)."""
    for name in H264_ENCODERS:
        if _encoder_works(name):
            return name
    raise RuntimeError(
        f"no working H.264 encoder in this FFmpeg build (tried {', '.join(H264_ENCODERS)}); "
        "install PyAV wheels from PyPI, which ship libx264"
    )


def _encoder_works(name: str) -> bool:
    try:
        codec = av.codec.Codec(name, "w")
    except (av.error.FFmpegError, ValueError):
        return False
    try:
        context = av.codec.CodecContext.create(codec)
        context.width, context.height, context.pix_fmt = 64, 64, "yuv420p"
        context.time_base = Fraction(1, 24)
        context.open()
        frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
        frame.pts = 0
        context.encode(frame)
        context.encode(None)
        return True
    except (av.error.FFmpegError, ValueError, RuntimeError) as exc:
        logger.debug("encoder %s listed but unusable: %s", name, exc)
        return False


def can_decode(codec_name: str) -> bool:
    try:
        av.codec.Codec(codec_name, "r")
        return True
    except (av.error.FFmpegError, ValueError):
        return False


# Sources named one by one in the size line of probe_notes; the rest are counted.
NOTES_NAMED = 5


def probe_notes(rows: Iterable[dict[str, Any]], clips: ClipsConfig | None = None) -> list[str]:
    """Human lines for the job's log about the probed sources: the codecs this machine cannot
    decode and, given `clips`, the sources rejected for size (rows carry `uri`, `codec`,
    `reject_stage` and, for size rejects, the stream facts; see size_reject)."""
    lines = []
    undecodable: dict[str, int] = {}
    too_small: list[dict[str, Any]] = []
    for row in rows:
        codec = row.get("codec")
        if codec and not can_decode(codec):
            undecodable[codec] = undecodable.get(codec, 0) + 1
        if row.get("reject_stage") == "size":
            too_small.append(row)
    for codec, count in sorted(undecodable.items()):
        lines.append(f"cannot decode codec {codec} here ({count} source{'s' if count > 1 else ''} rejected)")
    if too_small and clips is not None:
        count = len(too_small)
        too_small.sort(key=lambda r: r["uri"])
        named = ", ".join(f"{r['uri']} ({_display_size(r)}, {upscale_factor(r, clips):.2f}x)" for r in too_small[:NOTES_NAMED])
        more = f" and {count - NOTES_NAMED} more" if count > NOTES_NAMED else ""
        lines.append(
            f"{count} source{'s' if count > 1 else ''} smaller than {clips.size} beyond clips.max_upscale "
            f"{clips.max_upscale} rejected (stage size): {named}{more}"
        )
    return lines
