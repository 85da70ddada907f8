"""reelforge's Apache Airflow 3 DAGs (docs/airflow.md).

    dags/          the DAG files an Airflow deployment loads: reelforge_ingest, reelforge_recaption, reelforge_train
    definitions    the DAGs themselves, built with `airflow.sdk` (imported inside its functions only)
    tasks          what each task does: find a batch, run a job, write the batch record
    batches        the landing folder, batch ids, pending batches and batch records
    locations      the folders: a local path or an object-store prefix, through pyarrow.fs
    jobs           a Ray job run once per submission id: submit, or re-attach, then follow it to its end
    settings       the DAGs' environment variables, read and checked in one place
    install.sh     the Airflow venv (Airflow from constraints.txt, reelforge with --no-deps)

Everything but `definitions`' DAG builders needs the standard library and pyarrow alone (pyarrow only
when a task touches storage, not when a DAG file is parsed): it runs in Airflow's own venv, which has
no Ray and no torch, and it is unit tested in the project venv, which has no Airflow.
"""
