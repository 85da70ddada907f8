"""The output folder: its config record, its lease, and which temp files a sweep may delete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.output import (
    CONFIG,
    LEASE,
    IngestStopped,
    LeaseToken,
    OutputDir,
    StorageError,
    Superseded,
    check_config,
    record_config,
    retry_storage,
    sweep_temp_files,
    take_lease,
)


def test_config_record_refuses_mixing_and_new_output_clears_only_ours(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    check_config(out, {"clips": {"fps": 8}}, "aaaa", new_output=False)
    assert not (tmp_path / CONFIG).exists(), "nothing is recorded before the first result"
    record_config(out, {"clips": {"fps": 8}}, "aaaa")
    (tmp_path / "shard-000000.tar").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    check_config(out, {"clips": {"fps": 8}}, "aaaa", new_output=False)  # same config: fine
    with pytest.raises(ValueError, match=r"clips\.fps 8 -> 12"):
        check_config(out, {"clips": {"fps": 12}}, "bbbb", new_output=False)
    check_config(out, {"clips": {"fps": 12}}, "bbbb", new_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_work", "notes.txt"] and not list((tmp_path / "_work").iterdir())


def test_a_failed_run_without_results_locks_no_config(tmp_path: Path) -> None:
    """Attempt markers, temp files and a lease are what a run that died before its first result
    leaves: a rerun with another config is not refused. A result without a record is."""
    out = OutputDir(str(tmp_path))
    out.make_dirs()
    (tmp_path / "_work" / "abc.process-attempt-1").write_text("{}")
    (tmp_path / "_work" / "abc.tar.tmp-1-00000000-1-1-abcdef").write_bytes(b"")
    take_lease(out)
    check_config(out, {"caption": {"backend": "metadata"}}, "bbbb", new_output=False)
    (tmp_path / "_work" / "abc.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="holds reelforge results but no _work/config.json"):
        check_config(out, {"caption": {"backend": "metadata"}}, "bbbb", new_output=False)


def _process(code: str, out: Path) -> subprocess.Popen:
    """A Python process that runs `code` (with `sys`, `OutputDir` and `take_lease` imported,
    `sys.argv[1]` = `out`), then lives until its stdin is closed."""
    prelude = "import sys; from pipelines.output import OutputDir, take_lease; "
    return subprocess.Popen(
        [sys.executable, "-u", "-c", prelude + code + "; sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_live_run_holds_the_lease_and_a_dead_ones_is_taken_over(tmp_path: Path) -> None:
    """A lease held by a running process on this host refuses a second run in one line; once that
    process is gone the lease is taken over with the next epoch, and the old token is fenced."""
    out = OutputDir(str(tmp_path))
    holder = _process("take_lease(OutputDir(sys.argv[1])); print('held')", tmp_path)
    try:
        assert holder.stdout.readline() == "held\n"
        record = json.loads((tmp_path / LEASE).read_text())
        with pytest.raises(IngestStopped, match=rf"is in use by another ingest run \({record['run_id']}, pid {holder.pid} on ") as refused:
            take_lease(out)
        assert "\n" not in str(refused.value)
    finally:
        holder.stdin.close()
        holder.wait()
    token = take_lease(out)
    assert token.epoch == record["epoch"] + 1 and out.lease == token
    old = OutputDir(str(tmp_path), LeaseToken(record["run_id"], record["epoch"]))
    with pytest.raises(Superseded, match=f"now held by run {token.run_id} \\(epoch {token.epoch}\\)"):
        old.check_fence()
    out.check_fence()


def test_sweep_deletes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    """A temp file names its writer process: one of a process that still runs is left alone (a
    killed driver's worker may still be writing it), one of a dead process goes."""
    out = OutputDir(str(tmp_path))
    out.make_dirs()
    live = _process("print(OutputDir(sys.argv[1]).temp_name('_work/live.tar'))", tmp_path)
    try:
        live_name = live.stdout.readline().strip()
        (tmp_path / live_name).write_bytes(b"being written")
        dead_name = live_name.replace(f"-{live.pid}-", f"-{_dead_pid()}-")
        (tmp_path / dead_name).write_bytes(b"left by a dead worker")
        (tmp_path / "shard-000001.tar.tmp-abc").write_bytes(b"an older naming")
        sweep_temp_files(out)
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tmp-*")) == [live_name]
    finally:
        live.stdin.close()
        live.wait()
    sweep_temp_files(out)
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_retry_storage_retries_then_names_what_failed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("pipelines.output.RETRY_DELAYS_S", (0.0, 0.0))
    out = OutputDir(str(tmp_path))
    calls = []

    def read_missing() -> bytes:
        calls.append(1)
        return out.read_bytes("nothing-here")

    with pytest.raises(StorageError, match=r"^reading: cannot read .*nothing-here: .* \(gave up after 3 tries"):
        retry_storage("reading", read_missing)
    assert len(calls) == 3
    os.makedirs(tmp_path / "_work")
    assert retry_storage("listing", lambda: out.list("_work")) == []
