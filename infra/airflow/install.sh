#!/usr/bin/env bash
# Install Apache Airflow 3 and reelforge's DAG code into a venv of their own:
#
#   infra/airflow/install.sh VENV_DIR          # e.g. infra/airflow/install.sh .venv-airflow (what the tests use)
#
# Airflow's pins conflict with the project venv's (Airflow core pins another FastAPI than MLflow
# brings), so Airflow never goes into .venv. Everything comes from infra/airflow/constraints.txt, a
# `pip freeze` of a resolved install kept in the repo (its first lines say how to regenerate it).
# reelforge itself goes in with --no-deps, editable from this checkout: the DAGs import only
# infra.airflow, infra.ray_jobs and model.storage, which need the standard library and pyarrow (for
# object storage) alone, no Ray and no torch; and the DAG folder (infra/airflow/dags) and the code it
# imports stay one checkout.
#
# Idempotent and safe to run from two processes at once (a test fixture and a CI step): the
# second waits on a lock in VENV_DIR, then finds the stamp of the finished install and exits.
# The stamp is keyed on constraints.txt and this script, so changing either reinstalls into the
# same venv (pip then moves each pin; nothing else in the venv is removed).
#
# Variables: PYTHON, the interpreter that makes the venv (default python3; the constraints were
# resolved for Python 3.11).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 VENV_DIR" >&2; exit 2; }
venv=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
here="$repo/infra/airflow"
version=$(sed -n 's/^apache-airflow==\(.*\)$/\1/p' "$here/constraints.txt")
if [ -z "$version" ]; then
  echo "$0: no apache-airflow==VERSION line in $here/constraints.txt" >&2
  exit 1
fi
stamp="$venv/.reelforge-airflow-$(cat "$here/constraints.txt" "$here/install.sh" | cksum | cut -d' ' -f1)"

mkdir -p "$venv"
exec 9>"$venv/.install.lock"
flock 9
if [ -f "$stamp" ]; then
  exit 0
fi
started=$(date +%s)
test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q "apache-airflow==$version" pyarrow -c "$here/constraints.txt"
"$venv/bin/python" -m pip install -q --no-deps -e "$repo"
# The DAG code must import with what this venv has (no Ray, no torch): a module of it that pulled one
# in would break every DAG at parse time, so check before stamping.
"$venv/bin/python" -c "import airflow.sdk, pyarrow.fs, infra.airflow.definitions, infra.airflow.tasks, infra.ray_jobs"
rm -f "$venv"/.reelforge-airflow-*
touch "$stamp"
echo "$0: Airflow $version and reelforge (editable, no deps) installed in $venv in $(( $(date +%s) - started )) s" >&2
