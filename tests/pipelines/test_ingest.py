"""`reelforge ingest` (infra/ingest.py, over pipelines.ingest.run_ingest) end to end on a real
local Ray with real generated footage and real bad files.

One clean run is shared by the module; the other tests copy its output or rerun into it.
The SIGKILL test starts the command as a subprocess attached to the same Ray cluster
(RAY_ADDRESS), kills its whole process group mid-run and reruns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset

from infra.config import load_config
from infra.footage import FootageSpec, varied_shots, write_video
from infra.ingest import main
from pipelines.config import IngestConfig
from pipelines.discover import SourceFile, discover_sources
from pipelines.ingest import ProcessSource, ingest_settings, probe_row, run_ingest
from pipelines.output import OutputDir, StorageError, take_lease
from pipelines.probe import PROBE_FIELDS, probe_source
from pipelines.work import record_attempt

REPO = Path(__file__).resolve().parents[2]
SETTINGS = ["clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=64x64",
            "shards.target_mb=0.02", "caption.backend=metadata"]  # fmt: skip
ARGS = [arg for setting in SETTINGS for arg in ("--set", setting)]


def _video(path: Path, codec: str, offset: int) -> None:
    shots = varied_shots([("moving", 2.5), ("moving", 2.5), ("moving", 2.5)], offset=offset)
    write_video(FootageSpec(path.stem, path.suffix[1:], codec, 160, 120, Fraction(12), shots), path)


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory, bad_footage, damaged_footage, copy_footage) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("footage")
    src, extra = root / "src", root / "extra"
    src.mkdir()
    extra.mkdir()
    _video(src / "v0.mp4", "libx264", 0)
    _video(src / "v0_reencoded.avi", "mpeg4", 0)  # same pictures, other bytes: near-duplicates of v0
    _video(src / "v1.mkv", "libx264", 5)
    (src / "v1.txt").write_text("a sidecar is never a source")
    bad = copy_footage(bad_footage, src / "bad")
    damaged = copy_footage(damaged_footage, src / "damaged")  # decode fails or stops part way
    _video(extra / "v2.mp4", "libx264", 10)
    return {"src": src, "extra": extra, **{f"bad_{name}": path for name, path in bad.items()},
            **{f"damaged_{name}": path for name, path in damaged.items()}}  # fmt: skip


@pytest.fixture(scope="module")
def clean_run(ray_local, footage: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    assert main([str(footage["src"]), "--out", str(out), *ARGS]) == 0
    return out


def _files(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every output file: (mtime_ns, bytes), to prove a rerun touched nothing."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


@pytest.mark.slow
def test_clean_run_writes_the_shard_contract(clean_run: Path, footage: dict[str, Path], ray_local) -> None:
    manifest = pq.read_table(clean_run / "manifest.parquet").to_pylist()
    rejects = pq.read_table(clean_run / "rejects.parquet").to_pylist()
    sources = pq.read_table(clean_run / "sources.parquet").to_pylist()
    stats = json.loads((clean_run / "stats.json").read_text())

    # Every bad file is one source-level reject row with its stage and reason.
    bad = {str(path): name for name, path in footage.items() if name.startswith("bad_")}
    source_rejects = {r["uri"]: r for r in rejects if r["id"] is None}
    assert set(source_rejects) == set(bad)
    assert all(r["stage"] in ("probe", "decode") and r["reason"] for r in source_rejects.values())
    assert "audio" in source_rejects[str(footage["bad_audio_only"])]["reason"]
    damaged = {str(path) for name, path in footage.items() if name.startswith("damaged_")}
    good = {str(footage["src"] / n) for n in ("v0.mp4", "v0_reencoded.avi", "v1.mkv")}
    assert {s["uri"] for s in sources} == set(bad) | damaged | good
    # Damaged files: what decoded before the damage is judged as usual, the rest is one "decode" span.
    decode_rejects = {r["uri"]: r for r in rejects if r["stage"] == "decode"}
    assert set(decode_rejects) == damaged and all(r["id"] and "stopped" in r["reason"] for r in decode_rejects.values())

    # Near-duplicates: for each scene, v0 and its re-encode keep exactly one clip, the other names it.
    kept = {r["id"]: r for r in manifest}
    dedup = [r for r in rejects if r["stage"] == "dedup"]
    other = [kept.get(r["reason"].removeprefix("near-duplicate of ").split(" from ")[0]) for r in dedup]
    assert dedup and all(other)
    # The reason names the clip it repeats by source file and span, not only by id.
    assert all(r["reason"].endswith(f" from {o['source_uri']} {o['start_s']:.2f}-{o['end_s']:.2f} s") for r, o in zip(dedup, other))
    pairs = [(r["uri"], o["source_uri"]) for r, o in zip(dedup, other)]
    assert {frozenset(Path(u).name for u in pair) for pair in pairs} >= {frozenset({"v0.mp4", "v0_reencoded.avi"})}

    # Shards: readable by webdataset and by Ray Data, one sample per manifest row, ids unique.
    tars = sorted(str(p) for p in clean_run.glob("shard-*.tar"))
    assert len(tars) == len(stats["shards"]) > 1
    keys = [s["__key__"] for s in webdataset.WebDataset(tars, shardshuffle=False)]
    assert keys == [r["id"] for r in manifest] and len(set(keys)) == len(keys)
    assert ray_local.data.read_webdataset(tars).count() == len(manifest)
    assert {r["shard"] for r in manifest} == {Path(t).name for t in tars}

    assert stats["clips"]["kept"] == len(manifest)
    assert stats["clips"]["rejected"] == sum(1 for r in rejects if r["id"] is not None)
    assert stats["sources"] == {"total": len(sources), "ok": len(good | damaged), "rejected": len(bad)}
    assert stats["versions"]["ray"] == ray_local.__version__ and len(stats["config_hash"]) == 16
    assert stats["last_run"]["source_seconds_per_wall_s"] > 0
    assert (clean_run / "report.html").stat().st_size > 0
    # _SUCCESS is the last file written.
    newest = max(p.stat().st_mtime_ns for p in clean_run.iterdir() if p.is_file())
    assert (clean_run / "_SUCCESS").stat().st_mtime_ns == newest


@pytest.mark.slow
def test_rerun_does_no_work_and_touches_nothing(clean_run: Path, footage: dict[str, Path], capsys) -> None:
    before = _files(clean_run)
    assert main([str(footage["src"]), "--out", str(clean_run), *ARGS]) == 0
    assert _files(clean_run) == before
    assert "| sources ok / rejected |" in capsys.readouterr().out


@pytest.mark.slow
def test_added_files_are_processed_alone_and_appended(clean_run: Path, footage: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(clean_run, out)
    before = _shards(out)
    assert main([str(footage["src"]), str(footage["extra"]), "--out", str(out), *ARGS]) == 0
    after = _shards(out)
    assert {name: after[name] for name in before} == before, "committed shards are never rewritten"
    assert sorted(after) == [f"shard-{i:06d}.tar" for i in range(len(after))] and len(after) > len(before)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["last_run"]["sources"] == 1, "only the new file is processed"
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    new_rows = [r for r in manifest if r["source_uri"] == str(footage["extra"] / "v2.mp4")]
    assert new_rows and {r["shard"] for r in new_rows} == set(after) - set(before)
    keys = [s["__key__"] for s in webdataset.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")), shardshuffle=False)]
    assert keys == [r["id"] for r in manifest]


@pytest.mark.slow
def test_changed_config_refuses_to_mix_unless_new_output(clean_run: Path, footage: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(clean_run, out)
    (out / "keep-me.txt").write_text("not ours")
    changed = [str(footage["src"] / "v1.mkv"), "--out", str(out), *ARGS, "--set", "clips.fps=6"]
    with pytest.raises(SystemExit, match=r"clips\.fps 8\.0 -> 6\.0"):
        main(changed)
    assert _shards(out) == _shards(clean_run)
    assert main([*changed, "--new-output"]) == 0
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["source_uri"] for r in manifest} == {str(footage["src"] / "v1.mkv")} and {r["fps"] for r in manifest} == {6.0}
    assert (out / "keep-me.txt").read_text() == "not ours"


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_clean_result(
    clean_run: Path, footage: dict[str, Path], tmp_path: Path, ray_local
) -> None:
    out = tmp_path / "out"
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "infra", "ingest", str(footage["src"]), "--out", str(out), *ARGS]
    # A session of its own: the kill takes the driver and anything it started, never this test.
    log = tmp_path / "killed-run.log"  # a file, not a pipe: a full pipe would stall the run we wait on
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=sink)
    deadline = time.monotonic() + 120
    try:
        # Kill once the first processed source's result is in (the probe rejects are written last).
        while not list((out / "_work").glob("*.parquet")):
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no per-source result appeared"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "_SUCCESS").exists(), "the run was meant to die mid-way"

    assert main([str(footage["src"]), "--out", str(out), *ARGS]) == 0
    assert _shards(out) == _shards(clean_run)
    ids = pq.read_table(out / "manifest.parquet", columns=["id"]).column("id").to_pylist()
    assert ids == pq.read_table(clean_run / "manifest.parquet", columns=["id"]).column("id").to_pylist()
    assert _reject_rows(out) == _reject_rows(clean_run), "no healthy source or clip rejected by the kill"
    assert not list((out / "_work").glob("*.tar")) and not list(out.rglob("*.tmp-*"))


def _reject_rows(out: Path) -> list[tuple[str, str, str, str]]:
    rows = pq.read_table(out / "rejects.parquet").to_pylist()
    return sorted((r["uri"], r["id"] or "", r["stage"], r["reason"]) for r in rows)


@pytest.mark.slow
def test_only_bad_sources_exit_1_with_every_reject_recorded(ray_local, footage: dict[str, Path], tmp_path: Path) -> None:
    assert main([str(footage["src"] / "bad"), "--out", str(tmp_path / "out"), *ARGS]) == 1
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert len(rejects) == 5 and all(r["reason"] for r in rejects)


def test_process_source_streams_each_clip_into_the_work_tar(tmp_path: Path) -> None:
    """The actor hands write_source_result a generator, so its memory is one clip's MP4 bytes,
    not a source's: peak Python memory for 48 s of footage stays within two clips of the peak
    for 8 s. Lossless 256x256 clips (~100 kB each) make holding them all stand out."""
    settings = ingest_settings(load_config(None, [
        "clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=256x256", "clips.crf=0",
        "clips.x264_preset=ultrafast", "clips.max_upscale=3", "filters.mode=score", "caption.backend=none"]))  # fmt: skip
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    actor = ProcessSource(settings, out)  # it probes each source too: 128x96 to 256x256 is 2.67x
    sources = {}
    for seconds in (8, 48):
        spec = FootageSpec(f"long{seconds}", "mp4", "libx264", 128, 96, Fraction(12), varied_shots([("moving", 4.0)] * (seconds // 4)))
        path = write_video(spec, tmp_path / spec.filename).path
        sources[seconds] = discover_sources([str(path)])[0].as_row() | probe_source(str(path))
    actor(sources[8] | {"source_key": "warm-up"})  # first-call allocations (codec tables) are not per-source
    peaks = {}
    for seconds, source in sources.items():
        tracemalloc.start()
        summary = actor(source)
        peaks[seconds] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary["clips_kept"] >= seconds // 2 - 1 and not summary["rejected"]
    with tarfile.open(tmp_path / "out" / "_work" / f"{sources[48]['source_key']}.tar") as tar:
        sizes = [member.size for member in tar.getmembers()]
    assert len(sizes) >= 23 and max(sizes) > 50_000
    # Holding the 48 s source's clips would add sum(sizes) (~2 MB) over the 8 s peak.
    assert peaks[48] < peaks[8] + 2 * max(sizes), (peaks, max(sizes), sum(sizes))


def test_bad_arguments_fail_before_any_work(footage: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no-such-folder"):
        main([str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="clips.fps"):
        main([str(footage["src"]), "--out", str(tmp_path / "out"), "--set", "clips.fps=-1"])
    with pytest.raises(SystemExit, match="clips.max_upscale"):
        main([str(footage["src"]), "--out", str(tmp_path / "out"), "--set", "clips.max_upscale=0.5"])
    with pytest.raises(SystemExit, match="--max-attempts must be >= 1, got 0"):
        main([str(footage["src"]), "--out", str(tmp_path / "out"), "--max-attempts", "0"])
    assert not (tmp_path / "out").exists()


def test_run_ingest_raises_one_line_value_errors_before_any_work(footage: dict[str, Path], tmp_path: Path) -> None:
    """The entry function itself, without the command line: bad input is a ValueError naming it."""
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="no-such-folder"):
        run_ingest(IngestConfig(), [str(tmp_path / "no-such-folder")], out)
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        run_ingest(IngestConfig(), [str(footage["src"])], out, num_workers=0)
    with pytest.raises(ValueError, match="max_attempts must be >= 1, got 0"):
        run_ingest(IngestConfig(), [str(footage["src"])], out, max_attempts=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_source_that_keeps_killing_its_worker_becomes_a_crash_reject(ray_local, tmp_path: Path) -> None:
    """A real worker process killed under a real source, as FFmpeg crashing or the OOM killer would:
    every time the source's next attempt marker appears, the test signals the pid written in it
    (SIGKILL twice, then SIGSEGV). Ray restarts the actor and resends the source; the fourth
    attempt finds three markers and writes a "crash" reject. The other sources finish, exit 0.
    The sources share one Ray Data block (as small sources do), so each resend of the block
    carries ok.mp4 too, whose result is written already: it is not processed again."""
    import psutil

    src = tmp_path / "src"
    src.mkdir()
    # The poisoned source is long, so no attempt at it can finish in the moment between its marker
    # appearing and the test's signal arriving, however busy the machine.
    for name, width, height, seconds in (("ok", 160, 120, 5.0), ("poison", 160, 120, 120.0), ("tiny", 40, 30, 3.0)):
        spec = FootageSpec(name, "mp4", "libx264", width, height, Fraction(12), varied_shots([("moving", seconds / 2)] * 2))
        write_video(spec, src / spec.filename)
    out = tmp_path / "out"
    ok, poison = discover_sources([str(src / "ok.mp4"), str(src / "poison.mp4")])  # sorted by uri
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    # `reelforge ingest` with every source in one block (BLOCKS_PER_WORKER 1: one block for 3 sources)
    one_block = "import sys, pipelines.ingest, infra.cli; pipelines.ingest.BLOCKS_PER_WORKER = 1; sys.exit(infra.cli.main())"
    command = [sys.executable, "-c", one_block, "ingest", str(src), "--out", str(out), "--workers", "1", *ARGS]
    log = tmp_path / "run.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=sink)
    killed: list[int] = []
    ok_results: list[os.stat_result] = []
    deadline = time.monotonic() + 150
    try:
        for attempt, sig in enumerate((signal.SIGKILL, signal.SIGKILL, signal.SIGSEGV), start=1):
            marker = out / "_work" / f"{poison.source_key}.process-attempt-{attempt}"
            while not marker.exists():
                assert process.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, f"no attempt {attempt} on the poisoned source"
                time.sleep(0.01)
            pid = json.loads(marker.read_text())["pid"]
            assert pid not in killed, "each attempt runs in a new worker process"
            # ok.mp4 comes first in the block: its result is in before the first kill
            ok_results.append((out / "_work" / f"{ok.source_key}.parquet").stat())
            psutil.Process(pid).send_signal(sig)
            killed.append(pid)
        assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # the two resends of the block between the kills left ok.mp4's result as it was
    assert len({(result.st_ino, result.st_mtime_ns) for result in ok_results}) == 1, "a resent block redid ok.mp4"
    rejects = {r["uri"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["id"] is None}
    crash = rejects.pop(str(src / "poison.mp4"))
    assert crash["stage"] == "crash"
    assert crash["reason"].startswith(f"worker process died 3 times while processing this source (last: pid {killed[-1]} ")
    assert "Segmentation fault, while in " in crash["reason"]  # the last death was a SIGSEGV: faulthandler named it
    tiny = rejects.pop(str(src / "tiny.mp4"))
    assert (tiny["stage"], tiny["reason"]) == ("size", "source 40x30 needs 2.13x upscaling to 64x64; clips.max_upscale is 2.0")
    assert not rejects
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert manifest and {r["source_uri"] for r in manifest} == {str(src / "ok.mp4")}
    sources = {r["uri"]: r["status"] for r in pq.read_table(out / "sources.parquet").to_pylist()}
    assert sources == {str(src / "ok.mp4"): "ok", str(src / "poison.mp4"): "rejected", str(src / "tiny.mp4"): "rejected"}
    assert not list((out / "_work").glob("*attempt*")), "markers go once the outcome is committed"
    text = log.read_text(errors="replace")
    assert "rejected (stage size)" in text and f"{src / 'tiny.mp4'} (40x30, 2.13x)" in text  # the probe's notes
    assert f"| {src / 'poison.mp4'} | crash | worker process died 3 times" in text  # end-of-run summary

    before = _files(out)
    assert main([str(src), "--out", str(out), *ARGS]) == 0
    assert _files(out) == before, "a rerun neither retries the crashed source nor the too-small one"


def test_probe_attempts_of_dead_workers_are_counted_then_give_a_crash_reject(tmp_path: Path) -> None:
    """The probe stage's attempt markers without Ray: markers left by workers that died (as after
    a killed run) are counted, a probe under the limit proceeds and clears them, and at the limit
    the source becomes a "crash" reject naming the last worker's pid and host."""
    spec = FootageSpec("v", "mp4", "libx264", 160, 120, Fraction(12), varied_shots([("moving", 1.0)]))
    source = discover_sources([str(write_video(spec, tmp_path / spec.filename).path)])[0]
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    info = {"pid": int(dead.stdout), "host": socket.gethostname(), "started_at": 0.0}
    clips = load_config(None, SETTINGS).clips

    for number in (1, 2):
        record_attempt(out, source.source_key, "probe", number, info)
    row = probe_row(source.as_row(), clips, out, max_attempts=3)
    assert row["reject_stage"] is None and row["sha256"]
    assert not list((tmp_path / "out" / "_work").iterdir()), "a finished probe clears its markers"

    for number in (1, 2, 3):
        record_attempt(out, source.source_key, "probe", number, info)
    row = probe_row(source.as_row(), clips, out, max_attempts=3)
    assert row["reject_stage"] == "crash"
    assert row["reject_reason"] == (
        f"worker process died 3 times while probing this source (last: pid {info['pid']} on {info['host']}, "
        "no fatal-signal report, so SIGKILL (an out-of-memory kill by the kernel or Ray, kill -9, or its run being killed))"
    )
    assert set(row) >= set(PROBE_FIELDS) and not list((tmp_path / "out" / "_work").iterdir())


def test_process_source_skips_a_source_already_written_and_rejects_one_out_of_attempts(tmp_path: Path) -> None:
    """The actor's side without Ray: a source Ray resends after its result was written (the worker
    died just after) is not processed again, and one whose attempts are used up is a crash reject."""
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    actor = ProcessSource(ingest_settings(load_config(None, SETTINGS)), out, max_attempts=2)
    rows = []
    for name in ("done", "poison"):
        spec = FootageSpec(name, "mp4", "libx264", 160, 120, Fraction(12), varied_shots([("moving", 1.5)]))
        path = str(write_video(spec, tmp_path / spec.filename).path)
        rows.append(discover_sources([path])[0].as_row() | probe_source(path))
    done, poison = rows
    info = {"pid": 1, "host": "another-node", "started_at": 0.0}

    first = actor(done)
    assert first["clips_kept"] and not first["rejected"]
    work = tmp_path / "out" / "_work" / f"{done['source_key']}.parquet"
    written = work.stat().st_mtime_ns
    record_attempt(out, done["source_key"], "process", 1, info)  # its worker died before clearing this
    assert actor(done) == first and work.stat().st_mtime_ns == written
    assert not list((tmp_path / "out" / "_work").glob("*attempt*"))

    for number in (1, 2):
        record_attempt(out, poison["source_key"], "process", number, info)
    summary = actor(poison)
    assert summary["rejected"] and summary["reject_stage"] == "crash" and summary["clips_kept"] == 0
    assert summary["reject_reason"] == (
        "worker process died 2 times while processing this source "
        "(last: pid 1 on another-node, cause not visible from this host; see that node's Ray worker logs)"
    )
    assert not list((tmp_path / "out" / "_work").glob("*attempt*"))


def test_a_bare_stream_is_recorded_with_the_duration_it_decoded_to(tmp_path: Path) -> None:
    """A bare MPEG-1 stream (no container, like real .mpg/.m1v files) has no duration FFmpeg can
    trust (it guesses ~0.02 s from the bitrate): the probe leaves it unknown, and the actor records
    the duration and frame count it decoded, so sources.parquet and stats.json say 4 s, not 0.02."""
    spec = FootageSpec("bare", "m1v", "mpeg1video", 320, 240, Fraction(25), varied_shots([("moving", 4.0)]), pix_fmt="yuv420p")
    path = str(write_video(spec, tmp_path / spec.filename).path)
    probed = probe_source(path)
    assert (probed["container"], probed["duration_s"], probed["num_frames"], probed["reject_stage"]) == ("mpegvideo", None, None, None)
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    source = discover_sources([path])[0]
    summary = ProcessSource(ingest_settings(load_config(None, SETTINGS)), out)(source.as_row())
    assert not summary["rejected"] and summary["clips_kept"] + summary["clips_rejected"] >= 1
    facts = json.loads(pq.read_schema(tmp_path / "out" / "_work" / f"{source.source_key}.parquet").metadata[b"reelforge.source"])
    # 100 frames at 25 fps; the stream's timestamps start one frame in, so the last one ends at 4.04 s
    assert facts["num_frames"] == 100 and facts["duration_s"] == pytest.approx(4.04)


def test_only_the_source_makes_a_reject_never_our_storage(tmp_path: Path, monkeypatch) -> None:
    """The actor's error classes without Ray: an exception of the source's processing is a
    "process" reject, as before; a failure to write our output (here the tar's final name is
    taken by a folder, so the rename fails) is retried, then raised as StorageError, leaving
    no result, no reject and no attempt marker, so the next run processes the source."""
    monkeypatch.setattr("pipelines.output.RETRY_DELAYS_S", (0.0, 0.0))
    out = OutputDir(str(tmp_path / "out"))
    out.make_dirs()
    actor = ProcessSource(ingest_settings(load_config(None, SETTINGS)), out)
    spec = FootageSpec("v", "mp4", "libx264", 160, 120, Fraction(12), varied_shots([("moving", 1.5)]))
    path = str(write_video(spec, tmp_path / spec.filename).path)
    row = discover_sources([path])[0].as_row() | probe_source(path)

    broken = actor.process(row | {"source_key": "broken", "fps": "not a number"})  # as if probed so
    assert broken["rejected"] and broken["reject_stage"] == "process" and "ValueError" in broken["reject_reason"]

    (tmp_path / "out" / "_work" / f"{row['source_key']}.tar").mkdir()
    with pytest.raises(StorageError, match=r"^processing .*v\.mp4: cannot rename .* \(gave up after 3 tries"):
        actor(row)
    assert {p.name for p in (tmp_path / "out" / "_work").iterdir()} == {"broken.parquet", "broken.tar", f"{row['source_key']}.tar"}


def test_attempts_of_earlier_runs_and_of_this_process_are_no_deaths(tmp_path: Path) -> None:
    """Only a worker of this run that died with the source counts towards a crash reject: a
    marker of an earlier run (its worker died with its killed driver) or of this very process
    (a try that ended in an exception) does not."""
    spec = FootageSpec("v", "mp4", "libx264", 160, 120, Fraction(12), varied_shots([("moving", 1.0)]))
    source = discover_sources([str(write_video(spec, tmp_path / spec.filename).path)])[0]
    out = OutputDir(str(tmp_path / "out"))
    take_lease(out)
    take_lease(out)  # epoch 2
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    killed_run = {"pid": int(dead.stdout), "host": socket.gethostname(), "started_at": 0.0, "epoch": 1}
    this_process = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(), "epoch": 2}
    for number, info in enumerate([killed_run, killed_run, killed_run, this_process], start=1):
        record_attempt(out, source.source_key, "probe", number, info)
    clips = load_config(None, SETTINGS).clips
    row = probe_row(source.as_row(), clips, out, max_attempts=2)
    assert row["reject_stage"] is None and row["sha256"]
    assert not list((tmp_path / "out" / "_work").glob("*attempt*"))

    this_run = killed_run | {"epoch": 2}
    for number in (1, 2):
        record_attempt(out, source.source_key, "probe", number, this_run)
    assert probe_row(source.as_row(), clips, out, max_attempts=2)["reject_stage"] == "crash"


def test_small_sources_share_blocks_and_big_ones_keep_their_own() -> None:
    from pipelines.ingest import BLOCK_BYTES, MAX_SOURCES_PER_BLOCK, source_blocks

    def sources(count: int, size_bytes: int) -> list[SourceFile]:
        return [SourceFile(f"/footage/{i:05d}.mp4", size_bytes, 0, f"{i:032x}") for i in range(count)]

    # a web collection: 1,000 clips of 300 KB, MAX_SOURCES_PER_BLOCK each, on 2 workers
    assert source_blocks(sources(1000, 300_000), 2) == -(-1000 // MAX_SOURCES_PER_BLOCK)
    # a few long files: one block each, as many as there are
    assert source_blocks(sources(3, 5 * BLOCK_BYTES), 2) == 3
    # big files together: about BLOCK_BYTES of them per block
    assert source_blocks(sources(100, BLOCK_BYTES // 2), 2) == 50
    # never fewer than BLOCKS_PER_WORKER blocks per worker when there are that many sources
    assert source_blocks(sources(40, 1000), 4) == 16 and source_blocks(sources(40, 1000), 1) == 4
    assert source_blocks(sources(1, 1000), 8) == 1
