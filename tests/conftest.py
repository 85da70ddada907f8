"""Fixtures shared across the suite.

Everything here is real: a local Ray instance, real files. The only thing faked is what
cannot exist on this machine: no model hub (HF_HUB_OFFLINE) and no GPU.
"""

from __future__ import annotations

import os

import pytest

# No model hub here: every pretrained component loads from a local folder or a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Ray: no usage stats prompt, no dashboard, quiet workers.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, sized like CI (2 CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()
