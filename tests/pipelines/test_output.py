"""The output folder's config record: one output, one ingest config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.output import CONFIG, OutputDir, check_config


def test_config_record_refuses_mixing_and_new_output_clears_only_ours(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    check_config(out, {"clips": {"fps": 8}}, "aaaa", new_output=False)
    (tmp_path / "shard-000000.tar").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    check_config(out, {"clips": {"fps": 8}}, "aaaa", new_output=False)  # same config: fine
    with pytest.raises(ValueError, match=r"clips\.fps 8 -> 12"):
        check_config(out, {"clips": {"fps": 12}}, "bbbb", new_output=False)
    check_config(out, {"clips": {"fps": 12}}, "bbbb", new_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_work", "notes.txt"]
    assert json.loads(out.read_bytes(CONFIG))["config_hash"] == "bbbb"


