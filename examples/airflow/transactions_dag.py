"""Daily medallion run of the reference pipeline, scheduled by Airflow.

Each daily run processes its logical date (`--date {{ ds }}`): the DMS files delivered by that day are
ingested and the Gold rows their changes touch are recomputed. A retried task is safe: medallion skips
files already landed and changes already applied. Backfill with Airflow's own command:

    airflow dags backfill medallion_transactions --start-date 2019-10-01 --end-date 2019-10-31

or with medallion directly (resumable, skips finished dates):

    medallion backfill pipelines/transactions.yaml --from 2019-10-01 --to 2019-10-31

Exit codes: 0 success; 1 a stage failed or a check blocked a publish (Airflow retries, then fails the
task); 2 invalid pipeline (fix the YAML); 3 runtime error (storage, I/O); 4 another run of the pipeline
holds the lock (the retry waits for it).
"""

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

MEDALLION = os.environ.get("MEDALLION_BIN", "medallion")
PROJECT = os.environ.get("MEDALLION_PROJECT", "/opt/medallion")

with DAG(
    dag_id="medallion_transactions",
    description="Bronze -> Silver -> Gold for the card transactions replicated by AWS DMS",
    schedule="@daily",
    start_date=datetime(2019, 10, 1),
    catchup=False,
    max_active_runs=1,  # medallion also holds a run lock per pipeline
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
    tags=["medallion"],
) as dag:
    BashOperator(
        task_id="run",
        cwd=PROJECT,
        bash_command=(
            f"{MEDALLION} run pipelines/transactions.yaml --date {{{{ ds }}}} "
            "--lock-timeout 600 --log-format json"
        ),
    )
