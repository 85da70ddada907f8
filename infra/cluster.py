"""Reaching Ray, by Ray's own convention, and saying which Ray it is.

    start_ray()            # RAY_ADDRESS names a cluster: join it (`ray job submit` sets it for a job)
                           # RAY_ADDRESS unset: a Ray started on this machine (`ray start --head`),
                           #   else a new local instance of this process's own
                           # RAY_ADDRESS=local: always a new local instance (what the tests use)
    start_ray(num_cpus=4)  # the CPUs of a new local instance (ignored when joining a cluster)

Every command that needs Ray comes through here, so `reelforge ingest` and `reelforge train` pick
the same Ray and log it in one line (address, CPUs, GPUs). Every worker of the job logs like the
driver (infra/logs.py).
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
        try:
            # Ray's rule for no address: a cluster running on this machine. "auto" is that rule
            # without its fallback, so a new local instance can be sized (joining takes no num_cpus).
            ray.init(address="auto", runtime_env=runtime_env)
        except ConnectionError:
            address = "local"
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, runtime_env=runtime_env)
    elif address is not None:
        ray.init(address=address, runtime_env=runtime_env)
    where = "a new local instance" if address == "local" else ray.get_runtime_context().gcs_address
    resources = ray.cluster_resources()
    logger.info(
        "Ray: %s, %g CPUs, %g GPUs (ready in %.1f s)",
        where, resources.get("CPU", 0), resources.get("GPU", 0), time.monotonic() - started,
    )  # fmt: skip
