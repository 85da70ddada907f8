"""infra/cluster.py and infra/logs.py on a real local Ray: RAY_ADDRESS=local starts a Ray of the
command's own, named in one line, and its workers log like the driver without importing any module
of ours. With a `ray start` cluster on the machine (joined without RAY_ADDRESS, not with
RAY_ADDRESS=local): tests/infra/test_ray_job.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, logging, sys, threading
from infra.cluster import start_ray
from infra.logs import setup_logging

class Watch:
    # Ray forwards worker output to the driver's sys.stderr from a thread, a moment after the
    # task returns: the driver waits until the line is out instead of exiting before it.
    def __init__(self, stream):
        self.stream, self.seen = stream, threading.Event()
    def write(self, text):
        if "an info line from a worker" in text:
            self.seen.set()
        return self.stream.write(text)
    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stderr = watch = Watch(sys.stderr)

setup_logging()
start_ray(num_cpus=1)
import ray

@ray.remote
def work():
    logging.getLogger("pipelines.probe").info("an info line from a worker")
    logging.getLogger("pipelines.probe").debug("a debug line from a worker")
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("infra", "pipelines", "training", "model"))
    return ours

modules = ray.get(work.remote())
watch.seen.wait(timeout=60)
print(json.dumps({"worker_modules": modules}))
"""


def test_workers_log_like_the_driver_and_import_nothing_of_ours():
    env = os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["worker_modules"] == []
    # the worker's line, in infra/logs.py's format, forwarded to the driver; DEBUG stays below the level
    lines = [line for line in done.stderr.splitlines() if "an info line from a worker" in line]
    assert len(lines) == 1 and " INFO pipelines.probe: an info line from a worker" in lines[0], done.stderr[-3000:]
    assert "a debug line from a worker" not in done.stderr
    assert "INFO infra.cluster: Ray: a new local instance, 1 CPUs, 0 GPUs" in done.stderr
