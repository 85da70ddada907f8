"""Which model a server runs (a --model reference resolved to a local bundle and registry version), and what a request costs it.

    check_reference("models:/fox@champion")        # ValueError in one line now, before any download
    bundle, version, sha256 = resolve_model(ref)    # the alias resolved first: the version loaded is the one reported
    alias_version(ref)                              # what the alias points at now (for reloads)
    loaded, seconds_per_step = load_model(settings, measure=True)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import one_line

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    pipeline: Any  # model.pipeline.VideoPipeline
    uri: str  # what --model said
    version: str | None  # the registry version it resolved to (None for a bundle folder)
    bundle_sha256: str
    loaded_at: float = field(default_factory=time.time)

    def info(self) -> dict[str, Any]:
        config = self.pipeline.bundle.config
        return {
            "model_uri": self.uri, "model_version": self.version, "bundle_sha256": self.bundle_sha256,
            "trained": {"num_frames": config.num_frames, "width": config.width, "height": config.height, "fps": config.fps},
        }  # fmt: skip


def resolve_model(ref: str) -> tuple[Path, str | None, str]:
    """(local bundle folder, registry version or None, bundle sha256) for a --model reference.
    An alias is resolved to its version first, so the version downloaded is the version reported."""
    from model.bundle import bundle_sha256

    if ref.startswith("models:/"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from training.registry import TAG_BUNDLE_SHA256, download_registered_bundle

        name, at, alias = ref.removeprefix("models:/").partition("@")
        client = MlflowClient()
        try:
            version = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(*name.split("/", 1))
        except (MlflowException, TypeError) as exc:
            raise ValueError(f"--model {ref!r}: {one_line(exc)}") from None
        bundle = download_registered_bundle(f"models:/{version.name}/{version.version}")
        return bundle, str(version.version), version.tags.get(TAG_BUNDLE_SHA256) or bundle_sha256(bundle)
    from infra.generate import resolve_model_path

    bundle = resolve_model_path(ref)
    return bundle, None, bundle_sha256(bundle)


def check_reference(ref: str) -> None:
    """Fail now, in one line, on a --model that cannot resolve (no folder, no such alias or version);
    downloading and loading it happen in the background."""
    if not ref.startswith(("models:/", "runs:/")):
        from infra.generate import resolve_model_path

        resolve_model_path(ref)
        return
    if ref.startswith("models:/"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name, at, alias = ref.removeprefix("models:/").partition("@")
        try:
            MlflowClient().get_model_version_by_alias(name, alias) if at else MlflowClient().get_model_version(*name.split("/", 1))
        except (MlflowException, TypeError) as exc:
            raise ValueError(f"--model {ref!r}: {one_line(exc)}") from None


def alias_version(ref: str) -> str | None:
    """The version `models:/NAME@ALIAS` points at now (None for any other reference)."""
    name, at, alias = ref.removeprefix("models:/").partition("@")
    if not (ref.startswith("models:/") and at):
        return None
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def reload_if_moved(ref: str, serving: LoadedModel, load: Callable[[], LoadedModel]) -> LoadedModel | None:
    """`load()` the version `ref`'s alias points at now when it moved from the one `serving` runs;
    None when it did not, or the registry or the load failed (logged: keep serving what is loaded).
    What the embedded engine and every generator replica on Ray run every --reload-every seconds."""
    try:
        version = alias_version(ref)
    except Exception as exc:  # the registry is down
        logger.warning("could not resolve %s: %s", ref, one_line(exc))
        return None
    if version is None or version == serving.version:
        return None
    logger.info("%s moved to version %s (serving %s): loading it", ref, version, serving.version)
    try:
        return load()
    except Exception as exc:
        logger.error("could not load version %s; still serving %s: %s", version, serving.version, one_line(exc))
        return None


def cost_units(pipeline: Any, plan: Any) -> float:
    """What a validated plan costs, in units of one denoising step of one window at the trained size:
    steps x windows x latent size relative to the trained one. Serving prices a unit by measuring."""
    config = pipeline.bundle.config
    window, total, overlap = plan.window_latent_frames, plan.num_latent_frames, plan.overlap_latent_frames
    windows = 1 if total <= window else 1 + math.ceil((total - window) / max(1, window - overlap))
    area = plan.width * plan.height / (config.width * config.height)
    length = min(window, total) / pipeline.window_latent_frames
    return plan.steps * windows * area * length


def load_model(settings: Any, measure: bool) -> tuple[LoadedModel, float | None]:
    """Load `settings.model` (a ServeSettings) on its device; with `measure`, also the seconds of one
    denoising step of one window at the trained size. The first call pays one-off costs (here, not a
    client); then 1 and 3 steps: their difference / 2 leaves out the fixed costs (text encoding, decoding)."""
    import torch

    from model.pipeline import GenerationRequest, load_pipeline

    if settings.threads:
        torch.set_num_threads(settings.threads)
    bundle, version, sha256 = resolve_model(settings.model)
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    pipeline = load_pipeline(bundle, device=settings.device, dtype=dtype)
    seconds_per_step = None
    if measure:
        pipeline.generate(GenerationRequest(prompt="warm-up", steps=1))
        timed = []
        for steps in (1, 3):
            began = time.perf_counter()
            pipeline.generate(GenerationRequest(prompt="warm-up", steps=steps))
            timed.append(time.perf_counter() - began)
        seconds_per_step = max(timed[1] - timed[0], 1e-3) / 2
    return LoadedModel(pipeline, settings.model, version, sha256), seconds_per_step
