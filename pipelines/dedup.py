"""Run-wide near-duplicate detection on perceptual hashes (`phash`, hex strings).

Clips are visited in a fixed order; a clip whose phash is within `max_distance` bits
(Hamming distance) of an *earlier kept* clip is a near-duplicate of that clip. Rejected
clips do not shadow later ones, so the outcome depends only on the order, which the job
makes deterministic (clips already in the manifest first, then new ones sorted by source
sha256 and clip start).

Lookup uses multi-index hashing: cut every hash into `max_distance + 1` bit bands; two hashes
within `max_distance` bits agree exactly on at least one band (pigeonhole), so only clips
sharing a band are compared. That keeps a million-clip index at dictionary speed instead of
a million popcounts per clip.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable


class NearDuplicateIndex:
    """The kept clips seen so far, searchable by Hamming distance of their phash."""

    def __init__(self, max_distance: int) -> None:
        if max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, got {max_distance}")
        self.max_distance = max_distance
        self._bits: int | None = None
        self._bands: list[tuple[int, int]] = []  # (shift, mask) per band
        self._tables: list[dict[int, list[int]]] = []
        self._hashes: list[int] = []
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    def nearest(self, phash: str) -> tuple[str, int] | None:
        """(id, distance) of the earliest kept clip within max_distance of `phash`, or None."""
        value = self._parse(phash)
        best: tuple[int, int] | None = None  # (index, distance): earliest index wins for determinism
        for index in self._candidates(value):
            distance = (value ^ self._hashes[index]).bit_count()
            if distance <= self.max_distance and (best is None or index < best[0]):
                best = (index, distance)
        return None if best is None else (self._ids[best[0]], best[1])

    def _candidates(self, value: int) -> set[int]:
        if self._bits is not None and self.max_distance >= self._bits:
            # Every band may differ, so pigeonhole promises nothing: compare with everything.
            return set(range(len(self._ids)))
        found: set[int] = set()
        for (shift, mask), table in zip(self._bands, self._tables):
            found.update(table.get((value >> shift) & mask, ()))
        return found

    def add(self, clip_id: str, phash: str) -> None:
        value = self._parse(phash)
        index = len(self._ids)
        self._ids.append(clip_id)
        self._hashes.append(value)
        for (shift, mask), table in zip(self._bands, self._tables):
            table[(value >> shift) & mask].append(index)

    def _parse(self, phash: str) -> int:
        bits = 4 * len(phash)
        try:
            value = int(phash, 16)
        except (TypeError, ValueError):
            raise ValueError(f"phash {phash!r} is not a hex string") from None
        if self._bits is None:
            self._init_bands(bits)
        elif bits != self._bits:
            raise ValueError(f"phash {phash!r} has {bits} bits, the index holds {self._bits}-bit hashes")
        return value

    def _init_bands(self, bits: int) -> None:
        self._bits = bits
        num_bands = min(self.max_distance + 1, bits)
        edges = [round(i * bits / num_bands) for i in range(num_bands + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self._tables = [defaultdict(list) for _ in self._bands]


def find_near_duplicates(
    clips: Iterable[tuple[str, str | None]],
    max_distance: int,
    index: NearDuplicateIndex | None = None,
) -> dict[str, tuple[str, int]]:
    """{clip id: (id of the earlier kept clip it repeats, distance)} for the clips in `clips`
    (ordered (id, phash) pairs) that are near-duplicates; every other clip is added to `index`
    as kept. Pass an `index` pre-filled with clips kept earlier (e.g. the manifest) to
    deduplicate across runs. Clips without a phash are kept and never match."""
    index = NearDuplicateIndex(max_distance) if index is None else index
    duplicates: dict[str, tuple[str, int]] = {}
    for clip_id, phash in clips:
        if not phash:
            continue
        match = index.nearest(phash)
        if match is None:
            index.add(clip_id, phash)
        else:
            duplicates[clip_id] = match
    return duplicates
