#!/usr/bin/env bash
# Creates a Python environment with Apache Airflow for the opt-in DAG test (MEDALLION_AIRFLOW_TEST=1).
# Airflow is large (a few minutes to install), so CI does not run it by default. Prints the interpreter.
set -euo pipefail
venv="${MEDALLION_AIRFLOW_VENV:-$HOME/.cache/medallion/airflow-venv}"
version="2.10.5"
if [[ ! -x "$venv/bin/airflow" ]]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "apache-airflow==$version" \
        --constraint "https://raw.githubusercontent.com/apache/airflow/constraints-$version/constraints-3.11.txt" >&2 \
    || "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "apache-airflow==$version" >&2
fi
echo "$venv/bin/python"
