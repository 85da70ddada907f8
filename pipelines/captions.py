"""Captions for clips, by `caption.backend`.

A captioner is a small callable: `captioner(request) -> str`, with a `model_name` recorded in
every clip row (`caption_model`). `make_captioner` picks one with a `match` on the backend:

* `none`: empty caption.
* `sidecar`: a file next to the source with the same stem: `.srt` gives the subtitles that
  overlap the clip's span, joined; `.txt` the whole text; `.json` the value under
  `caption.sidecar_json_key` (or a bare JSON string). Works for local paths and
  pyarrow-filesystem URIs. A source without a sidecar gets an empty caption.
* `metadata`: one descriptive sentence from what the pipeline measured (duration, motion,
  brightness, dominant colours by name, orientation); a weak but honest caption that the
  recaptioning pass rewrites later.
* `hf` / `openai`: a vision-language model describes the clip from `caption.frames` of the frames
  ingest already holds (no second decode), through the same backends and cleaning as
  `reelforge recaption` (model/chat.py, pipelines/caption_clean.py). A clip whose caption fails
  (a refusal, a loop, a 400) keeps an empty caption and the failure is logged; the backend
  failing as a whole stops the job like a storage failure. Captions are not capped in tokens
  here (the cap needs the training text encoder): recaptioning caps them.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import pyarrow.fs as pafs

from model.chat import BackendUnavailable, ChatRequest, Sampling
from model.chat_backends import BackendSpec, make_backend
from model.storage import resolve_uri
from pipelines.caption_clean import clean_caption, failed
from pipelines.caption_frames import encode_frames, select_frames
from pipelines.config import CaptionConfig
from pipelines.filters import ClipPixels

logger = logging.getLogger(__name__)


@dataclass
class CaptionRequest:
    source_uri: str
    start_s: float
    end_s: float
    source_width: int  # display orientation (rotation applied)
    source_height: int
    pixels: ClipPixels
    scores: dict[str, float]  # filter name -> score (pipelines.filters.FILTERS)
    fps: float | None = None  # of `pixels`


class Captioner(Protocol):
    model_name: str

    def __call__(self, request: CaptionRequest) -> str: ...


def make_captioner(cfg: CaptionConfig, filesystem: pafs.FileSystem | None = None) -> Captioner:
    match cfg.backend:
        case "none":
            return NoCaptioner()
        case "sidecar":
            return SidecarCaptioner(cfg, filesystem)
        case "metadata":
            return MetadataCaptioner()
        case "hf" | "openai":
            return ModelCaptioner(cfg)
    raise ValueError(f"caption.backend={cfg.backend!r} is unknown")


class NoCaptioner:
    model_name = "none"

    def __call__(self, request: CaptionRequest) -> str:
        return ""


# --- sidecar files ------------------------------------------------------------------------


@dataclass(frozen=True)
class Subtitle:
    start_s: float
    end_s: float
    text: str


_SRT_TIME = re.compile(r"(\d+):(\d{2}):(\d{2})[,.](\d{1,3})")


def parse_srt(text: str) -> list[Subtitle]:
    """Cues of an SRT file; malformed blocks are skipped (subtitle files in the wild are messy)."""
    cues = []
    for block in re.split(r"\r?\n\s*\r?\n", text.strip().lstrip("\ufeff")):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        timing = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if timing is None:
            continue
        start, _, end = lines[timing].partition("-->")
        start_match, end_match = _SRT_TIME.search(start), _SRT_TIME.search(end)
        if not (start_match and end_match):
            continue
        body = " ".join(re.sub(r"<[^>]+>", "", line) for line in lines[timing + 1 :])
        cues.append(Subtitle(_srt_seconds(start_match), _srt_seconds(end_match), body.strip()))
    return cues


def _srt_seconds(match: re.Match[str]) -> float:
    hours, minutes, seconds, millis = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis.ljust(3, "0")) / 1000


def subtitles_between(cues: list[Subtitle], start_s: float, end_s: float) -> str:
    """Text of the cues overlapping [start_s, end_s), in order, joined by spaces."""
    return " ".join(cue.text for cue in cues if cue.start_s < end_s and cue.end_s > start_s and cue.text)


class SidecarCaptioner:
    model_name = "sidecar"

    def __init__(self, cfg: CaptionConfig, filesystem: pafs.FileSystem | None = None):
        self.cfg = cfg
        self.filesystem = filesystem
        # One source's sidecar, cached: a source yields many clips in a row.
        self._cached_uri: str | None = None
        self._cached: str | list[Subtitle] = ""
        self._warned_missing = False  # one warning per captioner (per worker), not per source

    def __call__(self, request: CaptionRequest) -> str:
        if request.source_uri != self._cached_uri:
            self._cached = self.load(request.source_uri)
            self._cached_uri = request.source_uri
        if isinstance(self._cached, list):
            return subtitles_between(self._cached, request.start_s, request.end_s)
        return self._cached

    def load(self, source_uri: str) -> str | list[Subtitle]:
        """The sidecar next to `source_uri`: subtitle cues for .srt, text otherwise, "" if none."""
        fs, path = resolve_uri(source_uri, self.filesystem)
        stem = posixpath.splitext(path)[0]  # pyarrow paths are always "/"-separated
        for extension in self.cfg.sidecar_extensions:
            candidate = stem + extension
            if fs.get_file_info(candidate).type != pafs.FileType.File:
                continue
            with fs.open_input_stream(candidate) as stream:
                text = stream.read().decode("utf-8", errors="replace")
            return self._parse(candidate, extension, text)
        if not self._warned_missing:
            # caption.backend=sidecar on footage without sidecars (e.g. `--config ingest/demo` on
            # one's own files) used to give every clip an empty caption without a word.
            self._warned_missing = True
            logger.warning(
                "caption.backend=sidecar: no %s next to %s, its clips get an empty caption "
                "(further sources without a sidecar are logged at debug level; caption.backend=metadata "
                "describes clips without sidecars)",
                "/".join(stem.rsplit("/", 1)[-1] + ext for ext in self.cfg.sidecar_extensions),
                source_uri,
            )
        else:
            logger.debug("no sidecar caption for %s", source_uri)
        return ""

    def _parse(self, path: str, extension: str, text: str) -> str | list[Subtitle]:
        match extension.lower():
            case ".srt":
                return parse_srt(text)
            case ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    logger.warning("sidecar %s is not valid JSON (%s); caption left empty", path, exc)
                    return ""
                if isinstance(data, str):
                    return data.strip()
                if isinstance(data, dict) and isinstance(data.get(self.cfg.sidecar_json_key), str):
                    return data[self.cfg.sidecar_json_key].strip()
                logger.warning("sidecar %s has no string %r; caption left empty", path, self.cfg.sidecar_json_key)
                return ""
            case _:
                return " ".join(text.split())


# --- a sentence from measurements ---------------------------------------------------------

# Named colours for captions, in RGB; nearest-neighbour naming on a 32x32 thumbnail.
COLOUR_NAMES: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "red": (200, 30, 30),
    "orange": (235, 130, 30),
    "yellow": (230, 220, 40),
    "green": (40, 160, 50),
    "teal": (30, 140, 140),
    "blue": (40, 70, 200),
    "purple": (130, 50, 160),
    "pink": (235, 130, 180),
    "brown": (120, 75, 35),
}
_PALETTE = np.array(list(COLOUR_NAMES.values()), np.float32)  # (K, 3)
_PALETTE_NAMES = list(COLOUR_NAMES)


def dominant_colours(rgb: np.ndarray, max_colours: int = 2, min_share: float = 0.2) -> list[str]:
    """Names of the colours covering at least `min_share` of an (H, W, 3) RGB frame, largest first."""
    small = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA).reshape(-1, 1, 3).astype(np.float32)  # (1024, 1, 3)
    nearest = np.argmin(((small - _PALETTE[None]) ** 2).sum(axis=-1), axis=1)  # (1024,)
    shares = np.bincount(nearest, minlength=len(_PALETTE_NAMES)) / len(nearest)
    order = np.argsort(-shares, kind="stable")
    return [_PALETTE_NAMES[i] for i in order[:max_colours] if shares[i] >= min_share]


# (upper bound, words): the first band whose bound exceeds the score names it.
MOTION_WORDS = ((1.0, "almost no motion"), (5.0, "gentle motion"), (15.0, "moderate motion"), (math.inf, "fast motion"))
BRIGHTNESS_WORDS = ((60.0, "dark"), (170.0, "evenly lit"), (math.inf, "bright"))


def describe(score: float, bands: tuple[tuple[float, str], ...]) -> str:
    return next(words for bound, words in bands if score < bound)


def orientation_words(width: int, height: int) -> str:
    if abs(width - height) <= 0.05 * max(width, height):
        return "square"
    return "portrait" if height > width else "landscape"


class MetadataCaptioner:
    model_name = "metadata-v1"

    def __call__(self, request: CaptionRequest) -> str:
        middle = request.pixels.rgb[len(request.pixels.rgb) // 2]
        colours = dominant_colours(middle)
        sentence = (
            f"A {request.end_s - request.start_s:.1f}-second {orientation_words(request.source_width, request.source_height)} "
            f"video clip, {describe(request.scores['brightness'], BRIGHTNESS_WORDS)}, with {describe(request.scores['motion'], MOTION_WORDS)}"
        )
        if colours:
            sentence += f"; dominant colours: {' and '.join(colours)}"
        return sentence + "."


# --- a vision-language model ---------------------------------------------------------------


def backend_spec(cfg: CaptionConfig, num_gpus: float = 0) -> BackendSpec:
    """The chat backend `caption.*` describes (model/chat.py)."""
    return BackendSpec(
        kind=cfg.backend,
        model=cfg.model or "",
        revision=cfg.revision,
        sampling=Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed),
        device="cuda" if num_gpus else None,
        batch_size=cfg.batch_size,
        endpoint=cfg.endpoint,
        api_key_env=cfg.api_key_env,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        video_input=cfg.video_input,
    )


def check_captioner(cfg: CaptionConfig) -> str:
    """Before any work: is the model captioner there? A local model folder must exist, an
    endpoint must answer (and accept the key). Returns the revision a caption set records (a
    local folder's content hash, a hub commit, or `caption.revision`); ValueError in one line."""
    try:
        if cfg.backend == "hf":
            from model.chat_hf import resolve_revision

            return resolve_revision(cfg.model or "", cfg.revision)
        if cfg.backend == "openai":
            from model.chat_openai import probe_endpoint

            probe_endpoint(cfg.endpoint or "", cfg.model or "", cfg.api_key_env, timeout_s=min(cfg.timeout_s, 30.0))
    except BackendUnavailable as exc:
        raise ValueError(f"caption.backend={cfg.backend}: {exc}") from None
    return cfg.revision or ""


def render_prompt(cfg: CaptionConfig, frames: int, seconds: float) -> str:
    return cfg.prompt.format(frames=frames, seconds=seconds)


class ModelCaptioner:
    """Ingest-time captions from a vision-language model, one clip per request."""

    def __init__(self, cfg: CaptionConfig) -> None:
        self.cfg = cfg
        self.backend = make_backend(backend_spec(cfg))
        self.model_name = f"{cfg.model}@{self.backend.revision}" if self.backend.revision else str(cfg.model)

    def __call__(self, request: CaptionRequest) -> str:
        frames = encode_frames(select_frames(request.pixels.rgb, request.fps, self.cfg), self.cfg)
        prompt = render_prompt(self.cfg, len(frames), request.end_s - request.start_s)
        [reply] = self.backend.chat([ChatRequest(prompt, images=frames, system=self.cfg.system_prompt)])
        if reply.text is None:
            clean = failed(reply.error or "no output")
        else:
            clean = clean_caption(reply.text, strip_prefixes=self.cfg.strip_prefixes, min_words=self.cfg.min_words, finish_reason=reply.finish_reason)
        if clean.status != "ok":
            logger.warning("caption of %s %.2f-%.2f s failed (%s); the clip keeps an empty caption", request.source_uri, request.start_s, request.end_s, clean.reason)
        return clean.caption
