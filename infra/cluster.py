"""Reaching Ray: the cluster `RAY_ADDRESS` names, or a Ray instance of this process's own.

    start_ray()            # RAY_ADDRESS=ray://head:10001 or auto: join it; unset or "local": start one here
    start_ray(num_cpus=4)  # a local instance with 4 CPUs (ignored when joining a cluster)

`ray job submit` sets RAY_ADDRESS for the job's driver, so a submitted command joins its cluster.
Without it a command never attaches to a Ray that another process started on this machine
(Ray's own `ray.init()` would): it starts one of its own, sized for the work, and stops it on
exit. Every worker of the job logs like the driver (infra/logs.py).
"""

from __future__ import annotations

import logging
import os
import time

from infra.logs import worker_logging_hook

logger = logging.getLogger(__name__)


def start_ray(num_cpus: int | None = None) -> None:
    """Connect this process to Ray once (later calls return at once). `num_cpus` sizes a local
    instance (default: this machine's CPUs) and is ignored when RAY_ADDRESS names a cluster."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    runtime_env = {"worker_process_setup_hook": worker_logging_hook()}
    started = time.monotonic()
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, runtime_env=runtime_env)
    else:
        ray.init(address=address, runtime_env=runtime_env)
    logger.info("Ray ready in %.1f s (%s)", time.monotonic() - started, "local instance" if address == "local" else address)
