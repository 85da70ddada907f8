#!/usr/bin/env bash
# Install reelforge and its pinned dependencies into one Python environment. The one install
# recipe: `make setup` runs it for the project venv, infra/image/Dockerfile for the image's python.
#
#   infra/image/install.sh --venv .venv --dev     # make setup: a venv (made with $PYTHON if missing), plus test tools
#   infra/image/install.sh --python python        # the container image: into that interpreter's environment
#
# The checkout is installed in editable mode in both, so configs/ (presets found next to infra/)
# stays where `--config train/tiny` looks for it.
#
# Variables:
#   PYTHON            the interpreter that makes the venv for --venv (default: python3)
#   TORCH_INDEX_URL   the package index torch is taken from (default: empty, PyPI or your index).
#                     torch goes in first, pinned as pyproject.toml pins it, so that nothing after it
#                     (deepspeed, diffusers) pulls another build. Set it to choose the build:
#                     PyTorch's CPU index for a CPU-only install, or PyTorch's index for your CUDA
#                     version in a GPU image. Plain PyPI's Linux torch wheel is a CUDA build (GBs).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS   honoured as pip would (passed on to uv).
#
# The installer is uv (pinned below), run from the target environment: it resolves, downloads and
# unpacks in parallel, which took a fresh install from 3 min 40 s with pip to under a minute on a
# 2-core machine (torch's wheel alone: 61 s with pip, 7 s with uv).
set -euo pipefail
cd "$(dirname "$0")/../.."

usage() { echo "usage: $0 (--venv DIR | --python PYTHON) [--dev]" >&2; exit 2; }
venv="" python="" extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || usage; venv="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || usage; python="$2"; shift 2 ;;
    --dev) extras="[dev]"; shift ;;
    *) usage ;;
  esac
done
if [ -n "$venv" ] && [ -z "$python" ]; then
  test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
  python="$venv/bin/python"
elif [ -z "$python" ] || [ -n "$venv" ]; then
  usage
fi

# The torch pin is pyproject.toml's, so a version bump is one edit.
torch_pin=$(sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
if [ -z "$torch_pin" ]; then
  echo "$0: no \"torch==VERSION\" pin in pyproject.toml's dependencies" >&2
  exit 1
fi

UV_VERSION=0.13.9
"$python" -m pip install -q "uv==$UV_VERSION"
# uv reads UV_* settings, not pip's: hand it the ones this machine (or a mirror) sets for pip.
index=()
[ -z "${PIP_INDEX_URL:-}" ] || index+=(--index-url "$PIP_INDEX_URL")
[ -z "${PIP_EXTRA_INDEX_URL:-}" ] || index+=(--extra-index-url "$PIP_EXTRA_INDEX_URL")
[ -z "${PIP_FIND_LINKS:-}" ] || index+=(--find-links "$PIP_FIND_LINKS")
# --compile-bytecode: pip writes .pyc files at install and uv does not by default; where
# PYTHONDONTWRITEBYTECODE is set (this machine), every process would compile its imports again:
# a Ray worker or a fresh interpreter started 2-3x slower.
uv() { "$python" -m uv pip install --quiet --compile-bytecode --python "$python" "$@"; }
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  uv "$torch_pin" --index-url "$TORCH_INDEX_URL"
else
  uv "$torch_pin" "${index[@]}"
fi
uv -e ".$extras" "${index[@]}"
