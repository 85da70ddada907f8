"""Fixtures shared across the suite.

Everything here is real: a local Ray instance, real files. The only thing faked is what
cannot exist on this machine: no model hub (HF_HUB_OFFLINE) and no GPU.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# No model hub here: every pretrained component loads from a local folder or a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Ray: no usage stats prompt, no dashboard, quiet workers.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Commands the tests run start a local Ray of their own (infra/cluster.py) unless a test points
# them at the session's instance: never a `ray start` cluster that happens to run on this machine,
# which Ray's convention (no RAY_ADDRESS) would join.
os.environ["RAY_ADDRESS"] = "local"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# DeepSpeed compiles its CPU communication op (~45 s on two cores) into torch's extension folder
# under HOME, with the first `ninja` on PATH. The test heads give their jobs a HOME of their own,
# and a different ninja rebuilds what another built: so every process of the suite (Ray workers,
# job drivers on the heads) uses the venv's ninja and one folder, and the op is built once.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cpu")
)


# --- footage: encoded once per session, read by every test file (never written to) ------------


@pytest.fixture(scope="session")
def standard_footage(tmp_path_factory):
    """The standard footage suite (infra/footage: codecs, containers, sizes, rates, VFR, rotation,
    audio, sidecars) as {spec name: GeneratedVideo}, each file with its truth."""
    from infra.footage import standard_suite

    return {video.spec.name: video for video in standard_suite(tmp_path_factory.mktemp("standard-footage"))}


@pytest.fixture(scope="session")
def demo_footage(tmp_path_factory):
    """The demo suite `make demo` ingests, as a list of GeneratedVideo."""
    from infra.footage import demo_suite

    return demo_suite(tmp_path_factory.mktemp("demo-footage"))


@pytest.fixture(scope="session")
def bad_footage(tmp_path_factory) -> dict[str, Path]:
    """Files ingest must reject (empty, truncated, not a video, audio only, zero frames): kind -> path."""
    from infra.footage import bad_files

    return bad_files(tmp_path_factory.mktemp("bad-footage"))


@pytest.fixture(scope="session")
def damaged_footage(tmp_path_factory) -> dict[str, Path]:
    """Files that open but end early (a decode error part way, a silent cut): kind -> path."""
    from infra.footage import damaged_files

    return damaged_files(tmp_path_factory.mktemp("damaged-footage"))


@pytest.fixture(scope="session")
def copy_footage():
    """`copy_footage(files, folder)`: copies of session footage {kind: path} in `folder`, for a test
    that ingests a folder it owns (the session's files stay untouched)."""

    def copy(files: dict[str, Path], folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        return {kind: Path(shutil.copy2(path, folder / path.name)) for kind, path in files.items()}

    return copy


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, sized like CI (2 CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster another process started on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()
