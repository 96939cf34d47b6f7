"""DuckDB: SQL over the same files, writing plain Parquet (DuckDB cannot write Delta). Bronze appends one
Parquet file per run; Silver and Gold are rewritten into a new folder that replaces the old one, which is
how a DuckDB user applies changes without a table format. See common.py for the contract."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import duckdb

from common import ERRORS_PATTERN, GOLD, SILVER_COLUMNS, SILVER_SELECT, Peer

TYPED = f"""
SELECT * FROM (
    SELECT
        TRY_CAST(id AS BIGINT)                                      AS dms_id,
        TRY_STRPTIME(date, '%Y-%m-%d %H:%M:%S')                     AS txn_ts,
        CAST(TRY_STRPTIME(date, '%Y-%m-%d %H:%M:%S') AS DATE)       AS txn_date,
        TRY_CAST(client_id AS BIGINT)                               AS client_id,
        TRY_CAST(card_id AS BIGINT)                                 AS card_id,
        TRY_CAST(replace(replace(trim(amount), '$', ''), ',', '') AS DECIMAL(18, 2)) AS amount,
        CASE trim(use_chip) WHEN 'Swipe Transaction' THEN 'SWIPE' WHEN 'Chip Transaction' THEN 'CHIP'
                            WHEN 'Online Transaction' THEN 'ONLINE' END AS channel,
        TRY_CAST(merchant_id AS BIGINT)                             AS merchant_id,
        NULLIF(trim(merchant_city), '')                             AS merchant_city,
        NULLIF(trim(merchant_state), '')                            AS merchant_state,
        CASE WHEN regexp_matches(regexp_replace(trim(zip), '\\.0*$', ''), '^[0-9]{{1,5}}$')
             THEN lpad(regexp_replace(trim(zip), '\\.0*$', ''), 5, '0') END AS zip,
        TRY_CAST(mcc AS INT)                                        AS mcc,
        NULLIF(trim(errors), '')                                    AS errors,
        TRY_STRPTIME(dms_commit_ts, '%Y-%m-%d %H:%M:%S.%f')         AS _commit_ts,
        _source_file, _file_order, _source_row,
        COALESCE(Op, 'I')                                           AS _op
    FROM bronze_new
)
WHERE dms_id IS NOT NULL AND (_op = 'D' OR (amount IS NOT NULL AND txn_ts IS NOT NULL AND channel IS NOT NULL
      AND (errors IS NULL OR regexp_matches(errors, '{ERRORS_PATTERN}'))))
QUALIFY row_number() OVER (PARTITION BY dms_id ORDER BY _commit_ts DESC, _file_order DESC, _source_row DESC) = 1
"""

def parquet(path: Path) -> str:
    return f"read_parquet('{path}/**/*.parquet', hive_partitioning = true)"


def replace(folder: Path, build) -> None:
    """Writes the new version of a table next to it, then swaps it in."""
    fresh = folder.with_name(folder.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    build(fresh)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def ingest(peer: Peer, db) -> bool | None:
    """Bronze + Silver; True when Silver changed, None when it was created."""
    files = peer.new_files()
    if not files:
        return False
    bronze_dir = peer.table("bronze/transactions")
    bronze_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for order, path in files:
        columns = db.execute(f"DESCRIBE SELECT * FROM read_csv('{path}', all_varchar = true)").fetchall()
        has_op = any(name == "Op" for name, *_ in columns)
        op = "" if has_op else "CAST(NULL AS VARCHAR) AS Op, "
        parts.append(
            f"SELECT {op}*, '{path.name}' AS _source_file, CAST({order} AS BIGINT) AS _file_order, "
            f"row_number() OVER () AS _source_row, now() AS _ingested_at, '{peer.run_id}' AS _run_id "
            f"FROM read_csv('{path}', all_varchar = true)"
        )
    bronze_file = bronze_dir / f"part-{peer.run_id}.parquet"
    db.execute(f"COPY ({' UNION ALL BY NAME '.join(parts)}) TO '{bronze_file}' (FORMAT parquet)")
    db.execute(f"CREATE OR REPLACE VIEW bronze_new AS SELECT * FROM read_parquet('{bronze_file}')")
    db.execute(f"CREATE OR REPLACE TEMP TABLE changes AS {TYPED}")
    silver = peer.table("silver/transactions")
    if not silver.exists():
        silver.mkdir(parents=True)
        db.execute(f"COPY (SELECT {SILVER_SELECT} FROM changes WHERE _op <> 'D') TO '{silver}/part-0.parquet' (FORMAT parquet)")
        peer.mark_ingested(files)
        return None
    db.execute(f"CREATE OR REPLACE TEMP TABLE old AS SELECT * FROM {parquet(silver)}")
    db.execute(
        "CREATE OR REPLACE TEMP TABLE touched AS "
        "SELECT DISTINCT o.txn_date FROM old o JOIN changes c USING (dms_id) "
        "UNION SELECT DISTINCT txn_date FROM changes WHERE _op <> 'D'"
    )
    newest = f"""
        SELECT o.* FROM old o ANTI JOIN changes c ON o.dms_id = c.dms_id AND c._commit_ts >= o._commit_ts
        UNION ALL BY NAME
        SELECT {SILVER_SELECT} FROM changes c
        WHERE c._op <> 'D' AND NOT EXISTS (SELECT 1 FROM old o WHERE o.dms_id = c.dms_id AND o._commit_ts > c._commit_ts)
    """
    replace(silver, lambda fresh: (fresh.mkdir(parents=True), db.execute(f"COPY ({newest}) TO '{fresh}/part-0.parquet' (FORMAT parquet)")))
    db.execute("DROP TABLE old")
    peer.mark_ingested(files)
    return True


def gold(peer: Peer, db, incremental: bool) -> None:
    silver = peer.table("silver/transactions")
    scope = f"SELECT * FROM {parquet(silver)}"
    if incremental:
        scope += " WHERE txn_date IN (SELECT txn_date FROM touched)"
    db.execute(f"CREATE OR REPLACE TEMP TABLE silver_scope AS {scope}")
    for name, query in GOLD.items():
        query = query.format(source="silver_scope")
        folder = peer.table(f"gold/{name}")
        if incremental:
            kept = f"SELECT * FROM {parquet(folder)} WHERE txn_date NOT IN (SELECT txn_date FROM touched)"
            query = f"{kept} UNION ALL BY NAME {query}"
        partition = ", PARTITION_BY (txn_year)" if name == "fact_transactions" else ""
        target = lambda fresh: f"{fresh}" if partition else f"{fresh}/part-0.parquet"

        def build(fresh: Path, query=query, partition=partition, target=target) -> None:
            fresh.mkdir(parents=True)
            db.execute(f"COPY ({query}) TO '{target(fresh)}' (FORMAT parquet{partition}{', OVERWRITE_OR_IGNORE' if partition else ''})")

        replace(folder, build)


def main() -> None:
    peer = Peer()
    db = duckdb.connect()
    db.execute(f"SET temp_directory = '{peer.out / '_duckdb_tmp'}'")
    if peer.memory_cap:
        db.execute(f"SET memory_limit = '{int(peer.memory_cap * 0.75) // 2**20}MB'")
    if peer.stages == "ingest":
        ingest(peer, db)
    elif peer.stages == "gold":
        gold(peer, db, incremental=False)
    else:
        changed = ingest(peer, db)
        has_gold = peer.table("gold/daily_kpis").exists()
        if changed is None or not has_gold:
            gold(peer, db, incremental=False)
        elif changed:
            gold(peer, db, incremental=True)
    db.close()
    shutil.rmtree(peer.out / "_duckdb_tmp", ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
