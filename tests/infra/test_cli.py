"""The `reelforge` command line, run as a real subprocess through the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml

from infra import __version__
from infra.config import load_config
from model.storage import config_hash


def reelforge(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("reelforge", path=str(__import__("pathlib").Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "infra.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def test_version_and_help():
    version = reelforge("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"reelforge {__version__}"
    help_text = reelforge("--help")
    assert help_text.returncode == 0
    assert "config" in help_text.stdout


def test_config_show_prints_the_resolved_config_and_its_hash():
    result = reelforge("config", "show", "--config", "ingest/demo", "--set", "train.max_steps=42")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["max_steps"] == 42
    assert shown["clips"]["size"] == "64x64"
    expected = config_hash(load_config("ingest/demo", ["train.max_steps=42"]))
    assert result.stdout.startswith(f"# config hash: {expected}\n")


def test_bad_config_fails_in_one_line_naming_the_key():
    result = reelforge("config", "show", "--set", "clips.fsp=8")
    assert result.returncode != 0
    assert result.stderr.strip() == "config error: clips.fsp: unknown key; did you mean clips.fps?"


def test_unknown_command_is_refused():
    result = reelforge("frobnicate")
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr
