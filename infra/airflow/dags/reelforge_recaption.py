"""The reelforge_recaption DAG (docs/airflow.md); infra/airflow/definitions.py builds it."""

from infra.airflow.definitions import airflow_installed, recaption_dag

# tests/test_architecture.py imports this file in the project venv, which has no Airflow.
if airflow_installed():
    dag = recaption_dag()
