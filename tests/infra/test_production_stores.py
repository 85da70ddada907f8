"""The production stores of docs/cluster.md ("Production stores"), for real on loopback: MLflow on
PostgreSQL with its artifacts on S3-compatible storage, proxied by the server, and shards on that
object storage end to end.

Three servers, each started here and stopped with the module, whatever happens:
* a throwaway PostgreSQL 15 (Debian's binaries; `initdb` and `pg_ctl` refuse root, so they run as the
  `postgres` user in a folder it owns), on a free port;
* moto's S3 server (tests/pipelines/test_faults.py's `S3Server`), bucket `bucket`;
* `mlflow server --backend-store-uri postgresql+psycopg2://... --artifacts-destination s3://bucket/mlflow
  --serve-artifacts`: the S3 endpoint and credentials are in the server's environment only; its
  clients upload through it and download with presigned URLs it hands out (or through it).

The commands run as their user runs them, as `python -m infra ...` processes: ingest writes
s3://bucket/shards (on the test's Ray: `cli_env` hands its workers the endpoint variables), train
reads them through our loader and registers @candidate on the server, promote moves @production
through the evaluation gate (which reads its clips from S3 too), and generate fetches the model
from the registry with no S3 credentials at all. Then the test looks where everything went: rows
in PostgreSQL, objects in the bucket, requests in the server's log, nothing in a local mlflow.db,
mlruns/ or mlartifacts/.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from infra.footage import FootageSpec, varied_shots, write_video
from model.storage import file_sha256
from tests.infra.conftest import free_ports, stop_group
from tests.pipelines.test_faults import S3Server, cli_env
from tests.training.test_registry import FRAMES, SIZE, decoded_shape, tiny_bundle
from training.config import MlflowSection, RegistrySection
from training.registry import log_and_register
from training.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = pytest.mark.slow


# --- PostgreSQL ---------------------------------------------------------------------------------


class Postgres:
    """A PostgreSQL cluster in `root` (owned by the user that runs it) on a free loopback port, with a
    database `mlflow`; trust authentication, no fsync: a throwaway."""

    def __init__(self, root: Path) -> None:
        self.root, self.data, self.log = root, root / "data", root / "postgres.log"
        # initdb and pg_ctl refuse to run as root: run them as the postgres user, who owns `root`
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            shutil.chown(root, "postgres", "postgres")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
        self.port = self._start_on_free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"
        self.execute("CREATE DATABASE mlflow", database="postgres")

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.as_owner, str(PG_BIN / tool), *args], cwd=self.root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done

    def _start_on_free_port(self) -> int:
        """`pg_ctl start` on a free port; a port taken between choosing and binding it: another one."""
        for _ in range(3):
            port = free_ports(1)[0]
            options = f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
            command = [*self.as_owner, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"]
            if subprocess.run(command, cwd=self.root, capture_output=True, timeout=120).returncode == 0:
                return port
        raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text()[-3000:]}")

    def execute(self, sql: str, params: tuple = (), *, database: str = "mlflow") -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database)
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def stop(self) -> None:
        """Stop the server if it runs (a pid file is there), at once: nothing in it is worth a checkpoint."""
        if (self.data / "postmaster.pid").is_file():
            subprocess.run([*self.as_owner, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                           cwd=self.root, capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def postgres():
    if not (PG_BIN / "pg_ctl").is_file():
        pytest.fail(f"no PostgreSQL 15 at {PG_BIN}: install Debian's postgresql-15 package (.ci/run does)")
    # not under pytest's tmp_path: the postgres user must be able to reach its folder
    root = Path(tempfile.mkdtemp(prefix="rf-pg-", dir="/tmp"))
    server = Postgres(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- S3 and the MLflow server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "server.log")
    try:
        yield server
    finally:
        server.close()


def client_env() -> dict[str, str]:
    """This process's environment less every AWS_* and MLFLOW_* variable: an MLflow client that
    holds no S3 credentials and no store of its own."""
    return {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MLFLOW_"))}


class MlflowServer:
    """`mlflow server` on PostgreSQL with proxied artifacts in s3://bucket/mlflow. The S3 endpoint and
    credentials are in its environment alone (boto3 reads them there). Started at once and waited
    for on first use (`url`), so its start overlaps the ingest, which needs no MLflow."""

    def __init__(self, postgres: Postgres, s3: S3Server, root: Path) -> None:
        self.postgres, self.root, self.log = postgres, root, root / "server.log"
        self.env = client_env() | {
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
            "AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": s3.env["AWS_DEFAULT_REGION"],
            # no background job runner (huey workers): nothing here uses it, and it costs CPU and processes
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        self.process: subprocess.Popen | None = None
        self._url: str | None = None
        self._start()

    def _start(self) -> None:
        self.port = free_ports(1)[0]
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", self.postgres.url,
                   "--artifacts-destination", "s3://bucket/mlflow", "--serve-artifacts"]  # fmt: skip
        with self.log.open("ab") as sink:
            # cwd: a folder of its own, where a server that fell back to local storage would leave mlruns/ or mlartifacts/
            self.process = subprocess.Popen(command, cwd=self.root, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip

    @property
    def url(self) -> str:
        """The server's URL once /health answers. The port was free when chosen but may be taken before
        the server binds it (other jobs run beside the tests): a server that exits starts again on another."""
        if self._url is not None:
            return self._url
        for attempt in range(3):
            if attempt:
                self.stop()
                self._start()
            deadline = time.monotonic() + 180
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                        if response.status == 200:
                            self._url = f"http://127.0.0.1:{self.port}"
                            return self._url
                except OSError:
                    pass
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_group(self.process, timeout=10)  # the CLI runs uvicorn as a child process


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3, tmp_path_factory):
    server = MlflowServer(postgres, s3, tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


# --- the chain, as its user runs it ---------------------------------------------------------------

MODEL = "reelforge-prod"
SHARDS = "s3://bucket/shards"
INGEST = ["--set", "clips.min_seconds=1.0", "--set", "clips.max_seconds=2.0", "--set", "clips.fps=8",
          "--set", "clips.size=64x64", "--set", "shards.target_mb=0.02", "--set", "caption.backend=metadata"]  # fmt: skip


def tiny_config(path: Path, tracking_uri: str) -> Path:
    """configs/train/tiny.yaml with the server as its store: 2 steps on one worker, this model name, and
    no held-out split: which clips a 1% split keeps out of three depends on the encoder's bytes, so
    the gate evaluates on the first clips by rank instead, read from S3 all the same."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "train" / "tiny.yaml").read_text())
    config["mlflow"] = {"tracking_uri": tracking_uri}
    config["registry"] = {"model_name": MODEL}
    config["train"]["max_steps"] = 2
    config["scaling"]["num_workers"] = 1
    config["data"]["held_out"] = 0.0
    path.write_text(yaml.safe_dump(config))
    return path


def reelforge(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "infra", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"reelforge {argv[0]} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


def bucket_objects(s3: S3Server, prefix: str) -> dict[str, int]:
    """Every object under `prefix` in the bucket: key -> size."""
    import pyarrow.fs as pafs

    infos = s3.fs.get_file_info(pafs.FileSelector(f"bucket/{prefix}", recursive=True, allow_not_found=True))
    return {info.path.removeprefix("bucket/"): info.size for info in infos if info.type == pafs.FileType.File}


def test_ingest_train_promote_generate_on_postgres_and_s3(ray_local, postgres, s3, mlflow_server, tmp_path):
    import av
    import pyarrow.parquet as pq

    work = tmp_path / "work"
    work.mkdir()
    source = write_video(FootageSpec("s3_source", "mp4", "libx264", 160, 120, Fraction(12),
                                     varied_shots([("moving", 2.5)] * 3)), tmp_path / "footage" / "s3_source.mp4")  # fmt: skip
    # shards on S3: ingest and training join the test's Ray, whose workers get the endpoint variables
    job_env = cli_env(ray_local, s3.env) | {"REELFORGE_CACHE": str(tmp_path / "cache")}

    reelforge(["ingest", str(source.path), "--out", SHARDS, *INGEST], job_env, work)
    shards = bucket_objects(s3, "shards")
    assert {"shards/_SUCCESS", "shards/manifest.parquet"} <= set(shards) and any(k.startswith("shards/shard-") for k in shards), shards

    out, url = tmp_path / "runs" / "tiny", mlflow_server.url
    trained = reelforge(["train", "--config", str(tiny_config(work / "tiny.yaml", url)), "--data", SHARDS, "--out", str(out)], job_env, work)
    assert "| steps | 2 |" in trained.stdout and f"| tracking_uri | {url} |" in trained.stdout, trained.stdout
    assert f"| registered | models:/{MODEL}@candidate (version 1) |" in trained.stdout, trained.stdout

    # promote through the gate: it evaluates the candidate on clips of the shards it trained on, which
    # run.json in --out names (s3://...), so it holds the shards' S3 variables. Its model download
    # streams through the server (MLflow's presigned direct download turned off, as where jobs cannot
    # reach the bucket's endpoint: docs/cluster.md)
    promote_env = client_env() | s3.env | {"REELFORGE_CACHE": str(tmp_path / "cache"), "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
    promoted = reelforge(["promote", MODEL, "--from-alias", "candidate", "--alias", "production", "--tracking-uri", url,
                          "--steps", "1", "--prompts", "1", "--clips", "1"], promote_env, work)  # fmt: skip
    assert promoted.stdout.strip() == f"{MODEL}@production -> version 1", promoted.stdout + promoted.stderr[-3000:]

    # serve from the registry with no S3 credentials at all: the server hands out presigned URLs
    video = tmp_path / "fox.mp4"
    generate_env = client_env() | {"MLFLOW_TRACKING_URI": url, "REELFORGE_CACHE": str(tmp_path / "generate-cache")}
    reelforge(["generate", "--model", f"models:/{MODEL}@production", "--prompt", "a red circle moving right",
               "--frames", "4", "--steps", "2", "--out", str(video)], generate_env, work)  # fmt: skip
    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert (len(frames), *frames[0].shape) == (4, 32, 32, 3)

    # where things went: runs, metrics, params, tags, versions and aliases are rows in PostgreSQL ...
    ((experiment_id, artifact_location),) = postgres.execute("SELECT experiment_id, artifact_location FROM experiments WHERE name = 'reelforge'")
    assert artifact_location == f"mlflow-artifacts:/{experiment_id}"  # proxied: clients never see the bucket
    ((run_id, status),) = postgres.execute("SELECT run_uuid, status FROM runs WHERE name = 'tiny'")
    assert status == "FINISHED"
    logged = dict(postgres.execute("SELECT key, max(step) FROM metrics WHERE run_uuid = %s GROUP BY key", (run_id,)))
    assert logged["loss"] == 2 and "clips_per_s" in logged, logged
    tags = dict(postgres.execute("SELECT key, value FROM tags WHERE run_uuid = %s", (run_id,)))
    assert tags["reelforge.data_manifest_sha256"] == file_sha256("bucket/shards/manifest.parquet", s3.fs)
    params = dict(postgres.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)))
    assert (params["ingest.clips.size"], params["ingest.caption.backend"]) == ("64x64", "metadata")  # read from the shards' record on S3
    assert postgres.execute("SELECT name, version, run_id, status FROM model_versions") == [(MODEL, 1, run_id, "READY")]
    aliases = postgres.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias", (MODEL,))
    assert aliases == [("candidate", 1), ("production", 1)]
    version_tags = dict(postgres.execute("SELECT key, value FROM model_version_tags WHERE name = %s AND version = 1", (MODEL,)))
    assert {"reelforge.eval.flicker", "reelforge.eval.run_id"} <= set(version_tags), version_tags
    eval_params = dict(postgres.execute("SELECT key, value FROM params WHERE run_uuid = %s", (version_tags["reelforge.eval.run_id"],)))
    clip_ids = set(pq.read_table("bucket/shards/manifest.parquet", filesystem=s3.fs, columns=["id"]).column("id").to_pylist())
    assert eval_params["eval.data"] == SHARDS and eval_params["eval.clip_ids"] in clip_ids  # the gate read a clip from S3

    # ... and the artifacts are objects in the bucket: the run's bundle and the logged model, byte for byte
    objects = bucket_objects(s3, "mlflow")
    logged_model = [key for key in objects if key.startswith(f"mlflow/{experiment_id}/models/m-")]
    assert any(key.endswith("/artifacts/MLmodel") for key in logged_model), sorted(objects)
    weights = file_sha256(out / "bundle" / "weights.safetensors")
    run_weights = f"mlflow/{experiment_id}/{run_id}/artifacts/bundle/weights.safetensors"
    (model_weights,) = [key for key in logged_model if key.endswith("/weights.safetensors")]
    assert file_sha256(f"bucket/{run_weights}", s3.fs) == file_sha256(f"bucket/{model_weights}", s3.fs) == weights
    # which way the bytes went, from the server's access log: uploads through it; promote's download
    # streamed through it, generate's straight from S3 with a presigned URL it handed out
    requests = mlflow_server.log.read_text()
    for method, route, key in (("PUT", "artifacts", run_weights), ("PUT", "artifacts", model_weights),
                               ("GET", "artifacts", model_weights), ("GET", "presigned", model_weights)):  # fmt: skip
        assert f'"{method} /api/2.0/mlflow-artifacts/{route}/{key.removeprefix("mlflow/")} HTTP/1.1" 200' in requests, (method, route, key)

    # nothing local: no SQLite store or artifact folder beside the run, the commands or the server
    for folder in (out, work, mlflow_server.root):
        assert not {"mlflow.db", "mlruns", "mlartifacts"} & {path.name for path in folder.iterdir()}, sorted(folder.iterdir())


def test_a_failed_run_resumes_and_its_model_serves_through_the_server(mlflow_server, tmp_path, monkeypatch):
    """In this process, against the same server: a FAILED run resumed keeps one loss per step, and the
    registered model loads as an MLflow pyfunc (artifacts from S3 through presigned URLs) and predicts."""
    import mlflow

    url = mlflow_server.url
    for name in [key for key in os.environ if key.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(name)  # a client with no S3 credentials and no store of its own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    bundle = tiny_bundle(tmp_path / "bundle")
    cfg = MlflowSection(tracking_uri=url)
    tracker = Tracker(cfg, tmp_path)
    run_id = tracker.start_or_resume(run_name="server")
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.end("FAILED")
    resumed = Tracker(cfg, tmp_path)
    assert resumed.start_or_resume(run_id) == run_id
    for step in range(2, 6):
        resumed.log_metrics({"loss": 0.1}, step=step)
    resumed.flush()

    version = log_and_register(bundle, run_id, RegistrySection(model_name="fox-server"), url)
    resumed.end()
    client = mlflow.MlflowClient(url)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5]
    assert str(client.get_model_version_by_alias("fox-server", "candidate").version) == str(version.version) == "1"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server, nothing local

    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model("models:/fox-server@candidate")
    out = model.predict(pd.DataFrame([{"prompt": "a fox", "steps": 1, "seed": 1}, {"prompt": "snow", "num_frames": 2}]))
    assert list(out["num_frames"]) == [FRAMES, 2]
    for row in out.itertuples():
        assert decoded_shape(base64.b64decode(row.video_mp4_base64)) == (row.num_frames, SIZE, SIZE)
    assert np.isfinite(out["fps"]).all()
