"""The Ray head the cluster tests run against: tests/infra/test_ray_job.py (docs/cluster.md's
sequence, and `reelforge submit`).

One head per module that asks for it, started the first time a test does (and stopped with the
module, so no idle cluster outlives the tests that need it). It runs as a fresh machine would: its
own HOME (no ~/.ray/auth_token until the documented `ray get-auth-token --generate`), its own Ray
temp dir (RAY_TMPDIR, where `ray start` records the cluster's address for `ray.init()` to find) and
its own ports, so no other Ray on this machine is touched or joined by mistake. It is stopped by its
session id (the documented `ray stop` would stop every Ray on the machine), always.
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
VENV_BIN = Path(sys.executable).parent
# What the head adds to the documented `ray start --head`, and why: ports and a fixed CPU count of
# its own (4: more than this 2-core machine, so the log line tells the head from a local instance).
HEAD_EXTRA = ["--block", "--num-cpus", "4", "--disable-usage-stats"]
DEADLINE_S = 600


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

    @property
    def token(self) -> str:
        """The cluster's token, as `ray get-auth-token --generate` wrote it to the head's HOME."""
        return (self.root / "home" / ".ray" / "auth_token").read_text().strip()

    def run(self, argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=DEADLINE_S)

    def submit(self, documented: str, paths: dict[str, Path], extra: list[str] = ()) -> subprocess.CompletedProcess:
        """`ray job submit ...` as documented, its example paths replaced, against this head's dashboard."""
        argv = documented.split() + list(extra)
        argv = [str(paths.get(arg, arg)) for arg in argv]
        return self.run(argv, env=self.env | {"RAY_ADDRESS": self.dashboard})


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a process started with start_new_session=True and its whole group (a CLI and the server
    it runs as a child: `mlflow server`, `reelforge serve`), wait for it, SIGKILL the group if it
    outlives `timeout`."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
def head_env() -> dict[str, str]:
    """Variables a test module gives the head (and so every job on it), as a node's environment
    would: none unless a module overrides this fixture (an object store's endpoint and keys, say)."""
    return {}


@pytest.fixture(scope="module")
def head(head_env):
    """docs/cluster.md's steps 2-4 on a fresh HOME: a token, token mode, `ray start --head`."""
    # short: Ray's socket paths live under the temp dir and must fit in 107 characters
    root = Path(tempfile.mkdtemp(prefix="rf-head-", dir="/tmp"))
    (root / "home").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    # step 1's result: the venv's python and ray first on PATH (the suite runs in that venv)
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(VENV_BIN.parent)}
    env |= {"HOME": str(root / "home"), "RAY_TMPDIR": str(root), "RAY_USAGE_STATS_ENABLED": "0"} | head_env
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
