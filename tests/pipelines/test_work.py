"""Per-source work results: all or nothing, from real processor rows (no Ray)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipelines.output import OutputDir, StorageError, Superseded, retry_storage, take_lease
from pipelines.work import work_keys, write_source_result


def test_failed_source_leaves_no_work_result(tmp_path: Path, processed: dict) -> None:
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    source, rows = copy.deepcopy(processed["v0"])

    def dies_midway():
        yield rows[0]
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        write_source_result(out, source, dies_midway())
    assert work_keys(out) == set()
    assert out.list("_work") == []




def test_a_superseded_worker_commits_nothing(tmp_path: Path, processed: dict) -> None:
    """A worker still carrying the token of a run whose lease a newer run took (a killed driver's
    actor living on) writes its temp files, then finds the fence and deletes them: no result."""
    newer, stale = OutputDir(str(tmp_path / "out")), OutputDir(str(tmp_path / "out"))
    take_lease(stale)
    take_lease(newer)  # the older holder is this very process: taken over at once
    source, rows = copy.deepcopy(processed["v0"])
    with pytest.raises(Superseded, match=f"now held by run {newer.lease.run_id}"):
        write_source_result(stale, source, iter(rows))
    assert work_keys(newer) == set() and stale.list("_work") == ["_work/lease.json"]
    write_source_result(newer, source, iter(copy.deepcopy(processed["v0"])[1]))
    assert work_keys(newer) == {source["source_key"]}


def test_a_vanished_temp_file_is_a_storage_error_and_a_retry_succeeds(tmp_path: Path, processed: dict, monkeypatch) -> None:
    """The failure of the issue: a sweep deleted the tar a worker was writing, so its rename
    failed. That is a StorageError (never a reject row), and the retry writes the result."""
    monkeypatch.setattr("pipelines.output.RETRY_DELAYS_S", (0.0,))
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    source, rows = processed["v0"]
    tries = []

    def attempt() -> dict:
        tries.append(1)
        rows_now = copy.deepcopy(rows)
        return write_source_result(out, dict(source), _swept(tmp_path, rows_now) if len(tries) == 1 else iter(rows_now))

    with pytest.raises(StorageError, match="cannot rename .*tar.tmp-.* to _work/.*tar: "):
        write_source_result(out, dict(source), _swept(tmp_path, copy.deepcopy(rows)))
    assert work_keys(out) == set() and out.list("_work") == []
    summary = retry_storage("writing v0", attempt)
    assert len(tries) == 2 and summary["clips_kept"] and not summary["rejected"]
    assert work_keys(out) == {source["source_key"]} and not list((tmp_path / "out").rglob("*.tmp-*"))


def _swept(tmp_path: Path, rows: list[dict]):
    """`rows`, deleting the work area's temp files after the first, as a rerun's sweep did."""
    for number, row in enumerate(rows):
        if number == 1:
            for temp in (tmp_path / "out" / "_work").glob("*.tmp-*"):
                temp.unlink()
        yield row
