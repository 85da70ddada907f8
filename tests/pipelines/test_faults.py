"""Faults of our own storage and a second run on the same --out, on real components: an
S3-compatible server on loopback (moto, in a process of its own so it can be stopped and
started again with its objects kept), a real tmpfs that fills up, real ingest runs.

What every test here holds the run to (docs/reliability.md): it ends with exit 0 or with a
one-line `ingest: ...` and exit 1; no healthy source is ever a reject row; and a rerun then
gives exactly what a clean run gives (shard bytes, manifest ids, reject rows).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from infra.footage import FootageSpec, varied_shots, write_video
from infra.ingest import main

REPO = Path(__file__).resolve().parents[2]
# Each test here holds a clean run, a faulty run that waits out its retries, and a rerun:
# on a busy 2-core machine that may take more than the suite's 600 s per test.
pytestmark = pytest.mark.timeout(1200)

SETTINGS = ["clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=64x64",
            "shards.target_mb=0.02", "caption.backend=metadata"]  # fmt: skip
ARGS = [arg for setting in SETTINGS for arg in ("--set", setting)]
GOOD = ("v0.mp4", "v1.mkv", "v2.mp4")
BAD = "bad_not_video.mp4"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory, bad_footage) -> Path:
    """Three healthy sources and one file that is not a video (the only reject a run may record)."""
    root = tmp_path_factory.mktemp("faults-src")
    for offset, name in enumerate(GOOD):
        shots = varied_shots([("moving", 2.5), ("moving", 2.5), ("moving", 2.5)], offset=5 * offset)
        write_video(FootageSpec(Path(name).stem, name.split(".")[1], "libx264", 160, 120, Fraction(12), shots), root / name)
    shutil.copy(bad_footage["not_video"], root / BAD)
    return root


def outputs(fs: pafs.FileSystem, root: str) -> dict[str, object]:
    """What a run must get right: shard bytes, manifest ids in order, reject rows, source statuses."""
    shards = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name.startswith("shard-") and info.base_name.endswith(".tar"):
            with fs.open_input_stream(info.path) as stream:
                shards[info.base_name] = stream.read()
    rejects = pq.read_table(f"{root}/rejects.parquet", filesystem=fs).to_pylist()
    return {
        "shards": shards,
        "ids": pq.read_table(f"{root}/manifest.parquet", filesystem=fs, columns=["id"]).column("id").to_pylist(),
        "rejects": sorted((r["uri"], r["id"] or "", r["stage"]) for r in rejects),
        "sources": sorted((r["uri"], r["status"]) for r in pq.read_table(f"{root}/sources.parquet", filesystem=fs).to_pylist()),
    }


def assert_no_healthy_source_rejected(fs: pafs.FileSystem, root: str) -> None:
    """Whatever a faulty run committed: source rejects name only the bad file; no process/crash rows."""
    if fs.get_file_info(f"{root}/rejects.parquet").type == pafs.FileType.NotFound:
        return
    rejects = pq.read_table(f"{root}/rejects.parquet", filesystem=fs).to_pylist()
    assert {r["uri"].rsplit("/", 1)[-1] for r in rejects if r["id"] is None} <= {BAD}, rejects
    assert not [r for r in rejects if r["stage"] in ("process", "crash")], rejects


def cli_env(ray_local, job_env: dict[str, str]) -> dict[str, str]:
    """The environment of a `reelforge ingest` process that joins the test's Ray instead of starting
    one of its own: `job_env` is set for the driver and, as its Ray job's runtime_env, for every
    worker it starts there, the way `ray job submit` hands a job's driver its runtime_env."""
    job_config = {"runtime_env": {"env_vars": job_env}, "metadata": {}}
    return os.environ | job_env | {
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "PYTHONPATH": str(REPO),
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job_config),  # read by the driver's ray.init
    }


def assert_ended_cleanly(returncode: int, log: str) -> None:
    """Exit 0, or exit 1 with a one-line `ingest: ...` as the last line (no traceback)."""
    assert returncode in (0, 1), log[-3000:]
    if returncode == 1:
        assert log.strip().splitlines()[-1].startswith("ingest: "), log[-3000:]


# --- an object store that stops answering ---------------------------------------------------

# moto's ThreadedMotoServer keeps its buckets in the process, so stopping its HTTP server and
# starting it again on the same port is a store outage with nothing lost.
_SERVER = textwrap.dedent(
    """
    import sys
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
    server.start()
    print("start done", flush=True)
    for line in sys.stdin:
        getattr(server, line.strip())()
        print(line.strip(), "done", flush=True)
    """
)


class S3Server:
    def __init__(self, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SERVER, str(self.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink, text=True
            )
        self._expect("start done")
        self.fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                    endpoint_override=self.endpoint, allow_bucket_creation=True)  # fmt: skip
        self.fs.create_dir("bucket")

    def _expect(self, line: str) -> None:
        assert self.process.stdout.readline().strip() == line

    def stop(self) -> None:
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        self._expect("stop done")

    def start(self) -> None:
        self.process.stdin.write("start\n")
        self.process.stdin.flush()
        self._expect("start done")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, src: Path):
    """A moto S3 server on a free loopback port with the sources uploaded to s3://bucket/src."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "server.log")
    for path in sorted(src.iterdir()):
        with server.fs.open_output_stream(f"bucket/src/{path.name}") as stream:
            stream.write(path.read_bytes())
    yield server
    server.close()


def _ingest(env: dict[str, str], out: str, log: Path) -> subprocess.Popen:
    """`reelforge ingest s3://bucket/src --out OUT` in a new session, on the test's Ray: its workers
    must see the endpoint variables, which `cli_env` passes on as the job's runtime_env."""
    command = [sys.executable, "-m", "infra", "ingest", "s3://bucket/src", "--out", out, *ARGS]
    with log.open("wb") as sink:
        return subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=sink)


def _wait(process: subprocess.Popen, log: Path, condition, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_object_store_outage_mid_run_never_rejects_a_healthy_source(ray_local, s3: S3Server, tmp_path: Path) -> None:
    """The S3 server stops once the first source's work result is in and starts again once the
    run has met the outage (a retry warning in its log); the run ends cleanly either way, records
    no healthy source as rejected, and its rerun equals a clean run."""
    env = cli_env(ray_local, s3.env)
    clean = _ingest(env, "s3://bucket/clean", tmp_path / "clean.log")
    assert clean.wait(timeout=600) == 0, (tmp_path / "clean.log").read_text(errors="replace")[-3000:]

    log = tmp_path / "faulty.log"
    process = _ingest(env, "s3://bucket/out", log)
    try:
        done = lambda: any(i.base_name.endswith(".parquet") for i in s3.fs.get_file_info(pafs.FileSelector("bucket/out/_work", allow_not_found=True)))  # noqa: E731
        _wait(process, log, done, "first work result")
        s3.stop()
        try:
            deadline = time.monotonic() + 240
            while "failed (" not in log.read_text(errors="replace") and process.poll() is None:
                assert time.monotonic() < deadline, "the run did not meet the outage within 240 s"
                time.sleep(0.05)
        finally:
            s3.start()
        returncode = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    text = log.read_text(errors="replace")
    assert "failed (" in text, "the run never met the outage"
    assert_ended_cleanly(returncode, text)
    assert_no_healthy_source_rejected(s3.fs, "bucket/out")

    rerun = _ingest(env, "s3://bucket/out", tmp_path / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text(errors="replace")[-3000:]
    assert outputs(s3.fs, "bucket/out") == outputs(s3.fs, "bucket/clean")
    leftovers = [i.path for i in s3.fs.get_file_info(pafs.FileSelector("bucket/out", recursive=True)) if ".tmp-" in i.path]
    assert not leftovers


def test_a_source_whose_store_is_down_is_not_a_reject(s3: S3Server, monkeypatch) -> None:
    """Probing a source on a store that does not answer raises SourceUnavailable (our environment,
    retried and then stopping the job) instead of returning a probe reject row."""
    from pipelines.probe import SourceUnavailable, probe_source

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    assert probe_source(f"s3://bucket/src/{GOOD[0]}")["reject_stage"] is None
    s3.stop()
    try:
        with pytest.raises(SourceUnavailable, match=f"cannot read source s3://bucket/src/{GOOD[0]}: "):
            probe_source(f"s3://bucket/src/{GOOD[0]}")
    finally:
        s3.start()


# --- a disk that fills up ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_local(ray_local, src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults-clean") / "out"
    assert main([str(src), "--out", str(out), *ARGS]) == 0
    return out


@pytest.fixture
def tmpfs(tmp_path: Path):
    """`tmpfs(size_kb)`: a tmpfs of that size mounted in tmp_path (root only), unmounted after."""
    mounts = []

    def mount(size_kb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _grow(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)


# A run on a disk that stays full cannot succeed: it makes the same six tries as any run, with the
# pauses between them cut from 0.5-8 s (15.5 s in all) to 0.05-0.8 s (pipelines/output.py).
SHORT_RETRIES = {"REELFORGE_STORAGE_RETRY_DELAYS_S": "0.05,0.1,0.2,0.4,0.8"}


def _failing_run(ray_local, src: Path, out: Path, log: Path) -> str:
    """`reelforge ingest SRC --out OUT` as the command it is, on the test's Ray, expected to stop:
    returns its last line. A process of its own, as a user's failed run is: a failed Ray Data
    execution stays referenced by the log records pytest keeps of it (Ray logs it with its
    traceback), and with it that run's idle actors and their CPUs, until the test ends."""
    env = cli_env(ray_local, SHORT_RETRIES)
    with log.open("wb") as sink:
        done = subprocess.run([sys.executable, "-m", "infra", "ingest", str(src), "--out", str(out), *ARGS],
                              cwd=REPO, env=env, stdout=sink, stderr=sink, timeout=600)  # fmt: skip
    text = log.read_text(errors="replace")
    assert done.returncode == 1, text[-3000:]
    assert_ended_cleanly(done.returncode, text)
    return text.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_disk_that_fills_up_stops_the_run_without_rejects(ray_local, src: Path, clean_local: Path, tmpfs, tmp_path: Path) -> None:
    """The disk holds about half of what the run writes, so the run cannot complete: it stops with
    one line naming the full disk, records no healthy source as rejected, and once the disk is
    bigger, the rerun equals a clean run."""
    disk = tmpfs(sum(p.stat().st_size for p in clean_local.rglob("*") if p.is_file()) // 1024 // 2 + 64)
    out = disk / "out"
    message = _failing_run(ray_local, src, out, tmp_path / "full.log")
    assert "No space left on device" in message, message
    assert message.endswith("rerun the same command to resume")
    assert_no_healthy_source_rejected(pafs.LocalFileSystem(), str(out))

    _grow(disk)
    assert main([str(src), "--out", str(out), *ARGS]) == 0
    local = pafs.LocalFileSystem()
    assert outputs(local, str(out)) == outputs(local, str(clean_local))
    assert not list(out.rglob("*.tmp-*")) and not list((out / "_work").glob("*.tar"))


@pytest.mark.slow
def test_a_run_that_fails_before_any_result_locks_no_config(ray_local, src: Path, tmp_path: Path, tmpfs) -> None:
    """A disk with room for the lease and attempt markers but no work result: the run stops, leaves
    no config record, and a rerun with another config (after the disk grew) is not refused."""
    disk = tmpfs(32)
    out = disk / "out"
    assert "No space left on device" in _failing_run(ray_local, src, out, tmp_path / "full.log")
    assert not (out / "_work" / "config.json").exists()
    _grow(disk)
    assert main([str(src), "--out", str(out), *ARGS, "--set", "clips.fps=6"]) == 0
    assert {r["fps"] for r in pq.read_table(out / "manifest.parquet").to_pylist()} == {6.0}


# --- a second run on the same --out ---------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_in_one_line(ray_local, src: Path, clean_local: Path, tmp_path: Path) -> None:
    """While a run holds --out (its lease), a second run stops at once with one line and writes
    nothing; the first run finishes as if alone."""
    out = tmp_path / "out"
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    log = tmp_path / "first.log"
    with log.open("wb") as sink:
        first = subprocess.Popen([sys.executable, "-m", "infra", "ingest", str(src), "--out", str(out), *ARGS],
                                 cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=sink)  # fmt: skip
    try:
        _wait(first, log, lambda: (out / "_work" / "lease.json").exists(), "lease")
        before = sorted(p.name for p in out.rglob("*"))
        with pytest.raises(SystemExit) as refused:
            main([str(src), "--out", str(out), *ARGS])
        message = str(refused.value.code)
        assert message.startswith(f"ingest: --out {out} is in use by another ingest run (") and "\n" not in message
        assert f"pid {first.pid} on " in message
        assert first.poll() is None, "the first run must still have been running"
        assert set(before) <= {p.name for p in out.rglob("*")}, "the refused run deleted nothing"
        assert first.wait(timeout=600) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
    local = pafs.LocalFileSystem()
    assert outputs(local, str(out)) == outputs(local, str(clean_local))
