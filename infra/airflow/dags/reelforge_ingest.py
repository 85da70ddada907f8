"""The reelforge_ingest DAG (docs/airflow.md); infra/airflow/definitions.py builds it."""

from infra.airflow.definitions import airflow_installed, ingest_dag

# tests/test_architecture.py imports this file in the project venv, which has no Airflow.
if airflow_installed():
    dag = ingest_dag()
