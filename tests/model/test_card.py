"""model/card.py: the model's card on a real bundle (a tiny random DiT, the lossless pixel autoencoder,
the offline MiniLM), and every request checked against it by the real VideoPipeline.

The module's bundle is trained "text only" as the demo preset is (every conditioning probability 0,
text dropout 0), so image / extend / connect are modes it never saw. Its card is what training
writes (`card_entry`), with one limit tightened as an operator may (input video frames), so that a
few-frame test clip can exceed it.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_bundle, save_bundle
from model.card import CARD_KEY, card_entry, default_limits, load_card, trained_modes
from model.conditioning import MODES, ConditioningProbs
from model.dit import DiT, dit_config
from model.mp4 import write_mp4
from model.pipeline import GenerationRequest, VideoPipeline

FPS, FRAMES, SIZE = 8, 4, 16
TEXT_ONLY = ConditioningProbs(first_frame=0.0, first_k=0.0, last_k=0.0, both_ends=0.0, random=0.0)
VIDEO_FRAMES_LIMIT = 10  # the tightened limit; the test clip has 12 frames


def _save(path, extra):
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=48, text_dim=384, depth=1, hidden_size=32, num_heads=2, max_text_tokens=16)
    return save_bundle(path, DiT(cfg), cfg, autoencoder="pixel", text_encoder="minilm", fps=FPS, num_frames=FRAMES,
                       width=SIZE, height=SIZE, extra={"generation": {"steps": 1, "guidance": 1.0}, **extra})  # fmt: skip


@pytest.fixture(scope="module")
def text_only(tmp_path_factory) -> VideoPipeline:
    entry = card_entry(TEXT_ONLY, text_dropout=0.0, shapes=[(FRAMES, SIZE, SIZE)])
    entry["limits"]["max_video_frames"] = VIDEO_FRAMES_LIMIT
    return VideoPipeline(load_bundle(_save(tmp_path_factory.mktemp("text-only"), {CARD_KEY: entry})))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "first.png")
    write_mp4(np.zeros((12, SIZE, SIZE, 3), np.uint8), FPS, folder / "clip.mp4")
    (folder / "junk.bin").write_bytes(b"neither an image nor a video")
    (folder / "huge.png").write_bytes(header_only_png(9000, 9000))
    return folder


def header_only_png(width: int, height: int) -> bytes:
    """A PNG with a header and no pixel data: only a header read can know its size."""
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)), (b"IEND", b"")]
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize(
    "probs, modes",
    [
        (ConditioningProbs(), MODES),  # the defaults draw every pattern and leave 70% plain text
        (TEXT_ONLY, ("text", "edit")),
        (ConditioningProbs(first_frame=0.3, first_k=0.0, last_k=0.2, both_ends=0.0, random=0.0), ("text", "image", "extend-backward", "edit")),
        # every sample holds frames clean: plain text-to-video (and edit, which runs on it) never trained
        (ConditioningProbs(first_frame=0.5, first_k=0.0, last_k=0.0, both_ends=0.5, random=0.0), ("image", "connect")),
    ],
)
def test_trained_modes_are_the_patterns_training_drew(probs, modes):
    assert trained_modes(probs) == modes


def test_card_is_recorded_in_the_bundle_and_read_back(text_only):
    raw = json.loads((text_only.bundle.path / "model_config.json").read_text())
    assert raw["format_version"] == 1 and set(raw[CARD_KEY]) == {"modes", "shapes", "max_k", "null_text_trained", "limits"}
    card = load_card(text_only.bundle.path)
    assert card == text_only.card and card.recorded
    assert card.modes == ("text", "edit") and card.null_text_trained is False and card.max_k == TEXT_ONLY.max_k
    assert (card.fps, card.num_frames, card.width, card.height, card.guidance) == (FPS, FRAMES, SIZE, SIZE, 1.0)
    served = json.loads(json.dumps(card.to_json()))  # what a /v1/models response carries
    assert served["modes"] == ["text", "edit"] and served["limits"]["max_video_frames"] == VIDEO_FRAMES_LIMIT
    assert served["limits"]["max_width"] == card.limits.max_width > SIZE


def test_bundle_without_a_card_allows_every_mode_and_says_so(tmp_path, caplog):
    path = _save(tmp_path / "old", {})
    with caplog.at_level(logging.WARNING, logger="model.card"):
        card = load_card(path)
    assert card.modes == MODES and not card.recorded and card.max_k is None and card.null_text_trained is None
    assert card.limits == default_limits([(FRAMES, SIZE, SIZE)])
    assert [r.getMessage() for r in caplog.records if "no model card" in r.getMessage()] != []
    assert card.check_mode("connect", allow_untrained=False) == []


def test_a_bad_card_fails_on_load_naming_the_key(tmp_path):
    entry = card_entry(TEXT_ONLY, 0.0, [(FRAMES, SIZE, SIZE)])
    for change, message in (
        ({"modes": ["text", "dance"]}, "modes \\['text', 'dance'\\] must be a list of"),
        ({"limits": {**entry["limits"], "max_width": 0}}, "limits.max_width 0 must be an integer >= 1"),
        ({"shapes": [[FRAMES, 2 * SIZE, SIZE]]}, "must start with the bundle's clip"),
        ({"colour": "red"}, "unknown keys \\['colour'\\]"),
    ):
        path = _save(tmp_path / "b", {CARD_KEY: {**entry, **change}})
        with pytest.raises(ValueError, match=message):
            load_card(path)


def _refusal(pipeline, **fields) -> str:
    with pytest.raises(ValueError) as exc:
        pipeline.check_request(GenerationRequest(prompt="a red square", **fields))
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_each_limit_is_refused_naming_the_field(text_only):
    card, limits = text_only.card, text_only.card.limits
    too_wide = _refusal(text_only, width=100000)
    assert too_wide.startswith(f"width 100000 exceeds this model's limit {limits.max_width} (")
    # The card alone says the same, before any model is loaded (what `reelforge generate` does first).
    with pytest.raises(ValueError) as exc:
        load_card(text_only.bundle.path).check_request(GenerationRequest(prompt="a red square", width=100000))
    assert str(exc.value) == too_wide
    assert _refusal(text_only, height=limits.max_height + 8).startswith(f"height {limits.max_height + 8} exceeds")

    too_long = (limits.max_frames + 1) / FPS
    assert _refusal(text_only, seconds=too_long).startswith(f"seconds {too_long:g} makes {limits.max_frames + 1:,} frames")
    assert _refusal(text_only, seconds=3600).startswith("seconds 3600 makes")
    for bad in (float("inf"), float("nan"), 0.0):
        assert _refusal(text_only, seconds=bad).startswith(f"seconds {bad!r} must be a number > 0")

    # pixels x frames: at the largest size, one frame more than the budget holds
    side = limits.max_width
    frames = limits.max_pixel_frames // (side * side) + 1
    assert frames <= limits.max_frames  # the budget, not the frame limit, is what refuses this
    over_budget = _refusal(text_only, seconds=frames / FPS, width=side, height=side)
    assert over_budget.startswith(f"seconds {frames / FPS:g} at {side}x{side} is {frames:,} frames")
    assert f"over this model's budget {limits.max_pixel_frames:,}" in over_budget
    text_only.check_request(GenerationRequest(prompt="a red square", seconds=(frames - 1) / FPS, width=side, height=side))

    assert _refusal(text_only, guidance=float("inf")).startswith("guidance inf must be")
    assert _refusal(text_only, width=16.5).startswith("width 16.5 must be an integer")
    assert card.limits == limits  # checks never change the card


def test_untrained_mode_is_refused_and_runs_with_a_warning_when_forced(text_only, inputs):
    image = inputs / "first.png"
    refused = _refusal(text_only, mode="image", image=image)
    assert refused == (
        "mode 'image' was never trained for this model (trained: text, edit); set allow_untrained_mode to run it anyway"
    )
    forced = text_only.generate(GenerationRequest(prompt="a red square", mode="image", image=image, allow_untrained_mode=True))
    assert tuple(forced.frames.shape) == (FRAMES, SIZE, SIZE, 3)
    assert [w for w in forced.metadata["warnings"] if w.startswith("mode 'image' was never trained")] != []

    trained = text_only.generate(GenerationRequest(prompt="a red square"))
    assert trained.metadata["warnings"] == []
    with pytest.raises(ValueError, match="allow_untrained_mode 'yes' must be true or false"):
        text_only.check_request(GenerationRequest(prompt="a red square", allow_untrained_mode="yes"))


def test_valid_requests_beyond_training_run_with_warnings(text_only):
    """Longer than one window (later windows continue from held frames: the extend pattern this model
    never drew) and guidance without a trained null text: allowed, and said."""
    plan = text_only.check_request(GenerationRequest(prompt="a red square", seconds=3 * FRAMES / FPS, guidance=4.0))
    assert any("each later window continues from held frames" in w for w in plan.warnings)
    assert any(w.startswith("guidance 4 mixes in the unconditional branch") for w in plan.warnings)
    assert text_only.check_request(GenerationRequest(prompt="a red square", num_frames=FRAMES)).warnings == []
    # More frames held clean than training ever held (its max_k), with a forced extension:
    held = text_only.card.max_k + 1
    assert any(w.endswith(f"holds {held} latent frames clean; training held at most {text_only.card.max_k}")
               for w in text_only.card.sampling_warnings("extend", 1.0, held, multi_window=False))  # fmt: skip


def test_inputs_are_checked_from_their_headers(text_only, inputs):
    forced = dict(allow_untrained_mode=True)
    huge = _refusal(text_only, mode="image", image=inputs / "huge.png", **forced)
    assert huge.startswith("image: 9000x9000 = 81,000,000 pixels exceeds this model's limit")
    assert f"{text_only.card.limits.max_image_pixels:,}" in huge
    assert _refusal(text_only, mode="image", image=inputs / "junk.bin", **forced).startswith("image: not a readable image (")
    assert _refusal(text_only, mode="extend", video=inputs / "junk.bin", **forced).startswith("video: not a readable video (")
    long_clip = _refusal(text_only, mode="edit", video=inputs / "clip.mp4")
    assert long_clip == f"video: 12 frames exceed this model's limit {VIDEO_FRAMES_LIMIT} for an input video"
    connect = _refusal(text_only, mode="connect", video=inputs / "junk.bin", video2=inputs / "clip.mp4", **forced)
    assert connect.startswith("video: not a readable video")  # the first input is named, not the second
