"""Caption cleaning, frame choice and the caption-set layout: the pieces of recaptioning that need
no model and no Ray (real tokenizer: the bundled MiniLM's; real MP4s encoded here)."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pytest

from model.text_encoders import load_text_tokenizer
from pipelines.caption_clean import clean_caption, repetition
from pipelines.caption_frames import fit_pixels, frame_indices, frames_from_mp4
from pipelines.caption_sets import PART_SCHEMA, check_set, part_name, read_set, set_id, set_record, write_set_manifest
from pipelines.config import DEFAULT_STRIP_PREFIXES, CaptionConfig
from pipelines.output import OutputDir
from tests.training.conftest import clip_frames, encode_mp4

CLEAN = {"strip_prefixes": DEFAULT_STRIP_PREFIXES, "min_words": 3}


@pytest.fixture(scope="module")
def minilm():
    tokenizer, limit = load_text_tokenizer("minilm")
    return tokenizer, limit


def test_boilerplate_openings_are_stripped_and_the_next_word_capitalised():
    result = clean_caption("  The video shows   a red kite\nrising over a beach. ", **CLEAN)
    assert (result.status, result.caption, result.stripped) == ("ok", "A red kite rising over a beach.", "The video shows")
    result = clean_caption('"In this video, two dogs run on wet sand."', **CLEAN)
    assert (result.caption, result.stripped) == ("Two dogs run on wet sand.", "In this video,")
    result = clean_caption("Caption: The videographer walks along a pier at dusk.", strip_prefixes=("The video",), min_words=3)
    assert result.stripped is None and result.caption.startswith("The videographer"), "a word that merely begins like an opening stays"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty: no output"),
        ("   ", "empty: 0 words"),
        ("The video shows", "empty: 0 words after stripping 'The video shows'"),
        ("I'm sorry, but I can't describe this video.", "refused: I'm sorry"),
        ("a man walks " * 30, "repetition: "),
        ("zz" * 200, "repetition: compresses to"),
    ],
)
def test_empty_refused_and_looping_outputs_fail_with_a_reason(raw, reason):
    result = clean_caption(raw, **CLEAN)
    assert result.status == "failed" and result.caption == "" and result.reason.startswith(reason), result


def test_a_varied_long_caption_is_not_a_loop():
    text = (
        "A woman in a yellow raincoat crosses a busy street at night while taxis pass, their headlights "
        "reflecting on the wet asphalt; the camera pans slowly left to follow her toward a lit cafe."
    )
    assert repetition(text) is None


def test_captions_are_capped_in_tokens_of_the_text_encoder_at_a_sentence_end(minilm):
    tokenizer, _ = minilm
    text = (
        "A small boat drifts past green hills under a pale sky. Two gulls circle above its mast. "
        "The camera tilts down to the water, where ripples spread outward slowly and catch the light of the low sun"
    )
    full = clean_caption(text, **CLEAN, tokenizer=tokenizer, max_tokens=512)
    assert full.status == "ok" and not full.truncated and full.tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    capped = clean_caption(text, **CLEAN, tokenizer=tokenizer, max_tokens=30)
    assert capped.truncated and capped.caption.endswith("its mast.") and capped.tokens <= 30 - 2  # [CLS] and [SEP] fit too
    assert text.startswith(capped.caption)
    words = clean_caption(text, **CLEAN, tokenizer=tokenizer, max_tokens=12)  # no sentence end in reach: a word boundary
    assert words.truncated and text.startswith(words.caption) and text[len(words.caption)] == " " and words.tokens <= 10


def test_an_output_cut_by_the_token_limit_loses_its_unfinished_sentence():
    text = "A dog runs along the beach chasing a ball. Waves roll in and the dog turns back toward"
    result = clean_caption(text, **CLEAN, finish_reason="length")
    assert result.caption == "A dog runs along the beach chasing a ball." and result.truncated
    assert clean_caption(text, **CLEAN, finish_reason="stop").caption == text


def test_frames_are_spread_over_the_clip_or_taken_at_a_rate():
    assert frame_indices(12, 8.0, CaptionConfig(frames=4)) == [1, 4, 7, 10]
    assert frame_indices(3, 8.0, CaptionConfig(frames=4)) == [0, 1, 2]
    assert frame_indices(1, 8.0, CaptionConfig(frames=1)) == [0]
    # one every 0.5 s at 8 fps = every 4 frames, centred, at most `frames`
    assert frame_indices(24, 8.0, CaptionConfig(frames=8, frames_fps=2.0)) == [2, 6, 10, 14, 18, 22]
    assert frame_indices(24, 8.0, CaptionConfig(frames=3, frames_fps=2.0)) == [8, 12, 16]
    assert fit_pixels(1920, 1080, 448 * 448) == (596, 336) and fit_pixels(320, 240, 448 * 448) == (320, 240)


def test_frames_from_mp4_are_the_chosen_frames_scaled_to_the_budget():
    frames = clip_frames(3, 12, 64, 48)  # (T, H, W, 3), each frame a different picture
    mp4 = encode_mp4(frames, 8.0)
    cfg = CaptionConfig(frames=4, max_pixels=40 * 30)
    jpegs = frames_from_mp4(mp4, 12, 8.0, cfg)
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for j in jpegs]
    assert len(decoded) == 4 and all(d.shape == (30, 40, 3) for d in decoded)
    for got, index in zip(decoded, [1, 4, 7, 10]):
        want = cv2.resize(frames[index], (40, 30), interpolation=cv2.INTER_AREA).astype(int)
        others = [cv2.resize(frames[i], (40, 30), interpolation=cv2.INTER_AREA).astype(int) for i in range(12) if i != index]
        error = np.abs(got.astype(int) - want).mean()
        assert error < min(np.abs(got.astype(int) - o).mean() for o in others), "the frame nearest the chosen index"
    # metadata that over-counts (a truncated member) chooses again among the frames there are
    assert len(frames_from_mp4(mp4, 40, 8.0, cfg)) == 4
    with pytest.raises(ValueError, match="cannot decode the clip"):
        frames_from_mp4(b"\x00\x00\x00\x18ftypmp42 not a video", 12, 8.0, cfg)


def _part(ids: list[str], status: str = "ok") -> pa.Table:
    rows = [{"clip_id": i, "shard": "shard-000000.tar", "caption": f"caption of {i}", "status": status} for i in ids]
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def test_a_set_is_made_by_one_model_and_prompt(tmp_path):
    out = OutputDir(str(tmp_path / "captions" / "s"))
    cfg = CaptionConfig(backend="openai", model="m", endpoint="http://h/v1")
    record = set_record(cfg, "minilm", "")
    assert check_set(out, record) is None
    write_set_manifest(out, record)
    out.write_table(part_name(["a", "b"]), _part(["a", "b"]))
    assert check_set(out, record)["set_id"] == set_id(record)
    other = set_record(cfg.model_copy(update={"prompt": "Describe {frames} frames."}), "minilm", "")
    with pytest.raises(ValueError, match=r"changed: prompt .*prompt_hash") as refused:
        check_set(out, other)
    assert "\n" not in str(refused.value)
    # the endpoint is where the model runs, not what it is: moving the server keeps the set
    assert set_id(set_record(cfg.model_copy(update={"endpoint": "http://elsewhere:8000/v1"}), "minilm", "")) == set_id(record)


def test_a_set_whose_run_failed_before_any_part_locks_nothing(tmp_path):
    out = OutputDir(str(tmp_path / "captions" / "s"))
    cfg = CaptionConfig(backend="openai", model="m", endpoint="http://h/v1")
    write_set_manifest(out, set_record(cfg, "minilm", ""))
    assert check_set(out, set_record(cfg.model_copy(update={"model": "n"}), "minilm", "")) is None


def test_read_set_keeps_one_row_per_clip(tmp_path):
    out = OutputDir(str(tmp_path / "s"))
    out.make_dirs()
    out.write_table(part_name(["a", "b"]), _part(["a", "b"]))
    out.write_table(part_name(["b", "c"]), _part(["b", "c"], status="failed"))
    table = read_set(out, ["clip_id", "status"])
    assert sorted(table.column("clip_id").to_pylist()) == ["a", "b", "c"]
    assert read_set(OutputDir(str(tmp_path / "none"))).num_rows == 0
