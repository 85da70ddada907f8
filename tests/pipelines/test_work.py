"""Per-source work results: all or nothing, from real processor rows (no Ray)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipelines.output import OutputDir
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


