"""Near-duplicate detection: the banded index must agree with a brute-force scan."""

from __future__ import annotations

import random

import pytest

from pipelines.dedup import NearDuplicateIndex, find_near_duplicates
from pipelines.filters import PHASH_BITS


def _brute_force(clips: list[tuple[str, str]], max_distance: int) -> dict[str, tuple[str, int]]:
    kept: list[tuple[str, int]] = []
    duplicates = {}
    for clip_id, phash in clips:
        value = int(phash, 16)
        match = next(((kid, (value ^ kv).bit_count()) for kid, kv in kept if (value ^ kv).bit_count() <= max_distance), None)
        if match is None:
            kept.append((clip_id, value))
        else:
            duplicates[clip_id] = match
    return duplicates


def _flip(value: int, bits: int, count: int, rng: random.Random) -> int:
    for bit in rng.sample(range(bits), count):
        value ^= 1 << bit
    return value


@pytest.mark.parametrize(("bits", "max_distance"), [(64, 0), (64, 3), (64, 10), (64, 64), (PHASH_BITS, 12), (PHASH_BITS, 30)])
def test_banded_index_matches_brute_force(bits: int, max_distance: int) -> None:
    rng = random.Random(max_distance)
    bases = [rng.getrandbits(bits) for _ in range(40)]
    clips = []
    for i in range(400):
        # near copies of a few bases at distances around the threshold, plus unrelated hashes
        value = _flip(rng.choice(bases), bits, rng.randint(0, min(bits, 2 * max_distance + 4)), rng) if i % 3 else rng.getrandbits(bits)
        clips.append((f"clip-{i:04d}", f"{value:0{bits // 4}x}"))
    assert find_near_duplicates(clips, max_distance) == _brute_force(clips, max_distance)


def test_earliest_kept_clip_wins_and_rejected_clips_do_not_shadow() -> None:
    a, b, c = "0000000000000000", "0000000000000007", "000000000000003f"  # a-b: 3 bits, b-c: 3 bits, a-c: 6 bits
    assert find_near_duplicates([("a", a), ("b", b), ("c", c)], 3) == {"b": ("a", 3)}
    # c is 3 bits from b, but b was rejected: only kept clips count, and c is 6 bits from a.


def test_index_prefilled_with_earlier_clips_spans_runs() -> None:
    index = NearDuplicateIndex(2)
    index.add("old", "ffff000000000000")
    found = find_near_duplicates([("new", "ffff000000000001"), ("other", "00000000ffffffff")], 2, index)
    assert found == {"new": ("old", 1)}
    assert len(index) == 2


def test_missing_phash_is_kept_and_bad_phash_is_named() -> None:
    assert find_near_duplicates([("a", None), ("b", "")], 4) == {}
    with pytest.raises(ValueError, match="'zz'"):
        find_near_duplicates([("a", "zz")], 4)
    with pytest.raises(ValueError, match="bits"):
        find_near_duplicates([("a", "00"), ("b", "0000")], 1)
