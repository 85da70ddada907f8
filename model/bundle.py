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

model_config.json is read once, into a `BundleConfig`: its fields (and `GenerationDefaults`) own
every default, so no reader fetches a key with a default of its own. The file format is unchanged
(format "reelforge-bundle", version 1); keys it does not know are carried through a rewrite as they were.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.autoencoders import Autoencoder, load_autoencoder
from model import __version__
from model.dit import DiT, DiTConfig
from model.storage import folder_sha256
from model.text_encoders import DEFAULT_MAX_LENGTH, TextEncoder, load_text_encoder, parse_text_encoder_spec

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.safetensors"
BUNDLE_FORMAT = "reelforge-bundle"
BUNDLE_FORMAT_VERSION = 1

# Prefixes that wrappers add to parameter names: torch.compile (`_orig_mod.`), DDP/DeepSpeed
# (`module.`), activation checkpointing (`_checkpoint_wrapped_module.`). Stripped so a state dict
# gathered from a wrapped training model loads into the plain DiT.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling settings a request may leave out; training records the ones its run calls for."""

    # 30 Euler steps is where rectified-flow video models (SD3, Wan) stop gaining visibly.
    steps: int = 30
    # Wan 2.1's default. Training records 1.0 when it never dropped captions: without a learned null
    # text, guidance would extrapolate towards an unconditional prediction the model does not have.
    guidance: float = 5.0
    # The timestep shift the model was trained with (training's `train.timestep_shift`). None: the
    # resolution default, which is what training used then too. Left out of the file when None, as
    # bundles written before it existed have no such key.
    shift: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"generation steps {self.steps!r} must be an integer >= 1")
        if not _is_number(self.guidance) or self.guidance < 0:
            raise ValueError(f"generation guidance {self.guidance!r} must be a number >= 0")
        if self.shift is not None and not (_is_number(self.shift) and self.shift > 0):
            raise ValueError(f"generation shift {self.shift!r} must be a number > 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GenerationDefaults:
        """The defaults with `values` (a "generation" entry) applied; unknown keys are refused."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = set(values) - set(allowed)
        if unknown:
            raise ValueError(f"unknown generation defaults {sorted(unknown)}; allowed {sorted(allowed)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.shift is None:
            del values["shift"]
        return values


@dataclass(frozen=True)
class BundleConfig:
    """model_config.json, read once: what to build, the clip format it was trained on, and how to sample."""

    dit: DiTConfig
    autoencoder: str  # spec: "pixel", "wan:/data/vae", ... (model/autoencoders.py)
    text_encoder: str  # spec: "minilm", "t5:/data/t5", ... (model/text_encoders.py)
    text_max_length: int  # prompt tokens kept: at most the DiT's text table (max_text_tokens)
    fps: float  # the trained clip format: the defaults of a request, the length of one window
    num_frames: int
    width: int
    height: int
    weights_dtype: str  # of weights.safetensors ("float32", "bfloat16"); loading may cast
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    reelforge_version: str = "unknown"
    format_version: int = BUNDLE_FORMAT_VERSION
    # Keys other writers add (training: config_hash, ema_decay, run id), kept verbatim so that
    # rewriting the file (relocate_bundle in model/pyfunc.py) loses none of them.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = (self.num_frames, self.width, self.height)
        if not _is_number(self.fps) or self.fps <= 0 or not all(isinstance(n, int) and n >= 1 for n in sizes):
            raise ValueError(
                f"bad clip format fps={self.fps} num_frames={self.num_frames} size={self.width}x{self.height}"
            )
        clash = sorted(set(self.extra) & BUNDLE_KEYS)
        if clash:
            raise ValueError(f"extra key {clash[0]!r} would overwrite a bundle field")

    @classmethod
    def from_json(cls, raw: Any, where: str) -> BundleConfig:
        """Parse a model_config.json object; ValueError starting with `where` (the file) otherwise."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version", BUNDLE_FORMAT_VERSION)
        if raw.get("format") != BUNDLE_FORMAT or not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION:
            raise ValueError(
                f"{where} is not a {BUNDLE_FORMAT} v<={BUNDLE_FORMAT_VERSION} config "
                f"(format={raw.get('format')!r}, version={raw.get('format_version')!r})"
            )
        missing = [name for name in _REQUIRED_KEYS if name not in raw]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(
                dit=DiTConfig(**raw["dit"]),
                autoencoder=str(raw["autoencoder"]),
                text_encoder=str(raw["text_encoder"]),
                text_max_length=raw["text_max_length"],
                fps=raw["fps"],
                num_frames=raw["num_frames"],
                width=raw["width"],
                height=raw["height"],
                weights_dtype=str(raw["weights_dtype"]),
                generation=GenerationDefaults.from_dict(raw.get("generation", {})),
                reelforge_version=str(raw.get("reelforge_version", "unknown")),
                format_version=version,
                extra={key: value for key, value in raw.items() if key not in BUNDLE_KEYS},
            )
        except (TypeError, ValueError) as exc:  # TypeError: DiTConfig got a field it does not have
            raise ValueError(f"{where}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        """The model_config.json object, in the order save_bundle has always written it."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": self.format_version,
            "reelforge_version": self.reelforge_version,
            "dit": dataclasses.asdict(self.dit),
            "autoencoder": self.autoencoder,
            "text_encoder": self.text_encoder,
            "text_max_length": self.text_max_length,
            "fps": self.fps,
            "num_frames": self.num_frames,
            "width": self.width,
            "height": self.height,
            "weights_dtype": self.weights_dtype,
            "generation": self.generation.to_dict(),
            **self.extra,
        }


# The keys model_config.json holds for BundleConfig's own fields; anything else is `extra`.
BUNDLE_KEYS = frozenset({"format"} | {f.name for f in dataclasses.fields(BundleConfig)} - {"extra"})
_REQUIRED_KEYS = [
    f.name
    for f in dataclasses.fields(BundleConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]


@dataclass
class Bundle:
    dit: DiT
    config: BundleConfig
    autoencoder: Autoencoder
    text_encoder: TextEncoder | None  # None in a geometry-only bundle (load_bundle_geometry)
    path: Path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    ae_spec = _spec_of(autoencoder, "autoencoder")
    text_spec = _spec_of(text_encoder, "text_encoder")
    kind, _ = parse_text_encoder_spec(text_spec)
    # Prompts longer than the DiT's text table cannot be attended to; the text encoder is told so at load.
    text_max_length = min(getattr(text_encoder, "max_length", DEFAULT_MAX_LENGTH[kind]), dit_cfg.max_text_tokens)
    extra = dict(extra or {})
    config = BundleConfig(
        dit=dit_cfg,
        autoencoder=ae_spec,
        text_encoder=text_spec,
        text_max_length=text_max_length,
        fps=float(fps),
        num_frames=int(num_frames),
        width=int(width),
        height=int(height),
        weights_dtype=str(next(iter(weights.values())).dtype).removeprefix("torch."),
        generation=GenerationDefaults.from_dict(extra.pop("generation", {})),
        reelforge_version=__version__,
        extra=extra,
    )

    from safetensors.torch import save_file

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    # Weights first, config last (both renamed into place): a reader never sees a half-written bundle.
    tmp_weights = bundle_dir / (WEIGHTS_FILE + ".tmp")
    save_file(weights, tmp_weights, metadata={"format": "pt"})
    os.replace(tmp_weights, bundle_dir / WEIGHTS_FILE)
    write_bundle_config(bundle_dir, config)
    logger.info("saved bundle %s (%d tensors, %s)", bundle_dir, len(weights), config.weights_dtype)
    return bundle_dir


def bundle_sha256(bundle_dir: str | Path) -> str:
    """sha256 over every file of a bundle (relative path and bytes, in path order): two bundles hash
    alike exactly when they would load alike. Registration tags versions with it, so the same
    weights registered twice are recognised."""
    return folder_sha256(bundle_dir)


def read_bundle_config(bundle_dir: str | Path) -> BundleConfig:
    """model_config.json of a bundle, parsed and checked; ValueError naming the file otherwise."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"not an inference bundle (no {CONFIG_FILE}): {str(bundle_dir)!r}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt {CONFIG_FILE} in {str(bundle_dir)!r}: {exc}") from exc
    return BundleConfig.from_json(raw, where=repr(str(path)))


def write_bundle_config(bundle_dir: str | Path, config: BundleConfig) -> Path:
    """Write model_config.json under a temporary name and rename it: the config marks a bundle complete."""
    path = Path(bundle_dir) / CONFIG_FILE
    tmp = path.with_name(CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config.to_json(), indent=2, default=str))
    os.replace(tmp, path)
    return path


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
    dit_cfg = config.dit

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

    autoencoder = load_autoencoder(config.autoencoder, device=device, dtype=dtype or torch.float32)
    text_encoder = load_text_encoder(config.text_encoder, device=device, max_length=config.text_max_length)
    if autoencoder.latent_channels != dit_cfg.in_channels:
        raise ValueError(
            f"bundle {str(bundle_dir)!r}: autoencoder {config.autoencoder!r} has {autoencoder.latent_channels} "
            f"latent channels, the DiT expects {dit_cfg.in_channels}"
        )
    if text_encoder.dim != dit_cfg.text_dim:
        raise ValueError(
            f"bundle {str(bundle_dir)!r}: text encoder {config.text_encoder!r} has width {text_encoder.dim}, "
            f"the DiT expects {dit_cfg.text_dim}"
        )
    logger.info("loaded bundle %s on %s", bundle_dir, device)
    return Bundle(dit=dit, config=config, autoencoder=autoencoder, text_encoder=text_encoder, path=bundle_dir)


def load_bundle_geometry(bundle_dir: str | Path) -> Bundle:
    """A bundle's config, DiT and autoencoder on the meta device, without reading any weights, and
    no text encoder: everything `VideoPipeline.check_request` and cost estimates need, in no memory.
    What a server's ingress loads to refuse a bad request before a generator sees it."""
    bundle_dir = Path(bundle_dir)
    config = read_bundle_config(bundle_dir)
    if not (bundle_dir / WEIGHTS_FILE).is_file():
        raise ValueError(f"bundle {str(bundle_dir)!r} has no {WEIGHTS_FILE}")
    with torch.device("meta"):
        dit = DiT(config.dit)
    autoencoder = load_autoencoder(config.autoencoder, device="meta")
    if autoencoder.latent_channels != config.dit.in_channels:
        raise ValueError(
            f"bundle {str(bundle_dir)!r}: autoencoder {config.autoencoder!r} has {autoencoder.latent_channels} "
            f"latent channels, the DiT expects {config.dit.in_channels}"
        )
    return Bundle(dit=dit.eval().requires_grad_(False), config=config, autoencoder=autoencoder, text_encoder=None, path=bundle_dir)
