"""The one validated reelforge configuration.

Every command builds a `ReelforgeConfig` from embedded defaults, an optional YAML file
(`--config`) and repeated `--set dotted.key=value` overrides, and validates it before any
work starts. Each part owns its config group (`pipelines.config.IngestConfig`,
`training.config.TrainingConfig`) and its entry functions take that group; this module only
composes the groups, parses overrides and reports errors in one line that names the key.

    cfg = load_config("configs/train/tiny.yaml", ["train.max_steps=20"])
    cfg.train.max_steps      # 20
    cfg.training()           # the TrainingConfig that training.train.train() takes
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.config import IngestConfig
from training.config import TrainingConfig

# configs/ at the root of a checkout; presets can be named instead of given as a path.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ReelforgeConfig(TrainingConfig, IngestConfig):
    """Every section of every part, side by side: `--set clips.fps=8` and `--set train.lr=1e-4` edit
    one tree. Training is listed first because pydantic orders inherited fields from the last base
    to the first, so `config show` prints the ingest sections first."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def ingest(self) -> IngestConfig:
        """The ingest group alone, as `pipelines.ingest.run_ingest` takes it."""
        return IngestConfig(**{name: getattr(self, name) for name in IngestConfig.model_fields})

    def training(self) -> TrainingConfig:
        """The training group alone, as `training.train.train` and the worker loop take it."""
        return TrainingConfig(**{name: getattr(self, name) for name in TrainingConfig.model_fields})


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


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


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


def _fields(section: Any) -> dict[str, Any] | None:
    """{key: annotation} of a section (a pydantic model or a dataclass such as ConditioningProbs),
    or None when `section` is a plain value type."""
    if isinstance(section, type) and issubclass(section, BaseModel):
        return {name: field.annotation for name, field in section.model_fields.items()}
    if isinstance(section, type) and dataclasses.is_dataclass(section):
        hints = typing.get_type_hints(section)
        return {field.name: hints[field.name] for field in dataclasses.fields(section)}
    return None


def _field_type(dotted: str) -> Any | None:
    fields = _fields(ReelforgeConfig)
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if fields is None or part not in fields:
            return None
        if i == len(parts) - 1:
            return fields[part]
        fields = _fields(fields[part])
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


def _all_keys(section: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, annotation in (_fields(section) or {}).items():
        if _fields(annotation) is not None:
            keys.extend(_all_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_keys(data: dict[str, Any], section: Any, prefix: str) -> None:
    """Unknown keys fail with the nearest valid key, which pydantic's own message lacks."""
    fields = _fields(section) or {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = _all_keys(section, prefix)
            # Match the whole dotted path the user typed, so a misspelled section
            # ("trian.max_steps") still finds its key ("train.max_steps").
            typed = dotted
            while isinstance(value, dict) and len(value) == 1:
                (child, value), = value.items()
                typed = f"{typed}.{child}"
            near = difflib.get_close_matches(typed, _all_keys(ReelforgeConfig), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"valid keys here: {', '.join(valid)}"
            raise ConfigError(f"{dotted}: unknown key; {hint}")
        annotation = fields[key]
        if _fields(annotation) is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: is a section; set its keys, e.g. {_all_keys(annotation, dotted + '.')[0]}=...")
            _check_keys(value, annotation, f"{dotted}.")


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "value_error" and loc and loc in message:
            # a cross-field check already names its keys
            parts.append(message)
            continue
        given = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        parts.append(f"{loc}: {message}{given}" if loc else f"{message}{given}")
    return "; ".join(parts)
