"""Reaching Ray, by Ray's own convention, and saying which Ray it is.

    start_ray()            # RAY_ADDRESS names a cluster: join it (`ray job submit` sets it for a job)
                           # RAY_ADDRESS unset: the cluster `ray start` runs on this machine,
                           #   else a new local instance of this process's own (no dashboard)
                           # RAY_ADDRESS=local: always a new local instance (what the tests use)
    start_ray(num_cpus=4)  # the CPUs of a new local instance (ignored when joining a cluster)

Every command that needs Ray comes through here, so `reelforge ingest` and `reelforge train` pick
the same Ray and log it in one line (address, CPUs, GPUs). Every worker of the job logs like the
driver (infra/logs.py).

"The cluster `ray start` runs on this machine" is exactly what a plain `ray.init()` joins: the
address `ray start` records in `<Ray temp dir>/ray_current_cluster` (the temp dir is
$RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray), when a raylet of that cluster still runs
here. Not `address="auto"`'s legacy fallback, which joins whatever Ray it finds in the process
table, another user's private `ray.init()` instance included.
"""

from __future__ import annotations

import logging
import os
import time

from infra.logs import worker_logging_hook

logger = logging.getLogger(__name__)


def start_ray(num_cpus: int | None = None) -> None:
    """Connect this process to Ray once (later calls return at once)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"worker_process_setup_hook": worker_logging_hook()}
    started = time.monotonic()
    if address is None:
        # "auto" resolves to that recorded address and, unlike an explicit address, turns on token
        # authentication when ~/.ray/auth_token exists (as `ray start` did for the cluster).
        address = "auto" if started_cluster_address() is not None else "local"
    if address == "local":
        # A command's own instance lives as long as the command and nothing of ours reads its
        # dashboard, which costs ~6 CPU s to start (its head modules) and more while running
        # (docs/benchmarks.md, "Many short files"). To watch a run in the dashboard, start Ray with
        # `ray start --head` first: the command then joins that cluster and its dashboard.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, runtime_env=runtime_env, include_dashboard=False)
    else:
        ray.init(address=address, runtime_env=runtime_env)
    where = "a new local instance" if address == "local" else f"the cluster at {ray.get_runtime_context().gcs_address}"
    resources = ray.cluster_resources()
    logger.info(
        "Ray: %s, %g CPUs, %g GPUs (ready in %.1f s)",
        where, resources.get("CPU", 0), resources.get("GPU", 0), time.monotonic() - started,
    )  # fmt: skip


def started_cluster_address() -> str | None:
    """The GCS address of the cluster `ray start` recorded on this machine, if a raylet of it runs here."""
    # Ray's own helpers for its own convention (ray._private is Ray's internal API; Ray is pinned).
    from ray._private import services

    recorded = services.find_bootstrap_address(None)
    return recorded if recorded is not None and recorded in services.find_gcs_addresses() else None
