"""The one validated reelforge configuration.

Every command builds a `ReelforgeConfig` from embedded defaults, an optional YAML file
(`--config`) and repeated `--set dotted.key=value` overrides, and validates it before any
work starts. Sections are owned by the part that uses them (`pipelines.config`,
`training.config`); this module only composes them, parses overrides and reports errors
in one line that names the key.

    cfg = load_config("configs/train/tiny.yaml", ["train.max_steps=20"])
    cfg.train.max_steps  # 20
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.config import CaptionConfig, ClipsConfig, FiltersConfig, ScenesConfig, ShardsConfig
from training.config import (
    CheckpointSection,
    DeepSpeedSection,
    MlflowSection,
    ModelSection,
    RegistrySection,
    ScalingSection,
    TrainSection,
)

# configs/ at the root of a checkout; presets can be named instead of given as a path.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ReelforgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    scenes: ScenesConfig = ScenesConfig()
    clips: ClipsConfig = ClipsConfig()
    filters: FiltersConfig = FiltersConfig()
    shards: ShardsConfig = ShardsConfig()
    caption: CaptionConfig = CaptionConfig()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    registry: RegistrySection = RegistrySection()
    mlflow: MlflowSection = MlflowSection()


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the offending key."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ReelforgeConfig:
    """Defaults, then the YAML file at `path` (or a preset name under configs/), then `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(resolve_preset(path))
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(data, key, value)
    _check_keys(data, ReelforgeConfig, prefix="")
    try:
        return ReelforgeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def resolve_preset(path: str | Path) -> Path:
    """A YAML path as given, or a preset name such as `train/tiny` looked up under configs/."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for name in (str(path), f"{path}.yaml"):
        preset = CONFIGS_DIR / name
        if preset.is_file():
            return preset
    available = sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.yaml"))
    raise ConfigError(f"--config {path}: no such file or preset (presets: {', '.join(available) or 'none'})")


def config_hash(cfg: BaseModel) -> str:
    """A stable 16-hex-digit hash of the resolved config (key order and float spelling independent)."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: BaseModel) -> dict[str, Any]:
    """`{"train.lr": 1e-4, ...}`: the resolved config as dotted keys (MLflow params, reports)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(cfg.model_dump(mode="json"), "")
    return flat


# --- command-line helpers shared by every subcommand -------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file or preset name (e.g. train/tiny)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config key, e.g. --set train.max_steps=100 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> ReelforgeConfig:
    """Load and validate the config named by `--config/--set`; exit with one line on error."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None


# --- internals ---------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. train.max_steps=100")
    field_type = _field_type(key)
    # A field that takes text gets the text as typed (so a model name "7" stays "7");
    # everything else is read as a YAML scalar and then validated against the field's type.
    if field_type is not None and _accepts_str(field_type) and raw not in ("null", "~"):
        return key, raw
    try:
        return key, yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return key, raw


def _field_type(dotted: str) -> Any | None:
    model: type[BaseModel] = ReelforgeConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if i == len(parts) - 1:
            return field.annotation
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return None


def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_str(arg) for arg in typing.get_args(annotation))
    return False


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_all_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_keys(data: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
    """Unknown keys fail with the nearest valid key, which pydantic's own message lacks."""
    for key, value in data.items():
        field = model.model_fields.get(key)
        dotted = f"{prefix}{key}"
        if field is None:
            valid = _all_keys(model, prefix)
            # Match the whole dotted path the user typed, so a misspelled section
            # ("trian.max_steps") still finds its key ("train.max_steps").
            typed = dotted
            while isinstance(value, dict) and len(value) == 1:
                (child, value), = value.items()
                typed = f"{typed}.{child}"
            near = difflib.get_close_matches(typed, _all_keys(ReelforgeConfig), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"valid keys here: {', '.join(valid)}"
            raise ConfigError(f"{dotted}: unknown key; {hint}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: is a section; set its keys, e.g. {_all_keys(annotation, dotted + '.')[0]}=...")
            _check_keys(value, annotation, f"{dotted}.")


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "value_error" and loc and loc.split(".")[-1] in message:
            # a cross-field check already names its keys
            parts.append(message)
            continue
        given = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        parts.append(f"{loc}: {message}{given}" if loc else f"{message}{given}")
    return "; ".join(parts)
