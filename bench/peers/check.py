"""Facts about an engine's tables that must equal medallion's: row counts and exact sums.

`check.py <lake>` prints them as JSON. Tables are read as Delta (python deltalake) when they have a
`_delta_log`, else as the Parquet files under them (the DuckDB and Spark peers write plain Parquet).
"""

import json
import os
import sys
from pathlib import Path

import duckdb
from deltalake import DeltaTable, QueryBuilder

QUERIES = {
    "bronze/transactions": "SELECT COUNT(*) AS rows FROM t",
    "silver/transactions": """
        SELECT COUNT(*) AS rows, COUNT(DISTINCT dms_id) AS keys, SUM(dms_id) AS sum_dms_id,
               SUM(amount) AS sum_amount, COUNT(zip) AS zips, COUNT(merchant_state) AS states,
               COUNT(errors) AS errors, SUM(mcc) AS sum_mcc, COUNT(*) FILTER (WHERE is_refund) AS refunds,
               COUNT(*) FILTER (WHERE channel = 'ONLINE') AS online,
               COUNT(*) FILTER (WHERE amount_category = 'high_value') AS high_value,
               SUM(epoch_us(txn_ts)::HUGEINT) AS sum_txn_ts, SUM(epoch_us(_commit_ts)::HUGEINT) AS sum_commit_ts,
               COUNT(DISTINCT txn_date) AS dates
        FROM t""",
    "gold/daily_kpis": """
        SELECT COUNT(*) AS rows, SUM(txn_count) AS txn_count, SUM(total_amount) AS total_amount,
               SUM(refund_count) AS refund_count, SUM(refund_amount) AS refund_amount,
               SUM(error_count) AS error_count, SUM(online_count) AS online_count,
               SUM(distinct_cards) AS distinct_cards
        FROM t""",
    "gold/merchant_daily": """
        SELECT COUNT(*) AS rows, SUM(txn_count) AS txn_count, SUM(total_amount) AS total_amount,
               SUM(merchant_id) AS sum_merchant_id
        FROM t""",
    "gold/fact_transactions": """
        SELECT COUNT(*) AS rows, SUM(transaction_id) AS sum_id, SUM(amount) AS sum_amount,
               SUM(txn_year) AS sum_year, COUNT(*) FILTER (WHERE has_errors) AS with_errors,
               SUM(user_id) AS sum_user_id
        FROM t""",
}


def main() -> None:
    lake = Path(sys.argv[1])
    db = duckdb.connect()
    facts = {}
    for table, query in QUERIES.items():
        path = lake / table
        if (path / "_delta_log").is_dir():
            table_ = DeltaTable(str(path))
            if "deletionVectors" in (table_.protocol().reader_features or []):
                # The pyarrow dataset refuses deletion vectors; delta-rs's own query engine applies them.
                db.register("t", QueryBuilder().register("t", table_).execute("SELECT * FROM t").read_all())
            else:
                db.register("t", table_.to_pyarrow_dataset())
        else:
            db.execute(
                f"CREATE OR REPLACE VIEW t AS SELECT * FROM read_parquet('{path}/**/*.parquet', "
                "hive_partitioning = true, union_by_name = true)"
            )
        row = db.execute(query).fetchone()
        names = [d[0] for d in db.description]
        for name, value in zip(names, row):
            facts[f"{table}.{name}"] = str(value)
        try:
            db.unregister("t")
        except Exception:
            db.execute("DROP VIEW IF EXISTS t")
    print(json.dumps(facts, indent=1))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
