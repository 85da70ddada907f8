"""The cluster path of docs/cluster.md, run as written, against a real `ray start --head` with Ray's
token authentication on; and how `reelforge train` and `reelforge ingest` find a cluster that
`ray start` runs on this machine (infra/cluster.py).

The head is tests/infra/conftest.py's `head`, one for this module (the documented path and
`reelforge submit` below share it). It runs as a fresh machine would: its own HOME (no ~/.ray/auth_token until the documented
`ray get-auth-token --generate`), its own Ray temp dir (RAY_TMPDIR, where `ray start` records the
cluster's address for `ray.init()` to find) and its own ports, so no other Ray on this machine is
touched or joined by mistake. It is stopped by its session id (the documented `ray stop` would stop
every Ray on the machine), always.

`reelforge submit` (infra/submit.py) and its Jobs API client (infra/ray_jobs.py) run against the
same head, no mocks.

The command runs as its user would run it: HOME holds the token `ray get-auth-token --generate`
wrote, and the job runs in an uploaded copy of this checkout. The first submission runs as a
subprocess (the console command end to end); the other checks call the command's `main` in this
process, which spares a Python start and reelforge's imports each. Jobs cost seconds each on this
machine, so there are three short ones: an ingest of one demo source (re-attached to afterwards),
an ingest that fails at once (submitted with --no-wait, then re-attached to), and a `sleep` that
is interrupted.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from infra import submit
from infra.ray_jobs import AuthenticationRequired, JobNotFound, RayJobsClient, SubmissionIdTaken, failure_reason

REPO = Path(__file__).resolve().parents[2]
# Each test here holds a cluster start, an ingest job and a training job:
# on a busy 2-core machine that may take more than the suite's 600 s per test.
pytestmark = pytest.mark.timeout(1200)

DOC = REPO / "docs" / "cluster.md"
DOC_MARK = "<!-- the sequence tests/infra/test_ray_job.py runs -->"
# docs/cluster.md's sequence, exactly (checked below), with its example paths
DOCUMENTED = [
    "make setup && source .venv/bin/activate",
    "ray get-auth-token --generate",
    "export RAY_AUTH_MODE=token",
    "ray start --head",
    "ray job submit --working-dir . -- python -m infra ingest /data/footage --out /data/shards --config ingest/demo",
    "ray job submit --working-dir . -- python -m infra train --config train/tiny --data /data/shards --out /data/runs/tiny",
    "ray stop",
]
# What the test adds to the documented commands, and why: a training of 2 steps (what the head adds
# to `ray start --head`, ports and 4 CPUs, is in conftest.py's HEAD_EXTRA).
TRAIN_EXTRA = ["--set", "train.max_steps=2"]


def documented_sequence() -> list[str]:
    """The commands of docs/cluster.md's tested block, comments dropped."""
    block = DOC.read_text().split(DOC_MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture(scope="module")
def data(head, demo_footage) -> dict[str, Path]:
    """The documented example paths, as folders of this test; /data/footage holds two demo sources."""
    paths = {"/data/footage": head.root / "footage", "/data/shards": head.root / "shards", "/data/runs/tiny": head.root / "runs" / "tiny"}
    paths["/data/footage"].mkdir()
    for video in demo_footage[::3]:  # demo_a and demo_d, with their .srt captions
        for file in video.path.parent.glob(f"{video.path.stem}.*"):
            shutil.copy2(file, paths["/data/footage"] / file.name)
    return paths


@pytest.fixture(scope="module")
def ingest_job(head, data) -> subprocess.CompletedProcess:
    return head.submit(DOCUMENTED[4], data)


def test_the_doc_gives_the_tested_sequence():
    assert documented_sequence() == DOCUMENTED


@pytest.mark.slow
def test_documented_cluster_path_ingests_and_trains_as_jobs(head, data, ingest_job):
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    assert ingest_job.returncode == 0, (ingest_job.stdout + ingest_job.stderr)[-4000:]
    shards = data["/data/shards"]
    assert (shards / "_SUCCESS").is_file() and list(shards.glob("shard-*.tar"))
    assert pq.read_table(shards / "manifest.parquet").num_rows >= 4
    # the job driver joined the head (RAY_ADDRESS set by the job) with its CPUs
    assert f"Ray: the cluster at {head.gcs_address}, 4 CPUs" in ingest_job.stdout

    trained = head.submit(DOCUMENTED[5], data, TRAIN_EXTRA)
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-4000:]
    assert "| steps | 2 |" in output and f"Ray: the cluster at {head.gcs_address}, 4 CPUs" in output
    out = data["/data/runs/tiny"]
    assert (out / "bundle" / "weights.safetensors").is_file() and (out / "run.json").is_file()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("reelforge").experiment_id])
    # named after the config, and carrying the ingest config the shards were made with (ingest/demo's
    # 64x64 at 8 fps with sidecar captions, not the embedded 256x256 defaults)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params = run.data.params
    assert (params["ingest.clips.size"], params["ingest.clips.fps"], params["ingest.caption.backend"]) == ("64x64", "8.0", "sidecar")
    assert client.get_model_version_by_alias("reelforge-t2v", "candidate").run_id == run.info.run_id


@pytest.mark.slow
def test_a_job_writing_into_its_working_dir_copy_is_refused(head, data, ingest_job):
    assert ingest_job.returncode == 0
    shards = str(data["/data/shards"])
    # no --out: the default runs/tiny is relative, so inside Ray's copy of --working-dir
    refused = head.submit(f"ray job submit --working-dir . -- python -m infra train --config train/tiny --data {shards}", {})
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-3000:]
    line = next(line for line in output.splitlines() if line.startswith("reelforge train: "))
    assert line.startswith("reelforge train: --out runs/tiny resolves inside this Ray job's working-dir copy ")
    assert line.endswith("which Ray deletes with the session; pass an --out that outlasts the job, an absolute path "
                         "every node sees (e.g. --out /shared/runs/NAME) or object storage")  # fmt: skip
    assert "Ray: " not in output  # refused before any work
    # (a SQLite store beside the job's code is refused the same way: tests/training/test_run_dir.py)


@pytest.mark.slow
def test_commands_join_the_cluster_ray_start_runs_here(head, data, ingest_job):
    """No RAY_ADDRESS: a command finds the head `ray start` recorded, says so and runs there (ingest);
    with RAY_ADDRESS=local it starts a Ray of its own (train). Every command connects through
    infra/cluster.py's start_ray, so one command per case is enough here."""
    assert ingest_job.returncode == 0
    shards, scratch = data["/data/shards"], head.root / "scratch"
    one_source = sorted(data["/data/footage"].glob("*.mp4"))[0]
    ingest = [sys.executable, "-m", "infra", "ingest", str(one_source), "--config", "ingest/demo", "--out", str(scratch / "shards")]
    ingested = head.run(ingest, env=head.env)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert f"INFO infra.cluster: Ray: the cluster at {head.gcs_address}, 4 CPUs" in ingested.stderr, ingested.stderr[-3000:]
    # 7b cannot fit in this machine's memory: the command starts Ray, asks it, and stops in one line
    train = [sys.executable, "-m", "infra", "train", "--config", "train/tiny", "--data", str(shards), "--set", "model.preset=7b"]
    trained = head.run([*train, "--out", str(scratch / "train")], env=head.env | {"RAY_ADDRESS": "local"})
    assert trained.returncode == 1 and "INFO infra.cluster: Ray: a new local instance" in trained.stderr, trained.stderr[-3000:]
    assert trained.stderr.strip().splitlines()[-1].startswith("reelforge train: model.preset=7b ")


# --- reelforge submit and its Jobs API client, on the same head -------------------------------


def jobs_with_id(client: RayJobsClient, submission_id: str) -> list[dict]:
    return [job for job in client.jobs() if job.get("submission_id") == submission_id]


@pytest.fixture(scope="module")
def client(head) -> RayJobsClient:
    return RayJobsClient(head.dashboard, head.token, token_source="the head's token file")


@pytest.fixture
def head_user(head, monkeypatch, caplog):
    """This process as the head's user: its HOME (and so its token file), no token variables."""
    monkeypatch.setenv("HOME", str(head.root / "home"))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.INFO, logger="infra.submit")
    return head


@pytest.mark.slow
def test_an_ingest_job_succeeds_and_resubmitting_its_id_reattaches(head, head_user, client, demo_footage, capsys, caplog):
    source = demo_footage[0].path  # demo_a and its .srt captions, read where the session wrote them
    out = head.root / "submit" / "shards"
    submission_id = f"ingest-{uuid.uuid4().hex[:8]}"
    args = ["ingest", "--submission-id", submission_id, "--", str(source), "--out", str(out), "--config", "ingest/demo"]
    # the console command, the address in RAY_ADDRESS as `ray job submit` takes it
    first = head.run([sys.executable, "-m", "infra", "submit", *args], env=head.env | {"RAY_ADDRESS": head.dashboard})
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    said = first.stderr.splitlines()
    assert "INFO infra.submit: working dir " in said[0] and f"INFO infra.submit: submitted job {submission_id} to {head.dashboard}" in said[1]
    # the job's own output, streamed: the driver joined the head, and ingest printed its summary
    assert f"Ray: the cluster at {head.gcs_address}, 4 CPUs" in first.stdout and "| clips kept |" in first.stdout
    assert (out / "_SUCCESS").is_file() and list(out.glob("shard-*.tar"))
    finished = (out / "_SUCCESS").stat().st_mtime_ns

    assert submit.main(["--address", head.dashboard, *args]) == 0
    assert capsys.readouterr().out == first.stdout  # its output again, from the start
    assert f"job {submission_id} exists on {head.dashboard} (SUCCEEDED): re-attaching to it" in caplog.text
    assert "submitted job" not in caplog.text
    assert len(jobs_with_id(client, submission_id)) == 1 and (out / "_SUCCESS").stat().st_mtime_ns == finished

    # the same id for another command is refused: an id names one job
    assert submit.main(["--address", head.dashboard, *args, "--new-output"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"reelforge submit: job {submission_id} on {head.dashboard} runs another command (python -m infra ingest "
    )
    assert len(jobs_with_id(client, submission_id)) == 1


@pytest.mark.slow
def test_a_failing_job_exits_1_with_its_one_line_reason(head_user, client, capsys, caplog):
    """Also --pip: Ray makes the job a virtualenv on top of the node's Python with pyproject's pinned
    requirements (all present on this head, so nothing is downloaded) and runs the command in it."""
    missing = head_user.root / "submit" / "no-such-footage"
    command = ["--", str(missing), "--out", str(head_user.root / "submit" / "failed")]
    assert submit.main(["ingest", "--address", head_user.dashboard, "--pip", "--image-uri", "reelforge:1", *command]) == 2
    assert capsys.readouterr().err == "reelforge submit: --pip and --image-uri exclude each other: the image brings the dependencies\n"
    # --no-wait: the id Ray made, on stdout, and no waiting
    assert submit.main(["ingest", "--address", head_user.dashboard, "--no-wait", "--pip", *command]) == 0
    submission_id = capsys.readouterr().out.strip()
    assert submission_id.startswith("raysubmit_")
    said = [record.getMessage() for record in caplog.records]
    assert said[0].startswith(f"working dir {submit.checkout_root()}: ")  # uploaded, or held already
    assert said[1] == f"submitted job {submission_id} to {head_user.dashboard}"
    # re-attached to with that id (most likely while it still starts), it ends as the job does
    assert submit.main(["ingest", "--address", head_user.dashboard, "--submission-id", submission_id, *command]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"reelforge submit: job {submission_id} FAILED: exit code 1: ingest: SRC '{missing}': no such file or folder"
    )
    assert f"job {submission_id} exists on {head_user.dashboard} (" in caplog.text
    assert len(jobs_with_id(client, submission_id)) == 1 and client.status(submission_id) == "FAILED"
    # the command ran in Ray's pip environment (its own reason above: every import it needs resolved)
    requirements = submit.project_requirements(submit.checkout_root())
    assert "torch==2.13.0" in requirements and "ray[default,serve,train,data]==2.60.0" in requirements
    assert client.job(submission_id)["runtime_env"]["pip"]["packages"] == requirements
    assert list((head_user.root / "ray").glob("session_*/runtime_resources/pip/*/virtualenv/bin/python"))


@pytest.mark.slow
def test_a_relative_out_is_refused_before_anything_is_submitted(head_user, client, capsys):
    before = len(client.jobs())
    assert submit.main(["ingest", "--address", head_user.dashboard, "--", "/data/footage", "--out", "shards"]) == 2
    assert capsys.readouterr().err == (
        "reelforge submit: --out shards is relative, so the job would write it inside its working-dir copy, which Ray "
        "deletes with the session; give an absolute path every node sees (e.g. --out /shared/shards) or object storage\n"
    )
    # train's default --out (runs/<config>) is relative too, and so is a SQLite store beside the code
    assert submit.main(["train", "--address", head_user.dashboard, "--", "--config", "train/tiny", "--data", "/data/shards"]) == 2
    assert capsys.readouterr().err.startswith("reelforge submit: --out is not given, and reelforge train's default runs/tiny is relative")
    store = ["--set", "mlflow.tracking_uri=sqlite:///mlflow.db"]
    assert submit.main(["train", "--address", head_user.dashboard, "--", "--config", "train/tiny", "--data", "/d", "--out", "/o", *store]) == 2
    assert capsys.readouterr().err.startswith("reelforge submit: mlflow.tracking_uri sqlite:///mlflow.db is a relative path")
    assert len(client.jobs()) == before


@pytest.mark.slow
def test_a_cluster_that_wants_a_token_says_so_in_one_line(head_user, client, monkeypatch, capsys):
    nobody = head_user.root / "submit" / "home-without-token"
    nobody.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(nobody))
    before = len(client.jobs())
    argv = ["ingest", "--address", head_user.dashboard, "--", "/data/footage", "--out", "/data/shards"]
    assert submit.main(argv) == 2
    assert capsys.readouterr().err == (
        f"reelforge submit: the cluster at {head_user.dashboard} requires a token; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
        "or write it to ~/.ray/auth_token (`ray get-auth-token` on the head prints it)\n"
    )
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")  # sent, and refused in one line too
    assert submit.main(argv) == 2
    assert capsys.readouterr().err.startswith(
        f"reelforge submit: the cluster at {head_user.dashboard} refused the token from RAY_AUTH_TOKEN (403: "
    )
    assert len(client.jobs()) == before


def interrupt_in(seconds: float) -> threading.Timer:
    """Ctrl-C for this process in `seconds` (Python raises KeyboardInterrupt in the main thread),
    sent to the main thread itself: threads that Ray's core started in this process may not take it."""
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) while the test runs, as in a fresh `reelforge
    submit` process: in a full suite, code run earlier in this process (Ray's driver) may have left
    another handler, which swallowed the test's Ctrl-C. Set through `_signal`, beneath any wrapper
    of `signal.signal`."""
    import _signal

    previous = _signal.getsignal(signal.SIGINT)
    _signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    _signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_the_client_runs_a_job_and_ctrl_c_detaches_or_stops_it(head, client, monkeypatch, capsys, caplog, python_sigint):
    caplog.set_level(logging.INFO, logger="infra.submit")
    submission_id = client.submit(
        "python -c \"import time; print('sleeping', flush=True); time.sleep(120)\"", metadata={"test": "ctrl-c"}
    )
    assert submission_id.startswith("raysubmit_")
    deadline = time.monotonic() + 120
    while "sleeping" not in client.logs(submission_id):
        assert time.monotonic() < deadline, client.job(submission_id)
        time.sleep(0.3)
    assert client.status(submission_id) == "RUNNING"

    # Ctrl-C, not on a terminal and without --stop-on-interrupt: detach, the job keeps running
    interrupt_in(1.5)
    assert submit.follow(client, submission_id, stop_on_interrupt=False, reattach="REATTACH") == 130
    streamed = capsys.readouterr().out  # Ray's lines about the job's start, then the job's own
    assert streamed.endswith("sleeping\n") and streamed == client.logs(submission_id)
    assert f"detached: job {submission_id} keeps running on {head.dashboard}; re-attach with `REATTACH`" in caplog.text
    assert client.status(submission_id) == "RUNNING"
    # with --stop-on-interrupt: stop it, and follow it until it has stopped
    interrupt_in(1.5)
    assert submit.follow(client, submission_id, stop_on_interrupt=True, reattach="REATTACH") == 130
    assert capsys.readouterr().out == client.logs(submission_id)
    assert f"job {submission_id} STOPPED" in caplog.text
    job = client.wait(submission_id, timeout_s=5)
    assert job["status"] == "STOPPED" and job["metadata"] == {"test": "ctrl-c"} and failure_reason(job)
    assert client.stop(submission_id) is False  # not running any more
    assert "".join(client.follow_logs(submission_id)) == client.logs(submission_id)

    # a used id is never submitted twice: the caller re-attaches
    with pytest.raises(SubmissionIdTaken):
        client.submit("python -c pass", submission_id=submission_id)
    assert len(jobs_with_id(client, submission_id)) == 1
    # one-line errors: an unknown job, no token, nothing listening
    with pytest.raises(JobNotFound, match=f"^no job nope on the cluster at {head.dashboard}$"):
        client.job("nope")
    assert client.find("nope") is None
    with pytest.raises(AuthenticationRequired, match=f"^the cluster at {head.dashboard} requires a token; "):
        RayJobsClient(head.dashboard).jobs()
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    assert RayJobsClient.from_environment(head.dashboard).version()["ray_version"]
