"""Python `deltalake`: delta-rs for everything, the same Rust core as medallion. pyarrow reads the CSV,
delta-rs's own DataFusion (`QueryBuilder`) runs the SQL, `merge` applies changes, `write_deltalake`
appends and overwrites. See common.py for the contract."""

from __future__ import annotations

import datetime as dt
import os
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
from deltalake import DeltaTable, QueryBuilder, write_deltalake

from common import ERRORS_PATTERN, GOLD, SILVER_COLUMNS, TXN_COLUMNS, Peer

TYPED = f"""
SELECT {", ".join(SILVER_COLUMNS)}, _op FROM (
    SELECT *, row_number() OVER (PARTITION BY dms_id ORDER BY _commit_ts DESC, _file_order DESC, _source_row DESC) AS _rank
    FROM (
        SELECT
            TRY_CAST(id AS BIGINT)                                      AS dms_id,
            TRY_CAST(date AS TIMESTAMP)                                 AS txn_ts,
            CAST(TRY_CAST(date AS TIMESTAMP) AS DATE)                   AS txn_date,
            TRY_CAST(client_id AS BIGINT)                               AS client_id,
            TRY_CAST(card_id AS BIGINT)                                 AS card_id,
            TRY_CAST(replace(replace(trim(amount), '$', ''), ',', '') AS DECIMAL(18, 2)) AS amount,
            CASE trim(use_chip) WHEN 'Swipe Transaction' THEN 'SWIPE' WHEN 'Chip Transaction' THEN 'CHIP'
                                WHEN 'Online Transaction' THEN 'ONLINE' END AS channel,
            TRY_CAST(merchant_id AS BIGINT)                             AS merchant_id,
            NULLIF(trim(merchant_city), '')                             AS merchant_city,
            NULLIF(trim(merchant_state), '')                            AS merchant_state,
            CASE WHEN regexp_like(regexp_replace(trim(zip), '\\.0*$', ''), '^[0-9]{{1,5}}$')
                 THEN lpad(regexp_replace(trim(zip), '\\.0*$', ''), 5, '0') END AS zip,
            TRY_CAST(mcc AS INT)                                        AS mcc,
            NULLIF(trim(errors), '')                                    AS errors,
            TRY_CAST(replace(replace(trim(amount), '$', ''), ',', '') AS DECIMAL(18, 2)) < 0 AS is_refund,
            CASE WHEN abs(TRY_CAST(replace(replace(trim(amount), '$', ''), ',', '') AS DECIMAL(18, 2))) >= 1000 THEN 'high_value'
                 WHEN abs(TRY_CAST(replace(replace(trim(amount), '$', ''), ',', '') AS DECIMAL(18, 2))) >= 100 THEN 'medium_value'
                 ELSE 'standard' END                                    AS amount_category,
            TRY_CAST(dms_commit_ts AS TIMESTAMP)                        AS _commit_ts,
            _source_file, _file_order, _source_row,
            COALESCE("Op", 'I')                                         AS _op
        FROM bronze WHERE _run_id = '{{run_id}}'
    ) typed
    WHERE dms_id IS NOT NULL AND (_op = 'D' OR (amount IS NOT NULL AND txn_ts IS NOT NULL AND channel IS NOT NULL
          AND (errors IS NULL OR regexp_like(errors, '{ERRORS_PATTERN}'))))
) ranked
WHERE _rank = 1
"""

def plain(table: pa.Table) -> pa.Table:
    """DataFusion answers with string views, which pyarrow's compute functions mostly do not take."""
    fields = [f.with_type(pa.string()) if f.type == pa.string_view() else f for f in table.schema]
    return table.cast(pa.schema(fields))


def ingest(peer: Peer) -> set | None:
    files = peer.new_files()
    if not files:
        return set()
    bronze_path = str(peer.table("bronze/transactions"))
    now = pa.scalar(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), pa.timestamp("us"))
    for order, path in files:
        table = csv.read_csv(path, convert_options=csv.ConvertOptions(column_types={c: pa.string() for c in ["Op", "dms_commit_ts", *TXN_COLUMNS]}, strings_can_be_null=True))
        if "Op" not in table.column_names:
            table = table.add_column(0, "Op", pa.nulls(len(table), pa.string()))
        rows = len(table)
        table = (
            table.append_column("_source_file", pa.array([path.name] * rows, pa.string()))
            .append_column("_source_row", pa.array(range(1, rows + 1), pa.int64()))
            .append_column("_file_order", pa.array([order] * rows, pa.int64()))
            .append_column("_ingested_at", pa.array([now] * rows, pa.timestamp("us")))
            .append_column("_run_id", pa.array([peer.run_id] * rows, pa.string()))
        )
        write_deltalake(bronze_path, table, mode="append")
        del table
    bronze = DeltaTable(bronze_path)
    changes = plain(pa.table(QueryBuilder().register("bronze", bronze).execute(TYPED.replace("{run_id}", peer.run_id)).read_all()))
    silver_path = peer.table("silver/transactions")
    if not (silver_path / "_delta_log").exists():
        inserts = changes.filter(pc.not_equal(changes["_op"], "D")).drop_columns(["_op"])
        write_deltalake(str(silver_path), inserts, mode="overwrite")
        peer.mark_ingested(files)
        return None
    silver = DeltaTable(str(silver_path))
    keys = pc.unique(changes["dms_id"])
    before = silver.to_pyarrow_dataset().to_table(columns=["txn_date"], filter=pc.field("dms_id").isin(keys))
    live = changes.filter(pc.not_equal(changes["_op"], "D"))
    touched = set(pc.unique(before["txn_date"]).to_pylist()) | set(pc.unique(live["txn_date"]).to_pylist())
    newer = "s._commit_ts >= t._commit_ts"
    values = {name: f"s.{name}" for name in SILVER_COLUMNS}
    (
        silver.merge(changes, predicate="t.dms_id = s.dms_id", source_alias="s", target_alias="t")
        .when_matched_delete(predicate=f"s._op = 'D' AND {newer}")
        .when_matched_update(updates=values, predicate=f"s._op <> 'D' AND {newer}")
        .when_not_matched_insert(updates=values, predicate="s._op <> 'D'")
        .execute()
    )
    peer.mark_ingested(files)
    return touched


def gold(peer: Peer, dates: set | None) -> None:
    where, predicate = "", None
    if dates is not None:
        if not dates:
            return
        listed = ", ".join(f"CAST('{d.isoformat()}' AS DATE)" for d in sorted(dates))
        where = f"WHERE txn_date IN ({listed})"
        predicate = "txn_date IN (" + ", ".join(f"'{d.isoformat()}'" for d in sorted(dates)) + ")"
    silver = DeltaTable(str(peer.table("silver/transactions")))
    for name, query in GOLD.items():
        result = QueryBuilder().register("silver", silver).execute(query.format(source=f"silver {where}"))
        target = peer.table(f"gold/{name}")
        partition = ["txn_year"] if name == "fact_transactions" else None
        exists = (target / "_delta_log").exists()
        write_deltalake(
            str(target), result, mode="overwrite", partition_by=partition,
            predicate=predicate if exists else None,
        )


def main() -> None:
    peer = Peer()
    if peer.stages == "ingest":
        ingest(peer)
    elif peer.stages == "gold":
        gold(peer, None)
    else:
        touched = ingest(peer)
        has_gold = (peer.table("gold/daily_kpis") / "_delta_log").exists()
        gold(peer, touched if has_gold else None)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
