"""The inference bundle: everything `model/` needs to generate, without DeepSpeed or Ray.

A bundle is a directory:

    model_config.json      what to build: the DiTConfig fields, the autoencoder and text encoder
                           specs, the clip format it was trained on (fps, frames, size),
                           generation defaults and the reelforge version (written last, so a
                           folder without it is an unfinished bundle)
    weights.safetensors    the DiT weights (the EMA weights when training keeps an EMA)

The autoencoder and text encoder are referenced by spec ("pixel", "minilm", "wan:/data/vae",
"t5:/data/t5"), not copied: the registered MLflow model carries their folders as separate
artifacts and rewrites the specs at load time (see model/pyfunc.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.autoencoders import Autoencoder, load_autoencoder
from model.dit import DiT, DiTConfig
from model.storage import folder_sha256
from model.text_encoders import DEFAULT_MAX_LENGTH, TextEncoder, load_text_encoder, parse_text_encoder_spec

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.safetensors"
BUNDLE_FORMAT = "reelforge-bundle"
BUNDLE_FORMAT_VERSION = 1

# Sampling defaults a request may leave out. 30 Euler steps is where rectified-flow video models
# (SD3, Wan) stop gaining visibly; guidance 5 is Wan 2.1's default.
DEFAULT_GENERATION = {"steps": 30, "guidance": 5.0}
# Generation settings a bundle may record without a default: "shift" is the timestep shift the model
# was trained with (training's `train.timestep_shift`); absent, sampling uses the resolution default,
# which is what training used then too.
OPTIONAL_GENERATION = ("shift",)

# Prefixes that wrappers add to parameter names: torch.compile (`_orig_mod.`), DDP/DeepSpeed
# (`module.`), activation checkpointing (`_checkpoint_wrapped_module.`). Stripped so a state dict
# gathered from a wrapped training model loads into the plain DiT.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")


@dataclass
class Bundle:
    dit: DiT
    config: dict[str, Any]  # the parsed model_config.json
    autoencoder: Autoencoder
    text_encoder: TextEncoder
    path: Path


def _reelforge_version() -> str:
    # model/ ships alone inside a registered MLflow model, so it cannot import infra.__version__.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reelforge")
    except PackageNotFoundError:
        return "unknown"


def _clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for name, tensor in state_dict.items():
        if name.startswith("module."):
            name = name[len("module.") :]
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        cleaned[name] = tensor.detach().to("cpu").contiguous()
    return cleaned


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], dit_cfg: DiTConfig) -> None:
    """Names and shapes must match DiT(dit_cfg) exactly: a mismatch found at save time costs
    nothing, found at serving time it costs a training run."""
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in DiT(dit_cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the DiT config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(state_dict[name].shape)}, the DiT config needs {shape}")


def _spec_of(component: Any, what: str) -> str:
    if isinstance(component, str):
        return component
    spec = getattr(component, "spec", None)
    if not isinstance(spec, str):
        raise ValueError(f"{what} must be a spec string or a loaded {what} with .spec, got {type(component).__name__}")
    return spec


def save_bundle(
    bundle_dir: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor] | None,
    dit_cfg: DiTConfig,
    *,
    autoencoder: str | Autoencoder,
    text_encoder: str | TextEncoder,
    fps: float,
    num_frames: int,
    width: int,
    height: int,
    extra: dict[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write an inference bundle; returns its path.

    `model` is the DiT (or its EMA copy) or already a state dict; training under ZeRO-3 gathers the
    full weights itself and may pass them as `state_dict=` instead. Weights keep their dtype.
    `autoencoder` / `text_encoder` are specs or the loaded objects (their `.spec` is stored).
    `extra` adds keys to model_config.json (e.g. the MLflow run id, the training step); its
    "generation" entry overrides the sampling defaults (steps, guidance) and may add "shift".
    """
    if (model is None) == (state_dict is None):
        raise ValueError("save_bundle needs exactly one of a model / state dict (positional) or state_dict=")
    source = state_dict if state_dict is not None else model
    weights = _clean_state_dict(source.state_dict() if isinstance(source, nn.Module) else source)
    _check_state_dict(weights, dit_cfg)
    if fps <= 0 or num_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"bad clip format fps={fps} num_frames={num_frames} size={width}x{height}")

    ae_spec = _spec_of(autoencoder, "autoencoder")
    text_spec = _spec_of(text_encoder, "text_encoder")
    kind, _ = parse_text_encoder_spec(text_spec)
    # Prompts longer than the DiT's text table cannot be attended to; the text encoder is told so at load.
    text_max_length = min(getattr(text_encoder, "max_length", DEFAULT_MAX_LENGTH[kind]), dit_cfg.max_text_tokens)
    config: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "reelforge_version": _reelforge_version(),
        "dit": dataclasses.asdict(dit_cfg),
        "autoencoder": ae_spec,
        "text_encoder": text_spec,
        "text_max_length": text_max_length,
        "fps": float(fps),
        "num_frames": int(num_frames),
        "width": int(width),
        "height": int(height),
        "weights_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch."),
        "generation": dict(DEFAULT_GENERATION),
    }
    for key, value in (extra or {}).items():
        if key == "generation":
            allowed = {*DEFAULT_GENERATION, *OPTIONAL_GENERATION}
            unknown = set(value) - allowed
            if unknown:
                raise ValueError(f"unknown generation defaults {sorted(unknown)}; allowed {sorted(allowed)}")
            shift = value.get("shift")
            if shift is not None and not (isinstance(shift, (int, float)) and shift > 0):
                raise ValueError(f"generation shift {shift!r} must be a number > 0")
            config["generation"].update(value)
        elif key in config:
            raise ValueError(f"extra key {key!r} would overwrite a bundle field")
        else:
            config[key] = value

    from safetensors.torch import save_file

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, config last: a reader never sees a half-written bundle.
    tmp_weights = bundle_dir / (WEIGHTS_FILE + ".tmp")
    save_file(weights, tmp_weights, metadata={"format": "pt"})
    os.replace(tmp_weights, bundle_dir / WEIGHTS_FILE)
    tmp_config = bundle_dir / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(config, indent=2, default=str))
    os.replace(tmp_config, bundle_dir / CONFIG_FILE)
    logger.info("saved bundle %s (%d tensors, %s)", bundle_dir, len(weights), config["weights_dtype"])
    return bundle_dir


def bundle_sha256(bundle_dir: str | Path) -> str:
    """sha256 over every file of a bundle (relative path and bytes, in path order): two bundles hash
    alike exactly when they would load alike. Registration tags versions with it, so the same
    weights registered twice are recognised."""
    return folder_sha256(bundle_dir)


def read_bundle_config(bundle_dir: str | Path) -> dict[str, Any]:
    """model_config.json of a bundle, checked for format; ValueError naming the folder otherwise."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"not an inference bundle (no {CONFIG_FILE}): {str(bundle_dir)!r}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt {CONFIG_FILE} in {str(bundle_dir)!r}: {exc}") from exc
    if config.get("format") != BUNDLE_FORMAT or config.get("format_version", 0) > BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is not a {BUNDLE_FORMAT} v<={BUNDLE_FORMAT_VERSION} config "
            f"(format={config.get('format')!r}, version={config.get('format_version')!r})"
        )
    return config


def load_bundle(
    bundle_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Bundle:
    """Load the DiT (in `dtype`, default the saved one), autoencoder and text encoder of a bundle."""
    bundle_dir = Path(bundle_dir)
    config = read_bundle_config(bundle_dir)
    weights_path = bundle_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"bundle {str(bundle_dir)!r} has no {WEIGHTS_FILE}")
    dit_cfg = DiTConfig(**config["dit"])

    from safetensors.torch import load_file

    weights = load_file(weights_path, device=str(device))
    _check_state_dict(weights, dit_cfg)
    if dtype is not None:
        weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
    # Build on the meta device and adopt the loaded tensors: no second full-size copy, no init cost.
    with torch.device("meta"):
        dit = DiT(dit_cfg)
    dit.load_state_dict(weights, assign=True)
    dit.eval().requires_grad_(False)

    autoencoder = load_autoencoder(config["autoencoder"], device=device, dtype=dtype or torch.float32)
    text_encoder = load_text_encoder(config["text_encoder"], device=device, max_length=config["text_max_length"])
    if autoencoder.latent_channels != dit_cfg.in_channels:
        raise ValueError(
            f"bundle {str(bundle_dir)!r}: autoencoder {config['autoencoder']!r} has {autoencoder.latent_channels} "
            f"latent channels, the DiT expects {dit_cfg.in_channels}"
        )
    if text_encoder.dim != dit_cfg.text_dim:
        raise ValueError(
            f"bundle {str(bundle_dir)!r}: text encoder {config['text_encoder']!r} has width {text_encoder.dim}, "
            f"the DiT expects {dit_cfg.text_dim}"
        )
    logger.info("loaded bundle %s on %s", bundle_dir, device)
    return Bundle(dit=dit, config=config, autoencoder=autoencoder, text_encoder=text_encoder, path=bundle_dir)
