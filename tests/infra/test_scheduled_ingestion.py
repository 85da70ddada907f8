"""The Airflow DAGs of infra/airflow (docs/airflow.md), on a real Apache Airflow 3 against a real Ray head.

Airflow runs from its own venv (`.venv-airflow`, made by infra/airflow/install.sh the first time and a
no-op after that), with a SQLite metadata database in a temporary AIRFLOW_HOME and no scheduler: a DAG
run is `airflow dags test DAG_ID`, a subprocess of that venv that runs the tasks in its own process.
The DAGs read their settings from environment variables, as a deployment would set them. The jobs run
on tests/infra/conftest.py's `head` (a token-authenticated `ray start --head` on loopback, started from
the project venv, where reelforge is installed: jobs are submitted without a working_dir, as to a
cluster whose image has reelforge). Recaptioning asks tests/model/chat_server.py, the loopback stand-in
for a hosted caption API; training registers its model in a SQLite MLflow store.

The landing folder and the shards are prefixes of a bucket on moto's S3 server (tests/pipelines/
test_faults.py's `S3Server`): the Airflow process lists and writes them, and the jobs read and write
them, with the endpoint and keys in their environment as a deployment's would have. The DAGs' logic
is also tested without Airflow on a local folder and on that bucket, through the same code.

The end-to-end tests run in file order on one landing prefix and one shards prefix. Two files land and
one Airflow process runs reelforge_ingest, reelforge_recaption, reelforge_train and reelforge_ingest
again (`dag.test()` each, which is what `airflow dags test` calls; one process pays for Airflow's start
once): the first three ingest, recaption and train, the last finds nothing new. Then two more files
land, `airflow dags test reelforge_ingest` is SIGKILLed once the head shows its job, and the same DAG
run tried again re-attaches to that job. Footage is four 3-second 96x64 files, about the smallest that
ingest's demo preset cuts into clips. The first tests need neither Airflow nor Ray: the DAGs' logic is
plain Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest

import pyarrow.fs as pafs

from infra.airflow import batches
from infra.airflow.batches import Batch, LandingFile
from infra.airflow.locations import Location
from infra.airflow.settings import DagSettings
from infra.ray_jobs import RayJobsClient
from model.storage import resolve_uri
from tests.model.chat_server import ChatServer
from tests.pipelines.test_faults import S3Server

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VENV = REPO / ".venv-airflow"
INSTALL = REPO / "infra" / "airflow" / "install.sh"
DAGS = REPO / "infra" / "airflow" / "dags"
RUN_TIMEOUT_S = 600
# The first end-to-end test also pays for the Airflow venv on a new machine (one to two minutes).
pytestmark = pytest.mark.timeout(1200)
# DAG runs in one process, each with `dag.test()` (what `airflow dags test` calls), in the Airflow venv:
# the chain ingest -> recaption -> train pays for Airflow's start (its in-process task API) once.
DAG_TEST = """
import sys

from airflow.dag_processing.dagbag import DagBag

bag = DagBag(sys.argv[1])
assert not bag.import_errors, bag.import_errors
for dag_id in sys.argv[2:]:
    run = bag.get_dag(dag_id).test()
    print(f"dag.test() {dag_id}: {run.state}", flush=True)
    if run.state != "success":
        sys.exit(1)
"""


# --- the DAGs' logic, without Airflow or Ray -------------------------------------------------------


def test_the_landing_rules_agree_with_ingests_own():
    from pipelines.discover import VIDEO_EXTENSIONS

    assert batches.VIDEO_EXTENSIONS == VIDEO_EXTENSIONS


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback, bucket `bucket`; its endpoint and keys in this process's
    environment while the module runs, as an Airflow worker's would be."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "server.log")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in server.env.items():
            patch.setenv(key, value)
        yield server
    server.close()


@pytest.fixture(params=["local", "s3"])
def folders(request, tmp_path) -> tuple[Location, Location]:
    """(landing, shards): two local folders, or two prefixes of the S3 server's bucket."""
    if request.param == "local":
        return Location(str(tmp_path / "landing")), Location(str(tmp_path / "shards"))
    request.getfixturevalue("s3")
    return Location(f"s3://bucket/{tmp_path.name}/landing"), Location(f"s3://bucket/{tmp_path.name}/shards")


def test_landing_files_batch_ids_and_records(folders):
    landing, shards = folders
    for name in ("b.mp4", "a.MKV", "a.srt", ".hidden.mp4", "notes.txt", ".cache/c.mp4", "day2/d.mov"):
        filesystem, path = resolve_uri(f"{landing}/{name}")
        filesystem.create_dir(path.rsplit("/", 1)[0])
        with filesystem.open_output_stream(path) as stream:
            stream.write(name.encode())
    listed = batches.list_landing(landing, min_age_s=0)
    assert [f.path.removeprefix(f"{landing}/") for f in listed] == ["a.MKV", "b.mp4", "day2/d.mov"]
    assert [f.size_bytes for f in listed] == [len(b"a.MKV"), len(b"b.mp4"), len(b"day2/d.mov")]
    # a file modified in the last min_age_s seconds may still be uploading: not yet a landing file
    assert batches.list_landing(landing, min_age_s=60) == []
    assert batches.list_landing(landing, min_age_s=60, now_s=time.time() + 61) == listed
    missing = Location(f"{landing.uri}-nope") if landing.is_local else Location("s3://no-such-bucket/landing")
    with pytest.raises(ValueError, match=re.escape(f"REELFORGE_LANDING={missing}: no such") + f" {'folder' if landing.is_local else 'bucket'}$"):
        batches.list_landing(missing, min_age_s=0)
    if not landing.is_local:  # a prefix exists once something is under it: an empty one is a quiet night
        assert batches.list_landing(Location("s3://bucket/nothing-landed-yet"), min_age_s=0) == []

    # the id is the files', whatever their order; a file rewritten in place is another file
    batch = Batch.of(listed[::-1])
    lines = "".join(f"{f.path}\t{f.size_bytes}\t{f.mtime_ns}\n" for f in sorted(listed, key=lambda f: f.path))
    assert batch.batch_id == hashlib.sha256(lines.encode()).hexdigest()[:16] == Batch.of(listed).batch_id
    rewritten = LandingFile(listed[0].path, listed[0].size_bytes, listed[0].mtime_ns + 1)
    assert Batch.of([rewritten, *listed[1:]]).batch_id != batch.batch_id
    assert Batch.from_json(json.loads(json.dumps(batch.as_json()))) == batch

    # pending, then recorded: recorded files are no longer new, and the pending file is gone
    assert batches.pending_batches(shards) == [] and batches.read_records(shards) == []  # no _batches/ yet
    batches.write_pending(shards, batch)
    assert batches.pending_batches(shards) == [batch] and batches.new_files(listed, shards) == listed
    job = {"submission_id": f"ingest-{batch.batch_id}", "entrypoint": "python -m infra ingest ...", "status": "SUCCEEDED"}
    batches.write_record(shards, batch, job)
    assert batches.pending_batches(shards) == [] and batches.new_files(listed, shards) == []
    assert batches.read_record(shards, batch.batch_id)["submission_id"] == f"ingest-{batch.batch_id}"
    assert [p.name for p in (shards / "_batches").files()] == [f"{batch.batch_id}.json"]  # no temp file left either
    batches.drop_pending(shards, batch)  # a second drop (a retried try) is no error


def test_local_landing_files_by_their_mtime_and_hidden_folders_pruned(tmp_path):
    landing = tmp_path / "landing"
    for name in ("old.mp4", "new.mp4", ".cache/c.mp4", "day2/.partial.mp4"):
        (landing / name).parent.mkdir(parents=True, exist_ok=True)
        (landing / name).write_bytes(name.encode())
    os.utime(landing / "old.mp4", ns=(1, 10**9))  # old; the others are being written now
    assert [f.path for f in batches.list_landing(Location(str(landing)), min_age_s=60)] == [str(landing / "old.mp4")]
    assert [Path(f.path).name for f in batches.list_landing(Location(str(landing)), min_age_s=0)] == ["new.mp4", "old.mp4"]


def test_a_batch_holds_what_one_command_line_can(tmp_path, monkeypatch):
    files = [LandingFile(f"/landing/{i:03d}.mp4", 1, 1000 - i) for i in range(10)]  # the last is the oldest
    monkeypatch.setattr(batches, "MAX_PATHS_CHARS", 3 * len("/landing/000.mp4 "))
    assert batches.take_batch(files).paths == ["/landing/007.mp4", "/landing/008.mp4", "/landing/009.mp4"]
    monkeypatch.setattr(batches, "MAX_PATHS_CHARS", 1)
    assert len(batches.take_batch(files).files) == 1  # never none


def test_settings_fail_in_one_line_naming_the_variable(tmp_path):
    env = {"REELFORGE_LANDING": str(tmp_path / "landing"), "REELFORGE_SHARDS": str(tmp_path / "shards")}
    settings = DagSettings.from_environment(env)
    assert (settings.caption_set, settings.train_config, settings.landing_min_age_s) == (None, None, 300.0)
    on_s3 = DagSettings.from_environment(env | {"REELFORGE_LANDING": "s3://footage/landing/", "REELFORGE_SHARDS": "file:///data/shards"})
    assert (on_s3.landing.uri, on_s3.landing.asset_uri, on_s3.shards.asset_uri) == ("s3://footage/landing", "s3://footage/landing", "file:///data/shards")
    trained = DagSettings.from_environment(env | {"REELFORGE_TRAIN_CONFIG": "train/tiny", "REELFORGE_RUNS": "/runs"})
    assert trained.tracking_uri == "sqlite:////runs/mlflow.db"
    refused = {
        "REELFORGE_SHARDS": (env | {"REELFORGE_SHARDS": ""}, "is not set"),
        "REELFORGE_SHARDS=s3://": (env | {"REELFORGE_SHARDS": "s3://"}, "names no bucket"),
        "REELFORGE_SHARDS=shards": (env | {"REELFORGE_SHARDS": "shards"}, "is relative"),
        "REELFORGE_LANDING": (env | {"REELFORGE_LANDING": "https://example.com/raw"}, "https:// is not a storage reelforge reads"),
        "REELFORGE_RUNS": (env | {"REELFORGE_TRAIN_CONFIG": "train/tiny", "REELFORGE_RUNS": "runs"}, "is relative"),
        "REELFORGE_MLFLOW_TRACKING_URI": (env | {"REELFORGE_MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, "is relative"),
        "REELFORGE_INGEST_ARGS": (env | {"REELFORGE_INGEST_ARGS": "--config ingest/demo --out=/x"}, "sets --out, which the DAG sets"),
        "REELFORGE_POLL_S": (env | {"REELFORGE_POLL_S": "soon"}, "is not a number of seconds"),
    }
    for name, (bad, says) in refused.items():
        with pytest.raises(ValueError) as error:
            DagSettings.from_environment(bad)
        assert str(error.value).startswith(name) and says in str(error.value) and "\n" not in str(error.value)


# --- a real Airflow 3 against a real Ray head ------------------------------------------------------


def footage_file(folder: Path, number: int) -> list[Path]:
    """A 3-second 96x64 H.264 file of two shots and its .srt captions, unlike the others (`number`)."""
    from infra.footage import FootageSpec, write_video
    from infra.footage.suites import varied_shots

    shots = varied_shots([("moving", 1.5), ("moving", 1.5)], offset=3 * number)
    video = write_video(FootageSpec(f"cam{number}", "mp4", "libx264", 96, 64, Fraction(12), shots, sidecar="srt"), folder / f"cam{number}.mp4")
    return [video.path, video.path.with_suffix(".srt")]


def expected_batch_id(s3: S3Server, videos: list[str]) -> str:
    """docs/airflow.md's batch id, computed here from the objects' size and LastModified."""
    infos = [s3.fs.get_file_info(uri.removeprefix("s3://")) for uri in sorted(videos)]
    lines = "".join(f"{uri}\t{info.size}\t{info.mtime_ns}\n" for uri, info in zip(sorted(videos), infos))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def s3_text(s3: S3Server, uri: str) -> str:
    with s3.fs.open_input_stream(uri.removeprefix("s3://")) as stream:
        return stream.read().decode()


def s3_names(s3: S3Server, uri: str) -> list[str]:
    """The names of the objects directly below a prefix."""
    infos = s3.fs.get_file_info(pafs.FileSelector(uri.removeprefix("s3://"), allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)


@dataclass
class Airflow:
    """An Airflow deployment of the DAGs: its venv, its home and the environment its processes share."""

    env: dict[str, str]
    home: Path
    landing: str  # s3://bucket/landing
    shards: str  # s3://bucket/shards
    runs: Path
    s3: S3Server

    def command(self, *args: str) -> list[str]:
        return [str(AIRFLOW_VENV / "bin" / "airflow"), *args]

    def dags_test(self, dag_id: str, *logical_date: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command("dags", "test", dag_id, *logical_date), cwd=self.home, env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )

    def dag_test(self, *dag_ids: str) -> subprocess.CompletedProcess:
        argv = [str(AIRFLOW_VENV / "bin" / "python"), "-c", DAG_TEST, str(DAGS), *dag_ids]
        return subprocess.run(argv, cwd=self.home, env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    def asset_events(self) -> list[tuple[str, str]]:
        """(asset name, producing dag id) of every asset event in the metadata database."""
        with sqlite3.connect(self.home / "airflow.db") as db:
            rows = db.execute("SELECT asset.name, asset_event.source_dag_id FROM asset_event JOIN asset ON asset.id = asset_event.asset_id")
            return sorted(rows.fetchall())


@pytest.fixture(scope="module")
def head_env(s3) -> dict[str, str]:
    """The jobs reach the bucket as a deployment's nodes would: endpoint and keys in their environment."""
    return s3.env


@pytest.fixture(scope="module")
def deepspeed_op(head):
    """DeepSpeed compiles its CPU communication op the first time it runs under a HOME (40 s and more
    on two cores), and the head's HOME is new: compile it there, with the head's environment, while
    the ingest and recaption jobs run, rather than inside the training job, which waits for this
    build if it is still going and then loads what it built."""
    code = "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    build = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=head.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    yield build
    if build.poll() is None:
        os.killpg(build.pid, signal.SIGKILL)
    build.wait()


@pytest.fixture(scope="module")
def chat():
    with ChatServer() as server:
        yield server


@pytest.fixture(scope="module")
def airflow(head, deepspeed_op, chat, s3) -> Airflow:
    """infra/airflow/install.sh (a no-op once .venv-airflow is there), a migrated SQLite metadata
    database, and the DAGs' variables pointing at the head and at folders of this test."""
    installed = subprocess.run([str(INSTALL), str(AIRFLOW_VENV)], capture_output=True, text=True, timeout=1800)
    assert installed.returncode == 0, installed.stderr[-3000:]
    home = head.root / "airflow"
    deployment = Airflow({}, home, "s3://bucket/landing", "s3://bucket/shards", home / "runs", s3)
    deployment.runs.mkdir(parents=True)
    keep = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_", "AIRFLOW", "REELFORGE_"))}
    keep = {key: value for key, value in keep.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    recaption = ["--set", "caption.backend=openai", "--set", f"caption.endpoint={chat.url}", "--set", "caption.model=tiny-vlm"]
    deployment.env = keep | s3.env | {
        "PATH": f"{AIRFLOW_VENV / 'bin'}{os.pathsep}{keep['PATH']}",  # as in an activated Airflow venv
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "REELFORGE_RAY_ADDRESS": head.dashboard,
        "RAY_AUTH_TOKEN_PATH": str(head.root / "home" / ".ray" / "auth_token"),
        "REELFORGE_LANDING": str(deployment.landing),
        "REELFORGE_SHARDS": str(deployment.shards),
        "REELFORGE_LANDING_MIN_AGE_S": "0",  # the test's files are complete when they land
        "REELFORGE_INGEST_ARGS": "--config ingest/demo",
        "REELFORGE_CAPTION_SET": "dense",
        "REELFORGE_RECAPTION_ARGS": shlex.join(recaption),
        "REELFORGE_TRAIN_CONFIG": "train/tiny",
        "REELFORGE_TRAIN_ARGS": "--set train.max_steps=2 --set scaling.num_workers=1",
        "REELFORGE_RUNS": str(deployment.runs),
        "REELFORGE_MODEL_NAME": "reelforge-nightly",
        "REELFORGE_POLL_S": "0.5",
    }
    migrated = subprocess.run(deployment.command("db", "migrate"), cwd=home, env=deployment.env, capture_output=True, text=True, timeout=300)
    assert migrated.returncode == 0, (migrated.stdout + migrated.stderr)[-3000:]
    return deployment


@pytest.fixture(scope="module")
def client(head) -> RayJobsClient:
    return RayJobsClient(head.dashboard, head.token, token_source="the head's token file")


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("airflow-footage")
    for number in range(4):
        footage_file(folder, number)
    return folder


def land(airflow: Airflow, footage: Path, numbers: list[int]) -> list[str]:
    """Upload cam<N>.mp4 and its .srt to the landing prefix; the videos' URIs."""
    for number in numbers:
        for file in sorted(footage.glob(f"cam{number}.*")):
            with airflow.s3.fs.open_output_stream(f"{airflow.landing.removeprefix('s3://')}/{file.name}") as stream:
                stream.write(file.read_bytes())
    return [f"{airflow.landing}/cam{number}.mp4" for number in numbers]


def jobs_named(client: RayJobsClient, prefix: str) -> list[dict]:
    return [job for job in client.jobs() if (job.get("submission_id") or "").startswith(prefix)]


def said(run: subprocess.CompletedProcess) -> str:
    return (run.stdout + run.stderr)[-6000:]


@dataclass
class FirstNight:
    videos: list[str]  # what landed
    chain: str  # the output of reelforge_ingest, reelforge_recaption and reelforge_train
    again: str  # the output of the second reelforge_ingest run


@pytest.fixture(scope="module")
def first_night(airflow, footage) -> FirstNight:
    """Two files land; one process runs reelforge_ingest, the two DAGs downstream of it, then
    reelforge_ingest again (a run with nothing new). One process: Airflow starts once."""
    videos = land(airflow, footage, [0, 1])
    run = airflow.dag_test("reelforge_ingest", "reelforge_recaption", "reelforge_train", "reelforge_ingest")
    assert run.returncode == 0, said(run)
    chain, again = run.stdout.split("dag.test() reelforge_train: success\n")
    return FirstNight(videos, chain, again)


@pytest.mark.slow
def test_a_first_run_ingests_the_landing_folder_and_the_downstream_dags_run(first_night, airflow, client, chat):
    from mlflow import MlflowClient

    s3, videos, batch_id = airflow.s3, first_night.videos, expected_batch_id(airflow.s3, first_night.videos)
    record = json.loads(s3_text(s3, f"{airflow.shards}/_batches/{batch_id}.json"))
    assert [f["path"] for f in record["files"]] == videos and record["submission_id"] == f"ingest-{batch_id}"
    assert record["entrypoint"] == shlex.join(["python", "-m", "infra", "ingest", *videos, "--out", airflow.shards, "--config", "ingest/demo"])
    written = s3_names(s3, airflow.shards)
    assert "_SUCCESS" in written and any(name.startswith("shard-") and name.endswith(".tar") for name in written)
    assert s3_names(s3, f"{airflow.shards}/_batches") == [f"{batch_id}.json"]  # and no pending batch
    (job,) = jobs_named(client, "ingest-")
    assert (job["submission_id"], job["status"]) == (f"ingest-{batch_id}", "SUCCEEDED")
    logs = client.logs(job["submission_id"])
    assert "| clips kept |" in logs and logs.splitlines()[-1] in first_night.chain  # the job's output, in the task's log

    captions = f"{airflow.shards}/captions/dense"
    manifest = json.loads(s3_text(s3, f"{captions}/manifest.json"))
    assert "_SUCCESS" in s3_names(s3, captions) and manifest["summary"]["ok"] == len(chat.requests) > 0
    (job,) = jobs_named(client, "recaption-")
    assert job["submission_id"].startswith("recaption-dense-") and job["status"] == "SUCCEEDED"

    (job,) = jobs_named(client, "train-")
    out = airflow.runs / job["submission_id"]
    assert job["status"] == "SUCCEEDED" and (out / "bundle" / "weights.safetensors").is_file()
    assert "data.caption_set=dense" in job["entrypoint"] and "| steps | 2 |" in client.logs(job["submission_id"])
    registry = MlflowClient(f"sqlite:///{airflow.runs / 'mlflow.db'}")
    candidate = registry.get_model_version_by_alias("reelforge-nightly", "candidate")
    assert registry.get_run(candidate.run_id).data.params["data.caption_set"] == "dense"
    # the events that schedule recaption (on the shards) and train (on the caption set) in a deployment
    assert airflow.asset_events() == [("reelforge_captions", "reelforge_recaption"), ("reelforge_shards", "reelforge_ingest")]


@pytest.mark.slow
def test_a_run_without_new_files_does_nothing(first_night, airflow, client):
    assert "no new files in" in first_night.again and "nothing to ingest" in first_night.again
    assert "Skipping downstream tasks" in first_night.again and "submitted job" not in first_night.again
    # the three jobs of the first run, and no other; one batch record; no second shards event
    assert sorted(job["submission_id"].split("-")[0] for job in client.jobs() if job.get("submission_id")) == ["ingest", "recaption", "train"]
    assert [name.split(".", 1)[1] for name in s3_names(airflow.s3, f"{airflow.shards}/_batches")] == ["json"]
    assert len(airflow.asset_events()) == 2


@pytest.mark.slow
def test_two_new_files_are_ingested_alone_and_a_killed_run_reattaches_to_its_job(airflow, client, footage):
    import pyarrow.parquet as pq

    s3, videos = airflow.s3, land(airflow, footage, [2, 3])
    submission_id = f"ingest-{expected_batch_id(s3, videos)}"
    logical_date = "2026-06-01T00:00:00+00:00"
    log = airflow.home / "killed-run.log"
    with log.open("w") as sink:
        killed = subprocess.Popen(
            airflow.command("dags", "test", "reelforge_ingest", logical_date),
            cwd=airflow.home, env=airflow.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while (job := client.find(submission_id)) is None or job["status"] != "RUNNING":
            assert killed.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the task's process, mid-run, as a lost worker
        killed.wait()
    assert client.status(submission_id) == "RUNNING" and f"{submission_id[7:]}.json" not in s3_names(s3, f"{airflow.shards}/_batches")

    retried = airflow.dags_test("reelforge_ingest", logical_date)  # the same DAG run, tried again
    assert retried.returncode == 0, said(retried)
    assert re.search(rf"job {submission_id} exists on \S+ \((RUNNING|SUCCEEDED)\): re-attaching to it", retried.stdout), said(retried)
    assert "submitted job" not in retried.stdout
    assert [job["submission_id"] for job in jobs_named(client, submission_id)] == [submission_id]  # one job, no second attempt
    record = json.loads(s3_text(s3, f"{airflow.shards}/_batches/{submission_id[7:]}.json"))
    assert [f["path"] for f in record["files"]] == videos and record["submission_id"] == submission_id
    # ingest processed the two new sources alone, and the output holds all four
    stats = json.loads(s3_text(s3, f"{airflow.shards}/stats.json"))
    assert stats["last_run"]["sources"] == 2
    uris = pq.read_table(f"{airflow.shards.removeprefix('s3://')}/sources.parquet", filesystem=s3.fs).column("uri").to_pylist()
    assert sorted(uris) == [f"{airflow.landing}/cam{n}.mp4" for n in range(4)]
