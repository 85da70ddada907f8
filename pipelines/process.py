"""One probed source → clip rows, in a single streaming decode. The ingest job's `flat_map` stage.

Contract with the ingest job (pipelines/ingest.py wires these into Ray Data; nothing here
imports Ray):

1. `pipelines.probe.probe_source(uri, filesystem=None) -> dict` returns one source row:
   `uri, size_bytes, sha256, duration_s, fps, num_frames, width, height, codec, pix_fmt,
   rotation, has_audio, container, reject_stage, reject_reason` (see probe.PROBE_FIELDS).
   Bad input never raises: it comes back with `reject_stage="probe"` and a human reason.
   `pipelines.probe.h264_encoder()` names the H.264 encoder clips are written with (RuntimeError
   if none works); `probe_notes(rows, clips)` reports the probed sources' codecs this machine
   cannot decode and those too small for `clips`.

2. `SourceProcessor(settings, filesystem=None)` is a callable class: expensive setup
   (encoder check, captioner) in `__init__`, then `processor(row) -> list[dict]` for one
   probe row; `processor.iter_rows(row)` yields the same rows as each clip finishes.
   `settings` is an `IngestSettings` (scenes, clips, filters, caption sections and
   `pipeline_version`; picklable, Ray ships it to workers) or a full `ReelforgeConfig`.
   Every returned row has exactly the keys in `CLIP_COLUMNS` (Arrow schema stability):
   `id` = `{sha256[:16]}-{start_ms:08d}-{end_ms:08d}`, `mp4` (H.264 bytes, None unless kept),
   `caption`, `thumbnail` (JPEG of the middle frame, None only when a piece has no frames),
   the metadata columns, `score_<name>` for each filter in `pipelines.filters.FILTERS`,
   `phash` (96 hex digits, filters.perceptual_hash), `status` ("kept" or "rejected"), `reject_stage` ("probe",
   "clips", "filter:<name>", "decode"), `reject_reason`, `reject_score`, `reject_threshold`.
   A probe-rejected row in gives one rejected row out. A source that fails mid-decode gives
   the clips completed before the error plus one "decode" row covering the rest. Near-duplicate
   removal across sources (by `phash`, `filters.dedup_hamming`) is the job's, run-wide.

How one source flows (each frame decoded once, converted by FFmpeg's swscale at most twice):

    decode ─┬─ detect frame (BGR, scenes.detect_width) ─▶ CutTracker ─── cut times ──┐
            └─ clip frame (RGB, clips.size, rotated) for each clips.fps grid slot ─▶ SettlingSlots
    SettlingSlots ─(settled: no later cut can reach it)─▶ ClipAssembler ─▶ ClipFrames
    ClipFrames ─▶ filters (scores, phash) ─▶ kept: encode MP4 + caption; rejected: reason
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Iterator

import av
import numpy as np
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict

from model.errors import one_line
from pipelines.captions import CaptionRequest, make_captioner
from pipelines.clips import ClipAssembler, ClipFrames, max_frames
from pipelines.config import CaptionConfig, ClipsConfig, FiltersConfig, ScenesConfig
from pipelines.decode import FrameConverter, FrameGeometry, iter_frames, normalize_rotation
from pipelines.filters import FILTERS, ClipPixels, judge, perceptual_hash, score_clip
from pipelines.probe import h264_encoder, open_source
from pipelines.scenes import CutTracker, detector_threshold
from pipelines.transcode import encode_mp4, jpeg_thumbnail

logger = logging.getLogger(__name__)

# Bump when a change alters clip bytes, spans or scores, so shards record what made them.
# 2: 384-bit phash, resolution-independent motion/static scores, x264 superfast. 3: a cut storm (continuous,
# fast-changing content) is one scene instead of hundreds of one-frame ones (pipelines/scenes.py).
# 4: x264 without intra partition search (pipelines/transcode.py): other clip bytes, same spans and scores.
PIPELINE_VERSION = "reelforge-ingest/4"

CLIP_COLUMNS = (
    "id",
    "mp4",
    "caption",
    "thumbnail",
    "source_uri",
    "source_sha256",
    "start_s",
    "end_s",
    "fps",
    "num_frames",
    "width",
    "height",
    "source_codec",
    "source_width",  # display orientation: rotation applied
    "source_height",
    "scene_index",
    "scene_detector",
    "scene_threshold",
    *(f"score_{name}" for name in FILTERS),
    "phash",
    "caption_model",
    "pipeline_version",
    "status",
    "reject_stage",
    "reject_reason",
    "reject_score",
    "reject_threshold",
)

_DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError)
# Frames ending this much before the probed duration mean data was lost; container durations
# often run a little past the last video frame (audio tail, edit lists), hence the slack.
TRUNCATION_TOLERANCE_S = 1.0


class IngestSettings(BaseModel):
    """The config sections one source's processing needs; small, frozen and picklable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenes: ScenesConfig = ScenesConfig()
    clips: ClipsConfig = ClipsConfig()
    filters: FiltersConfig = FiltersConfig()
    caption: CaptionConfig = CaptionConfig()
    pipeline_version: str = PIPELINE_VERSION

    @classmethod
    def from_config(cls, cfg: Any) -> "IngestSettings":
        """From a full ReelforgeConfig (anything with scenes/clips/filters/caption sections)."""
        return cls(scenes=cfg.scenes, clips=cfg.clips, filters=cfg.filters, caption=cfg.caption)

    def record(self) -> dict[str, Any]:
        """What an output folder records and compares (pipelines/output.py check_config): these
        settings, with only the caption keys its backend reads, so that the model captioners'
        knobs change nothing for outputs made without them."""
        data = self.model_dump(mode="json")
        if self.caption.backend not in ("hf", "openai"):
            data["caption"] = {k: data["caption"][k] for k in ("backend", "endpoint", "model", "sidecar_extensions", "sidecar_json_key")}
        else:
            unread = ("sidecar_extensions", "sidecar_json_key", "endpoint", "api_key_env", "batch_size", "concurrency",
                      "timeout_s", "max_retries", "num_gpus", "workers", "part_clips", "max_tokens")  # fmt: skip
            data["caption"] = {k: v for k, v in data["caption"].items() if k not in unread}
        return data


def clip_id(sha256: str, start_s: float, end_s: float) -> str:
    return f"{sha256[:16]}-{round(start_s * 1000):08d}-{round(end_s * 1000):08d}"


class SourceProcessor:
    """`processor(probe_row) -> list[clip rows]`; see the module docstring for the contract."""

    def __init__(self, settings: IngestSettings | Any, filesystem: pafs.FileSystem | None = None):
        self.settings = settings if isinstance(settings, IngestSettings) else IngestSettings.from_config(settings)
        self.filesystem = filesystem
        self.encoder = h264_encoder()  # fails here, on worker start, if no H.264 encoder works
        self.captioner = make_captioner(self.settings.caption, filesystem)
        self.scene_threshold = detector_threshold(self.settings.scenes)
        # Frames decoded so far from the source being processed (progress, and how tests see
        # that rows stream out before the decode ends), and where they end (s): the duration of a
        # source whose container does not say (a bare elementary stream), once iter_rows is done.
        self.frames_decoded = 0
        self.decoded_s = 0.0

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """All of one source's rows in a list: for tests and tools. A job streams `iter_rows`
        instead, since the list holds every kept clip's MP4 bytes at once."""
        return list(self.iter_rows(row))

    def iter_rows(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The same rows as `processor(row)`, each yielded as soon as its clip is finished, so a
        caller that streams them holds only one clip's MP4 bytes (a 1-hour source makes ~180 MiB)."""
        self.frames_decoded, self.decoded_s = 0, 0.0
        if row.get("reject_stage"):
            yield self._source_reject(row, row["reject_stage"], row.get("reject_reason") or "rejected", 0.0, row.get("duration_s"))
            return
        try:
            container = av.open(open_source(row["uri"], self.filesystem), mode="r", metadata_errors="ignore")
        except _DECODE_ERRORS as exc:
            # Opening failed although the probe succeeded (file changed or vanished meanwhile).
            yield self._source_reject(row, "decode", f"decode error at 0.0 s: {one_line(exc)}", 0.0, row.get("duration_s"))
            return
        with container:
            yield from self._process(row, container)

    # --- the streaming loop ---------------------------------------------------------------

    def _process(self, row: dict[str, Any], container: av.container.InputContainer) -> Iterator[dict[str, Any]]:
        clips_cfg = self.settings.clips
        source_fps = float(row["fps"])
        geometry = self._geometry(row)
        converter = FrameConverter(geometry)
        tracker = CutTracker(self.settings.scenes, source_fps)
        slots = SettlingSlots(ClipAssembler(clips_cfg), max_pending=2 * max_frames(clips_cfg) + tracker.lag_frames)
        # Recent detect frames (time_s, BGR): the picture of a piece too short to fill one clip-grid
        # slot after trimming. Such a piece is closed when the cut after it is reported, at most
        # lag_frames later, and spans at most 2 * trim_seconds plus one clip frame.
        longest_empty = math.ceil((2 * clips_cfg.trim_seconds + 1 / clips_cfg.fps) * source_fps)
        context = {"row": row, "geometry": geometry, "recent": deque(maxlen=tracker.lag_frames + longest_empty + 2)}
        next_slot: int | None = None
        last_time_s = 0.0
        decoded = 0
        frames = iter_frames(container, source_fps)
        while True:
            try:
                item = next(frames, None)
                if item is None:
                    break
                time_s, frame = item
                detect_bgr = converter.detect_frame(frame)
                if next_slot is None:
                    next_slot = max(0, math.ceil(time_s * clips_cfg.fps - 1e-6))
                # Resample to clips.fps by timestamp: a grid slot takes the first frame at or after it.
                # Converted once however many slots it fills; not at all when it fills none (60 -> 24 fps).
                rgb = converter.clip_frame(frame) if next_slot / clips_cfg.fps <= time_s + 1e-6 else None  # (H, W, 3)
            except (*_DECODE_ERRORS, ValueError) as exc:
                # ValueError: swscale refusing a corrupt frame's size or format.
                # Clips already finished stay; everything not yet in one becomes one reject row.
                reason = f"decoding stopped at {last_time_s:.1f} s by a decode error: {one_line(exc)}"
                logger.warning("%s: %s", row["uri"], reason)
                end_s = max(row.get("duration_s") or 0.0, last_time_s)
                yield self._source_reject(row, "decode", reason, slots.assembler.pending_start_s, end_s)
                return
            decoded += 1
            self.frames_decoded = decoded
            last_time_s = time_s
            self.decoded_s = time_s + 1.0 / source_fps
            context["recent"].append((time_s, detect_bgr))
            cuts = tracker.push(time_s, detect_bgr)
            while rgb is not None and next_slot / clips_cfg.fps <= time_s + 1e-6:
                slots.push(next_slot / clips_cfg.fps, time_s, rgb)
                next_slot += 1
            finished = [clip for cut_s in cuts for clip in slots.cut(cut_s)]
            finished += slots.settle(tracker.settled_before(time_s))
            yield from (self._clip_row(clip, context) for clip in finished)

        if decoded == 0:
            yield self._source_reject(row, "decode", "zero decodable frames", 0.0, row.get("duration_s"))
            return
        end_s = last_time_s + 1.0 / source_fps
        finished = [clip for cut_s in tracker.finish() for clip in slots.cut(cut_s)] + slots.finish(end_s)
        for storm in tracker.storms:
            logger.info("%s: %s", row["uri"], storm.describe(self.settings.scenes.detector))
        yield from (self._clip_row(clip, context) for clip in finished)
        expected_end_s = row.get("duration_s") or end_s
        if end_s < expected_end_s - TRUNCATION_TOLERANCE_S:
            # The demuxer gave up without an error (typical of truncated or overwritten data).
            reason = f"decoding stopped at {end_s:.1f} s of {expected_end_s:.1f} s (truncated or corrupt data)"
            logger.warning("%s: %s", row["uri"], reason)
            yield self._source_reject(row, "decode", reason, end_s, expected_end_s)

    def _geometry(self, row: dict[str, Any]) -> FrameGeometry:
        return FrameGeometry(
            source_width=row["width"],
            source_height=row["height"],
            rotation=normalize_rotation(row.get("rotation")),
            clip_width=self.settings.clips.width,
            clip_height=self.settings.clips.height,
            detect_width=self.settings.scenes.detect_width,
        )

    # --- rows -----------------------------------------------------------------------------

    def _base_row(self, row: dict[str, Any], geometry: FrameGeometry | None) -> dict[str, Any]:
        display_w, display_h = geometry.display_size if geometry else (row.get("width"), row.get("height"))
        base = dict.fromkeys(CLIP_COLUMNS)
        base.update(
            source_uri=row["uri"],
            source_sha256=row.get("sha256"),
            fps=self.settings.clips.fps,
            width=self.settings.clips.width,
            height=self.settings.clips.height,
            source_codec=row.get("codec"),
            source_width=display_w,
            source_height=display_h,
            scene_detector=self.settings.scenes.detector,
            scene_threshold=self.scene_threshold,
            caption="",
            caption_model=self.captioner.model_name,
            pipeline_version=self.settings.pipeline_version,
            num_frames=0,
        )
        return base

    def _source_reject(self, row: dict[str, Any], stage: str, reason: str, start_s: float, end_s: float | None) -> dict[str, Any]:
        out = self._base_row(row, None)
        end_s = float(end_s if end_s is not None else start_s)
        out.update(
            id=clip_id(row.get("sha256") or "0" * 16, start_s, end_s),
            start_s=float(start_s),
            end_s=end_s,
            status="rejected",
            reject_stage=stage,
            reject_reason=reason,
        )
        return out

    def _clip_row(self, clip: ClipFrames, context: dict[str, Any]) -> dict[str, Any]:
        row, geometry = context["row"], context["geometry"]
        out = self._base_row(row, geometry)
        num_frames = len(clip.frames)
        out.update(
            id=clip_id(row["sha256"], clip.start_s, clip.end_s),
            start_s=clip.start_s,
            end_s=clip.end_s,
            num_frames=num_frames,
            scene_index=clip.scene_index,
            thumbnail=(
                jpeg_thumbnail(clip.frames[num_frames // 2], self.settings.clips.thumbnail_width)
                if num_frames
                else self._piece_thumbnail(clip, context)
            ),
        )
        if clip.reject_reason is not None:
            out.update(status="rejected", reject_stage="clips", reject_reason=clip.reject_reason)
            return out
        pixels = ClipPixels(clip.frames, self.settings.clips.fps)
        scores = score_clip(pixels)
        out.update({f"score_{name}": value for name, value in scores.items()}, phash=perceptual_hash(pixels))
        verdict = judge(scores, self.settings.filters)
        if verdict.failed is not None:
            out.update(
                status="rejected",
                reject_stage=f"filter:{verdict.failed}",
                reject_reason=verdict.reason,
                reject_score=verdict.score,
                reject_threshold=verdict.threshold,
            )
            return out
        clips_cfg = self.settings.clips
        display_w, display_h = geometry.display_size
        out.update(
            status="kept",
            mp4=encode_mp4(clip.frames, clips_cfg.fps, clips_cfg.crf, clips_cfg.x264_preset, self.encoder),
            caption=self.captioner(CaptionRequest(row["uri"], clip.start_s, clip.end_s, display_w, display_h, pixels, scores, clips_cfg.fps)),
        )
        return out

    def _piece_thumbnail(self, clip: ClipFrames, context: dict[str, Any]) -> bytes | None:
        """A rejected piece with no frame on the clip grid (a scene shorter than the trim at both
        ends) still gets a thumbnail for report.html: the decoded frame nearest its middle, at
        detection size and turned to display orientation."""
        middle_s = (clip.start_s + clip.end_s) / 2
        inside = [(abs(t - middle_s), bgr) for t, bgr in context["recent"] if clip.start_s - 1e-6 <= t < clip.end_s]
        if not inside:
            return None
        bgr = min(inside, key=lambda pair: pair[0])[1]  # (h, w, 3)
        rgb = np.rot90(bgr[..., ::-1], k=context["geometry"].rotation // 90)  # display orientation
        return jpeg_thumbnail(np.ascontiguousarray(rgb), self.settings.clips.thumbnail_width)


class SettlingSlots:
    """Clip-grid slots held back until no later cut can move them to another scene, then handed
    to the ClipAssembler in time order. Each method returns the clips that completed."""

    def __init__(self, assembler: ClipAssembler, max_pending: int) -> None:
        self.assembler = assembler
        # Beyond this the wait is cut short (only a ThresholdDetector fade-out longer than two clips
        # gets here); bounded memory matters more than a cut inside a dark stretch.
        self.max_pending = max_pending
        self._pending: deque[tuple[float, float, np.ndarray]] = deque()  # (slot_s, source_s, rgb)

    def push(self, slot_s: float, source_s: float, rgb: np.ndarray) -> None:
        self._pending.append((slot_s, source_s, rgb))

    def settle(self, before_s: float) -> list[ClipFrames]:
        """Hand over the slots filled by frames before `before_s` (no cut can reach them any more)."""
        clips = []
        while self._pending and (self._pending[0][1] < before_s or len(self._pending) > self.max_pending):
            clips += self.assembler.add(*self._pending.popleft())
        return clips

    def cut(self, cut_s: float) -> list[ClipFrames]:
        """A scene ends at `cut_s`: everything before it is settled, and the scene is closed."""
        return self.settle(cut_s) + self.assembler.cut(cut_s)

    def finish(self, end_s: float) -> list[ClipFrames]:
        """The source ended at `end_s`: every slot is settled, and the last scene is closed."""
        return self.settle(math.inf) + self.assembler.finish(end_s)
