"""training/data.py on real shards (PyAV-encoded H.264 in WebDataset tars + manifest.parquet)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from tests.training.conftest import uniform_clips, write_shards
from training.config import DataSection, ModelSection, TrainingConfig
from training.caption_sets import prompt_style
from training.clip_index import eval_rank, held_out_note, is_held_out, read_clip_index, without_held_out
from training.data import ClipBatches, DataPosition, TextEmbeddingCache, assign_bucket, bucket_batch_sizes, make_loader, slot_plan, usable_clips
from training.tracking import TAG_HELD_OUT, run_params, run_tags

MIXED_MODEL = ModelSection(fps=8, num_frames=8, size="32x32", buckets=["4x32x32", "8x48x32"])


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """Mixed durations and aspect ratios, one undecodable clip and one too short for any bucket."""
    clips = []
    for i in range(18):
        kind = i % 3
        clips.append(
            {
                "num_frames": [12, 5, 10][kind],
                "fps": [8.0, 8.0, 16.0][kind],  # kind 2: a 16 fps source, resampled to 8
                "width": [32, 32, 48][kind],
                "height": 32,
                "caption": f"clip {i}",
            }
        )
    # 20 frames at 16 fps = 10 at 8 fps: fits 8x48x32; the other wide ones (5 at 8 fps) only 4x32x32
    clips[2]["num_frames"] = 20
    clips[5]["num_frames"] = 20
    clips[8]["num_frames"] = 20
    clips.append({"num_frames": 3, "fps": 8.0, "width": 32, "height": 32, "caption": "too short"})
    clips.append({"num_frames": 12, "fps": 8.0, "width": 32, "height": 32, "caption": "broken", "bad": True})
    return write_shards(tmp_path_factory.mktemp("mixed"), clips, clips_per_shard=5)


def test_read_clip_index_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="no such shard folder"):
        read_clip_index(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no _SUCCESS"):
        read_clip_index(str(tmp_path / "empty"))
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(ValueError, match="no shard-"):
        read_clip_index(str(tmp_path / "empty"))
    unfinished = write_shards(tmp_path / "unfinished", uniform_clips(2), success=False)
    with pytest.raises(ValueError, match=f"{unfinished}: no _SUCCESS"):
        read_clip_index(str(unfinished))


def test_buckets_pick_aspect_then_frames_and_keep_pixels_per_batch():
    shapes = MIXED_MODEL.bucket_shapes()
    assert shapes == [(8, 32, 32), (4, 32, 32), (8, 48, 32)]
    assert assign_bucket(12, 8.0, 32, 32, shapes, 8.0) == (8, 32, 32)
    assert assign_bucket(5, 8.0, 32, 32, shapes, 8.0) == (4, 32, 32)
    assert assign_bucket(20, 16.0, 48, 32, shapes, 8.0) == (8, 48, 32)
    assert assign_bucket(3, 8.0, 32, 32, shapes, 8.0) is None
    sizes = bucket_batch_sizes(shapes, 4)
    assert sizes == {(8, 32, 32): 4, (4, 32, 32): 8, (8, 48, 32): 3}


def test_slot_plan_gives_each_clip_to_exactly_one_reader(tiny_shards):
    index = read_clip_index(str(tiny_shards))
    for num_slots in (1, 3, 4, 6, 16):  # fewer and more readers than the 4 shards
        owned = Counter()
        for slot in range(num_slots):
            for shard, keep in slot_plan(index, seed=3, epoch=1, slot=slot, num_slots=num_slots):
                members = [i for i, s in enumerate(index.shard_of) if s == shard]
                owned.update(members if keep is None else keep)
        assert owned == Counter(range(len(index))), num_slots


def _take(loaders, num_batches):
    """Round-robin batches from each rank's loader, like ranks stepping together."""
    batches = []
    iters = [iter(loader) for loader in loaders]
    for _ in range(num_batches):
        for it in iters:
            batches.append(next(it))
    return batches


def test_bucketed_batches_have_one_shape_and_cover_the_epoch_once(mixed_shards):
    index = read_clip_index(str(mixed_shards))
    usable = set(usable_clips(index, MIXED_MODEL).nonzero()[0].tolist())
    assert len(usable) == len(index) - 1  # only the 3-frame clip fits no bucket (the broken one is found on decode)
    loaders = [
        make_loader(ClipBatches(index, MIXED_MODEL, batch_size=2, seed=0, rank=rank, world_size=2), data_workers=2)
        for rank in range(2)
    ]
    batches = _take(loaders, 16)  # ~ 3 epochs of 18 usable clips
    seen = Counter()
    skipped = Counter()
    sizes = bucket_batch_sizes(MIXED_MODEL.bucket_shapes(), 2)
    for batch in batches:
        frames = batch["frames"]
        assert frames.dtype == torch.uint8
        b, t, h, w, c = frames.shape  # one shape per batch: no padding, no mixing
        assert (t, w, h) in sizes and b == sizes[(t, w, h)] and c == 3
        seen.update(zip(batch["epochs"], batch["indices"]))
        seen.update(zip(batch["skipped_epochs"], batch["skipped_indices"]))
        skipped.update(batch["skipped"])
    assert max(seen.values()) == 1  # no clip twice in any epoch
    assert {i for e, i in seen if e == 0} == set(range(len(index)))  # epoch 0: every clip, bad ones as skipped
    assert skipped["decode_error"] >= 1 and skipped["too_short"] >= 1


def test_resume_at_another_world_size_finishes_the_epoch_exactly_once(tiny_shards):
    index = read_clip_index(str(tiny_shards))
    model = ModelSection(fps=8, num_frames=8, size="32x32")
    position = DataPosition(len(index))
    trained = []
    # 2 ranks x 2 loader workers train 2 steps of batch 2, then "crash"
    loaders = [make_loader(ClipBatches(index, model, 2, 0, rank, 2, position), 2) for rank in range(2)]
    for batch in _take(loaders, 2):
        position.mark(batch["epochs"], batch["indices"])
        trained += list(zip(batch["epochs"], batch["indices"]))
    state = DataPosition.from_state_dict(position.state_dict(), len(index))
    assert state.count(0) == 8
    # resume with 3 ranks x 1 loader worker until epoch 0 is complete
    loaders = [make_loader(ClipBatches(index, model, 2, 0, rank, 3, state), 1) for rank in range(3)]
    for batch in itertools.islice(itertools.chain.from_iterable(_take(loaders, 1) for _ in range(4)), 12):
        state.mark(batch["epochs"], batch["indices"])
        trained += list(zip(batch["epochs"], batch["indices"]))
    epoch0 = Counter(i for e, i in trained if e == 0)
    assert set(epoch0) == set(range(len(index))) and max(epoch0.values()) == 1
    assert state.epoch >= 1


def test_data_position_round_trips_and_rejects_another_dataset():
    position = DataPosition(10)
    position.mark([0] * 10, list(range(10)))
    position.mark([1, 1, 2], [3, 7, 7])
    other = DataPosition(10)
    other.mark([1], [4])
    position.merge(other)
    state = position.state_dict()
    assert state["epoch"] == 1 and set(state["consumed"]) == {"1", "2"}
    restored = DataPosition.from_state_dict(state, 10)
    assert restored.epoch == 1 and restored.count(1) == 3 and restored.is_consumed(2, 7)
    assert not restored.is_consumed(2, 3)
    with pytest.raises(ValueError, match="over 10 clips but the dataset has 11"):
        DataPosition.from_state_dict(state, 11)


def test_held_out_membership_reads_only_the_clip_id(tmp_path, tiny_shards):
    ids = [f"{n:016x}-00000000-00001500" for n in range(5000)]
    for clip_id in ids[:20]:  # the rule as documented: 64 bits of the eval rank as a fraction
        assert is_held_out(clip_id, 0.3) == (int(eval_rank(clip_id)[:16], 16) / 16**16 < 0.3)
    tenth = {c for c in ids if is_held_out(c, 0.1)}
    assert abs(len(tenth) / len(ids) - 0.1) < 0.015
    assert tenth <= {c for c in ids if is_held_out(c, 0.2)} and not any(is_held_out(c, 0.0) for c in ids)
    # the same 6 clips alone, in other shards, and among 16: the same ones are held out
    few = without_held_out(read_clip_index(str(write_shards(tmp_path / "few", uniform_clips(6), clips_per_shard=2))), 0.25)
    many = without_held_out(read_clip_index(str(tiny_shards)), 0.25)
    assert few.held_out_ids and few.held_out_ids == many.held_out_ids & (set(few.ids) | few.held_out_ids)
    # no minimum: 16 clips at 1% hold out none, and the run says so; holding out every clip is refused
    assert held_out_note(without_held_out(read_clip_index(str(tiny_shards)), 0.01)).startswith("none of 16 clips held out")
    with pytest.raises(ValueError, match=r"data.held_out=0.5 leaves none of the 1 clips of .* to train on"):
        without_held_out(read_clip_index(str(write_shards(tmp_path / "one", uniform_clips(1)))), 0.5)


def test_prompt_style_takes_no_caption_of_a_held_out_clip(tiny_shards):
    """The bundle's prompt-expansion examples come from the trained clips only: a held-out clip's
    caption is an evaluation prompt and must not be shown to the model at generation time."""
    full = read_clip_index(str(tiny_shards))
    index = without_held_out(full, 0.2)
    captions = {clip_id: f"clip number {i} in colour {i % 5}" for i, clip_id in enumerate(full.ids)}
    with_all = set(prompt_style(without_held_out(full, 0.0), None)["examples"])
    examples = set(prompt_style(index, None)["examples"])
    held = {captions[clip_id] for clip_id in index.held_out_ids}
    assert held & with_all, "the check needs a held-out caption that would otherwise be chosen"
    assert examples and not examples & held
    assert examples <= {captions[clip_id] for clip_id in index.ids}


def test_the_loader_never_reads_a_held_out_clip_and_counts_only_the_trained(tiny_shards):
    full = read_clip_index(str(tiny_shards))
    index = without_held_out(full, 0.2)
    assert index.held_out_ids == {c for c in full.ids if is_held_out(c, 0.2)} and len(index.held_out_ids) == 4
    assert len(index) == 12 and set(index.ids).isdisjoint(index.held_out_ids)
    assert held_out_note(index) == "4 of 16 clips held out for evaluation (data.held_out=0.2)"
    model = ModelSection(fps=8, num_frames=8, size="32x32")
    position = DataPosition(len(index))  # over the 12 clips trained on
    loaders = [make_loader(ClipBatches(index, model, 2, 0, rank, 2, position), 0) for rank in range(2)]
    trained, skipped = Counter(), Counter()
    for batch in _take(loaders, 8):  # ~2.7 epochs of 12 clips
        position.mark(batch["epochs"], batch["indices"])
        trained.update((e, index.ids[i]) for e, i in zip(batch["epochs"], batch["indices"]))
        skipped.update(batch["skipped"])
    assert not skipped  # held-out clips are passed unread, not read and skipped as unknown
    assert not {c for _, c in trained} & index.held_out_ids
    assert {c for e, c in trained if e == 0} == set(index.ids) and max(trained.values()) == 1
    assert position.epoch >= 1  # an epoch ends without the held-out clips
    with pytest.raises(ValueError, match="over 12 clips but the dataset has 16 to train on: .*data.held_out"):
        DataPosition.from_state_dict(position.state_dict(), len(full))


def test_the_run_records_the_held_out_fraction_and_count(tiny_shards):
    config = TrainingConfig.model_validate({"data": {"held_out": 0.2}})
    params = run_params(config, str(tiny_shards))
    assert params["data.held_out"] == 0.2 and params["data.held_out_clips"] == 4
    tags = run_tags("0123456789abcdef", str(tiny_shards), config.data.held_out)  # registration copies it onto the version
    assert tags[TAG_HELD_OUT] == "0.2" and TAG_HELD_OUT not in run_tags("0123456789abcdef", str(tiny_shards))
    default = run_params(TrainingConfig(), str(tiny_shards))
    assert default["data.held_out"] == 0.01 and default["data.held_out_clips"] == 0
    for bad in (-0.1, 0.6):
        with pytest.raises(ValueError, match="held_out"):
            DataSection(held_out=bad)


def test_text_embeddings_are_computed_once_per_caption():
    from model.text_encoders import load_text_encoder

    cache = TextEmbeddingCache(load_text_encoder("minilm"), max_entries=8)
    text, mask = cache.embed(["a red fox", "a blue whale swimming slowly", "a red fox"])
    assert text.shape[0] == 3 and mask.shape == text.shape[:2]
    assert torch.equal(text[0], text[2]) and cache.misses == 2 and cache.hits == 1
    again, _ = cache.embed(["a blue whale swimming slowly"])
    assert cache.misses == 2 and torch.equal(again[0, : mask[1].sum()], text[1, : mask[1].sum()])


@pytest.mark.slow
def test_reads_real_ingest_output(ray_local, tmp_path):
    """The contract end to end: `reelforge ingest` output (not our fixture writer) streams into batches."""
    from fractions import Fraction

    from infra.footage import FootageSpec, varied_shots, write_video
    from infra.ingest import main as ingest

    src = tmp_path / "src"
    for i in range(2):
        shots = varied_shots([("moving", 2.5), ("moving", 2.5)], offset=4 * i)
        write_video(FootageSpec(f"v{i}", "mp4", "libx264", 96, 64, Fraction(12), shots), src / f"v{i}.mp4")
    out = tmp_path / "shards"
    settings = ["clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=48x32",
                "shards.target_mb=0.01", "caption.backend=metadata"]  # fmt: skip
    assert ingest([str(src), "--out", str(out), *[a for s in settings for a in ("--set", s)]]) == 0

    index = read_clip_index(str(out))
    model = ModelSection(fps=8, num_frames=8, size="48x32")
    usable = set(usable_clips(index, model).nonzero()[0].tolist())
    assert len(index) >= 2 and usable
    dataset = ClipBatches(index, model, batch_size=1, seed=0, rank=0, world_size=1)
    seen = Counter()
    for batch in itertools.islice(iter(make_loader(dataset, data_workers=0)), len(index) * 2):
        assert tuple(batch["frames"].shape) == (1, 8, 32, 48, 3) and batch["captions"][0]
        seen.update(zip(batch["epochs"], batch["indices"]))
    assert max(seen.values()) == 1 and {i for e, i in seen if e == 0} == usable


def write_caption_set(shards, name: str, captions: dict[str, str | None]) -> str:
    """A caption set as `reelforge recaption` writes it (pipelines/caption_sets.py): the ids in
    `captions` get that caption (None: status failed); returns its set id."""
    import pyarrow as pa

    from pipelines.caption_sets import PART_SCHEMA, part_name, set_id, set_record, set_uri, write_set_manifest
    from pipelines.config import CaptionConfig
    from pipelines.output import OutputDir, mark_success

    out = OutputDir(set_uri(str(shards), name))
    record = set_record(CaptionConfig(backend="openai", model="dense-captioner", endpoint="http://h/v1"), "minilm", "r1")
    write_set_manifest(out, record)
    rows = [
        {"clip_id": i, "caption": c or "", "status": "ok" if c else "failed", "reason": None if c else "refused: no"}
        for i, c in captions.items()
    ]
    for chunk in (rows[: len(rows) // 2], rows[len(rows) // 2 :]):
        out.write_table(part_name([r["clip_id"] for r in chunk]), pa.Table.from_pylist(chunk, schema=PART_SCHEMA))
    mark_success(out)
    return set_id(record)


def test_a_caption_set_replaces_the_captions_and_clips_without_one_are_skipped(tmp_path):
    shards = write_shards(tmp_path / "shards", uniform_clips(8), clips_per_shard=4)
    ids = read_clip_index(str(shards)).ids
    dense = {clip_id: (f"a dense caption of clip {k}" if k % 4 else None) for k, clip_id in enumerate(ids)}
    set_id = write_caption_set(shards, "dense", dense)
    index = read_clip_index(str(shards), "dense")
    assert index.caption_set_id == set_id and index.captions == [dense[i] for i in ids]
    model = ModelSection(fps=8, num_frames=8, size="32x32")
    assert usable_clips(index, model).tolist() == [bool(dense[i]) for i in ids]
    batches = _take([make_loader(ClipBatches(index, model, batch_size=2, seed=0, rank=0, world_size=1), data_workers=0)], 6)
    captions = [c for batch in batches for c in batch["captions"]]
    assert captions and set(captions) <= {c for c in dense.values() if c}, "never the shards' own captions"
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    assert skipped["no_caption_in_set"] >= 2
    with pytest.raises(ValueError, match=r"data.caption_set=other: no caption set .*reelforge recaption"):
        read_clip_index(str(shards), "other")
    (shards / "captions" / "dense" / "_SUCCESS").unlink()
    with pytest.raises(ValueError, match="is unfinished"):
        read_clip_index(str(shards), "dense")
