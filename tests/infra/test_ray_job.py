"""The cluster path of docs/cluster.md, run as written, against a real `ray start --head` with Ray's
token authentication on; and how `reelforge train` and `reelforge ingest` find a cluster that
`ray start` runs on this machine (infra/cluster.py).

One head serves the module. It runs as a fresh machine would: its own HOME (no ~/.ray/auth_token
until the documented `ray get-auth-token --generate`), its own Ray temp dir (RAY_TMPDIR, where
`ray start` records the cluster's address for `ray.init()` to find) and its own ports, so no
other Ray on this machine is touched or joined by mistake. It is stopped by its session id (the
documented `ray stop` would stop every Ray on the machine), always.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
# Each test here holds a cluster start, an ingest job and a training job:
# on a busy 2-core machine that may take more than the suite's 600 s per test.
pytestmark = pytest.mark.timeout(1200)

VENV_BIN = Path(sys.executable).parent
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
# What the test adds to the documented commands, and why: ports and a fixed CPU count of its own
# (4: more than this 2-core machine, so the log line tells the head from a local instance), and a
# training of 2 steps.
HEAD_EXTRA = ["--block", "--num-cpus", "4", "--disable-usage-stats"]
TRAIN_EXTRA = ["--set", "train.max_steps=2"]
DEADLINE_S = 600


def documented_sequence() -> list[str]:
    """The commands of docs/cluster.md's tested block, comments dropped."""
    block = DOC.read_text().split(DOC_MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Head:
    env: dict[str, str]  # the documented shell: the venv on PATH, RAY_AUTH_MODE=token, HOME, RAY_TMPDIR
    root: Path
    gcs_address: str
    dashboard: str
    log: Path

    def run(self, argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=DEADLINE_S)

    def submit(self, documented: str, paths: dict[str, Path], extra: list[str] = ()) -> subprocess.CompletedProcess:
        """`ray job submit ...` as documented, its example paths replaced, against this head's dashboard."""
        argv = documented.split() + list(extra)
        argv = [str(paths.get(arg, arg)) for arg in argv]
        return self.run(argv, env=self.env | {"RAY_ADDRESS": self.dashboard})


def stop_session(leader: subprocess.Popen) -> None:
    """Kill every process of the head's session and every descendant (job drivers start sessions of
    their own), then reap the leader."""
    doomed = set()
    try:
        doomed.update(psutil.Process(leader.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader.pid:
                doomed.add(process)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    for process in doomed:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(doomed), timeout=60)
    leader.kill()
    leader.wait(timeout=60)


def wait_until_up(process: subprocess.Popen, address_file: Path, dashboard: str, log: Path) -> None:
    """Until `ray start` has recorded the cluster and its dashboard answers (any HTTP status)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if address_file.is_file():
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=5)
                return
            except urllib.error.HTTPError:
                return  # it answered (401 without a token is an answer)
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.5)
    raise RuntimeError(f"the head did not come up in 180 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head():
    """Documented steps 2-4 on a fresh HOME: a token, token mode, `ray start --head`."""
    # short: Ray's socket paths live under the temp dir and must fit in 107 characters
    root = Path(tempfile.mkdtemp(prefix="rf-head-", dir="/tmp"))
    (root / "home").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    # step 1's result: the venv's python and ray first on PATH (the suite runs in that venv)
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(VENV_BIN.parent)}
    env |= {"HOME": str(root / "home"), "RAY_TMPDIR": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120)
    assert token.returncode == 0 and (root / "home" / ".ray" / "auth_token").is_file(), token.stderr
    env["RAY_AUTH_MODE"] = "token"
    gcs, dashboard, client, agent = free_ports(4)
    command = ["ray", "start", "--head", *HEAD_EXTRA, "--port", str(gcs), "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent)]  # fmt: skip
    log = root / "head.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address_file = root / "ray" / "ray_current_cluster"
        wait_until_up(process, address_file, f"http://127.0.0.1:{dashboard}", log)
        yield Head(env, root, address_file.read_text().strip(), f"http://127.0.0.1:{dashboard}", log)
    finally:
        stop_session(process)
        shutil.rmtree(root, ignore_errors=True)


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
    """No RAY_ADDRESS: both commands find the head `ray start` recorded and say so; with
    RAY_ADDRESS=local both start a Ray of their own."""
    assert ingest_job.returncode == 0
    shards, scratch = data["/data/shards"], head.root / "scratch"
    # 7b cannot fit in the head's memory: the command joins Ray, asks it, and stops in one line
    train = [sys.executable, "-m", "infra", "train", "--config", "train/tiny", "--data", str(shards), "--set", "model.preset=7b"]
    one_source = sorted(data["/data/footage"].glob("*.mp4"))[0]
    ingest = [sys.executable, "-m", "infra", "ingest", str(one_source), "--config", "ingest/demo"]
    runs = {
        "joined": (head.env, f"the cluster at {head.gcs_address}, 4 CPUs"),
        "local": (head.env | {"RAY_ADDRESS": "local"}, "a new local instance"),
    }
    for name, (env, where) in runs.items():
        trained = head.run([*train, "--out", str(scratch / name / "train")], env=env)
        assert trained.returncode == 1 and f"INFO infra.cluster: Ray: {where}" in trained.stderr, trained.stderr[-3000:]
        assert trained.stderr.strip().splitlines()[-1].startswith("reelforge train: model.preset=7b ")
        ingested = head.run([*ingest, "--out", str(scratch / name / "shards")], env=env)
        assert ingested.returncode == 0 and f"INFO infra.cluster: Ray: {where}" in ingested.stderr, ingested.stderr[-3000:]
