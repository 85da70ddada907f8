"""The validated config: defaults, presets, --set typing, and every error path naming its key."""

from __future__ import annotations

import pytest

from infra.config import ConfigError, ReelforgeConfig, load_config, resolve_preset, to_yaml
from model.conditioning import ConditioningProbs
from model.storage import config_hash
from pipelines.config import IngestConfig
from training.config import TrainingConfig


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    assert cfg == ReelforgeConfig()
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_set_parses_values_to_the_field_type():
    cfg = load_config(
        overrides=[
            "train.max_steps=20",
            "train.lr=3e-4",
            "scaling.use_gpu=true",
            "deepspeed.zero_stage=2",
            "clips.fps=12.5",
            "registry.model_name=7",
            "caption.endpoint=http://127.0.0.1:8000/v1",
        ]
    )
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.scaling.use_gpu is True
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.clips.fps == 12.5
    # a text field keeps the text as typed, even when it looks like a number
    assert cfg.registry.model_name == "7"
    assert cfg.caption.endpoint == "http://127.0.0.1:8000/v1"


def test_set_null_clears_an_optional_field():
    cfg = load_config(overrides=["scenes.threshold=30", "scenes.threshold=null"])
    assert cfg.scenes.threshold is None


def test_set_overrides_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n  batch_size: 3\n")
    cfg = load_config(path, ["train.max_steps=9"])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (9, 3)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["scenes.treshold=3"], "scenes.treshold: unknown key; did you mean scenes.threshold?"),
        (["trian.max_steps=3"], "trian: unknown key; did you mean train.max_steps?"),
        (["train.max_steps=many"], "train.max_steps: Input should be a valid integer"),
        (["train.max_steps=0"], "train.max_steps: Input should be greater than or equal to 1"),
        (["scenes.detector=histogram"], "scenes.detector: Input should be 'content', 'adaptive' or 'threshold'"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        (["clips.size=256"], "clips.size must look like WIDTHxHEIGHT"),
        (["clips.size=255x256"], "clips.size '255x256': width and height must be even"),
        (["clips.min_seconds=20"], "clips.min_seconds (20.0) must not exceed clips.max_seconds (10.0)"),
        (["scaling.use_gpu=maybe"], "scaling.use_gpu: Input should be a valid boolean"),
        (["train=3"], "train: is a section; set its keys"),
        (["train.max_steps=3", "train.max_steps.x=3"], "--set train.max_steps.x: max_steps is a value, not a section"),
        (["max_steps"], "--set 'max_steps': expected KEY=VALUE"),
        (["train.conditioning.frist_k=0.1"], "train.conditioning.frist_k: unknown key; did you mean train.conditioning.first_k?"),
        (["train.conditioning.first_k=2"], "train.conditioning: ConditioningProbs.first_k=2.0 must be in [0, 1]"),
        (["train.conditioning.first_frame=0.6", "train.conditioning.first_k=0.6"], "train.conditioning: conditioning probabilities sum to 1.3"),
    ],
)
def test_every_error_is_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_in_a_file_is_caught_before_anything_runs(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("clips:\n  max_second: 4\n")
    with pytest.raises(ConfigError, match=r"clips.max_second: unknown key; did you mean clips.max_seconds\?"):
        load_config(path)


def test_bad_yaml_and_non_mapping_files_are_reported(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)


def test_presets_load_by_path_and_by_name():
    by_name = load_config("ingest/demo")
    by_path = load_config(resolve_preset("ingest/demo"))
    assert by_name == by_path
    assert by_name.clips.size == "64x64"
    with pytest.raises(ConfigError, match="no such file or preset .*ingest/demo"):
        load_config("ingest/nope")


def test_every_shipped_preset_validates():
    from infra.config import CONFIGS_DIR

    presets = sorted(CONFIGS_DIR.rglob("*.yaml"))
    assert presets, "configs/ has no presets"
    for path in presets:
        load_config(path)


def test_hash_is_stable_and_tracks_content():
    a = load_config(overrides=["train.lr=0.0001", "train.max_steps=10"])
    b = load_config(overrides=["train.max_steps=10", "train.lr=1e-4"])
    c = load_config(overrides=["train.max_steps=11"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    assert len(config_hash(a)) == 16


def test_groups_are_what_each_part_takes_and_cover_every_section():
    cfg = load_config(overrides=["clips.fps=12", "train.max_steps=7", "train.conditioning.max_k=2"])
    ingest, training = cfg.ingest(), cfg.training()
    assert type(ingest) is IngestConfig and type(training) is TrainingConfig
    assert ingest.clips.fps == 12 and training.train.max_steps == 7
    assert training.train.conditioning == ConditioningProbs(max_k=2)
    # every section belongs to exactly one group, so nothing the command line sets is lost
    assert set(IngestConfig.model_fields).isdisjoint(TrainingConfig.model_fields)
    assert set(ReelforgeConfig.model_fields) == set(IngestConfig.model_fields) | set(TrainingConfig.model_fields)
    # a group travels as plain data (Ray ships it to workers) and validates back to itself
    assert TrainingConfig.model_validate(training.model_dump(mode="json")) == training
