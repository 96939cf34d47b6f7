"""PySpark in local mode writing Parquet (no Delta jars need fetching): the tool the others replace. Bronze
appends, Silver and Gold are rewritten into a new folder that replaces the old one. See common.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from common import ERRORS_PATTERN, GOLD, SILVER_COLUMNS, SILVER_SELECT, Peer

TYPED = f"""
SELECT * FROM (
    SELECT *, row_number() OVER (PARTITION BY dms_id ORDER BY _commit_ts DESC, _file_order DESC, _source_row DESC) AS _rank
    FROM (
        SELECT
            TRY_CAST(id AS BIGINT)                                      AS dms_id,
            to_timestamp_ntz(date, 'yyyy-MM-dd HH:mm:ss')               AS txn_ts,
            CAST(to_timestamp_ntz(date, 'yyyy-MM-dd HH:mm:ss') AS DATE) AS txn_date,
            TRY_CAST(client_id AS BIGINT)                               AS client_id,
            TRY_CAST(card_id AS BIGINT)                                 AS card_id,
            TRY_CAST(replace(replace(trim(amount), '$', ''), ',', '') AS DECIMAL(18, 2)) AS amount,
            CASE trim(use_chip) WHEN 'Swipe Transaction' THEN 'SWIPE' WHEN 'Chip Transaction' THEN 'CHIP'
                                WHEN 'Online Transaction' THEN 'ONLINE' END AS channel,
            TRY_CAST(merchant_id AS BIGINT)                             AS merchant_id,
            NULLIF(trim(merchant_city), '')                             AS merchant_city,
            NULLIF(trim(merchant_state), '')                            AS merchant_state,
            CASE WHEN regexp_replace(trim(zip), '\\\\.0*$', '') RLIKE '^[0-9]{{1,5}}$'
                 THEN lpad(regexp_replace(trim(zip), '\\\\.0*$', ''), 5, '0') END AS zip,
            TRY_CAST(mcc AS INT)                                        AS mcc,
            NULLIF(trim(errors), '')                                    AS errors,
            to_timestamp_ntz(dms_commit_ts, 'yyyy-MM-dd HH:mm:ss.SSSSSS') AS _commit_ts,
            _source_file, _file_order, _source_row,
            COALESCE(Op, 'I')                                           AS _op
        FROM bronze_new
    ) typed
    WHERE dms_id IS NOT NULL AND (_op = 'D' OR (amount IS NOT NULL AND txn_ts IS NOT NULL AND channel IS NOT NULL
          AND (errors IS NULL OR errors RLIKE '{ERRORS_PATTERN}')))
) ranked
WHERE _rank = 1
"""

def session(peer: Peer) -> SparkSession:
    memory = f"{int(peer.memory_cap * 0.6) // 2**20}m" if peer.memory_cap else "6g"
    return (
        SparkSession.builder.master(f"local[{os.cpu_count()}]")
        .appName("medallion-bench")
        .config("spark.driver.memory", memory)
        .config("spark.sql.shuffle.partitions", str(2 * (os.cpu_count() or 1)))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.local.dir", str(peer.out / "_spark_tmp"))
        .getOrCreate()
    )


def replace(folder: Path, frame, partition_by: str | None = None) -> None:
    """Writes `frame` next to `folder`, then swaps it in."""
    fresh = folder.with_name(folder.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    writer = frame.write.partitionBy(partition_by) if partition_by else frame.write
    writer.parquet(str(fresh))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def ingest(peer: Peer, spark: SparkSession) -> bool | None:
    files = peer.new_files()
    if not files:
        return False
    from pyspark.sql import functions as F

    frames = []
    for order, path in files:
        frame = spark.read.option("header", True).csv(str(path))
        if "Op" not in frame.columns:
            frame = frame.withColumn("Op", F.lit(None).cast("string"))
        # Row numbers in file order: Spark reads a file in order within its partitions.
        frame = frame.withColumn("_source_row", F.monotonically_increasing_id() + 1)
        frames.append(
            frame.withColumn("_source_file", F.lit(path.name))
            .withColumn("_file_order", F.lit(order).cast("bigint"))
            .withColumn("_ingested_at", F.current_timestamp())
            .withColumn("_run_id", F.lit(peer.run_id))
        )
    bronze = frames[0]
    for frame in frames[1:]:
        bronze = bronze.unionByName(frame, allowMissingColumns=True)
    bronze_dir = peer.table("bronze/transactions") / f"run={peer.run_id}"
    bronze.write.parquet(str(bronze_dir))
    spark.read.parquet(str(bronze_dir)).createOrReplaceTempView("bronze_new")
    changes = spark.sql(TYPED).drop("_rank").cache()
    changes.createOrReplaceTempView("changes")
    silver = peer.table("silver/transactions")
    if not silver.exists():
        replace(silver, spark.sql(f"SELECT {SILVER_SELECT} FROM changes WHERE _op <> 'D'"))
        peer.mark_ingested(files)
        return None
    spark.read.parquet(str(silver)).createOrReplaceTempView("old")
    touched = spark.sql(
        "SELECT DISTINCT o.txn_date FROM old o JOIN changes c ON o.dms_id = c.dms_id "
        "UNION SELECT DISTINCT txn_date FROM changes WHERE _op <> 'D'"
    ).collect()
    spark.createDataFrame([(row.txn_date,) for row in touched], "txn_date date").createOrReplaceTempView("touched")
    newest = spark.sql(f"""
        SELECT {", ".join("o." + c for c in SILVER_COLUMNS)} FROM old o LEFT ANTI JOIN changes c ON o.dms_id = c.dms_id AND c._commit_ts >= o._commit_ts
        UNION ALL
        SELECT {", ".join(SILVER_COLUMNS)} FROM (SELECT {SILVER_SELECT}, _op FROM changes) c
        WHERE c._op <> 'D' AND NOT EXISTS (SELECT 1 FROM old o WHERE o.dms_id = c.dms_id AND o._commit_ts > c._commit_ts)
    """)
    replace(silver, newest)
    peer.mark_ingested(files)
    return True


def gold(peer: Peer, spark: SparkSession, incremental: bool) -> None:
    spark.read.parquet(str(peer.table("silver/transactions"))).createOrReplaceTempView("silver")
    scope = "SELECT * FROM silver" + (" WHERE txn_date IN (SELECT txn_date FROM touched)" if incremental else "")
    spark.sql(scope).createOrReplaceTempView("silver_scope")
    for name, query in GOLD.items():
        folder = peer.table(f"gold/{name}")
        frame = spark.sql(query.format(source="silver_scope"))
        if incremental:
            kept = spark.read.parquet(str(folder)).where("txn_date NOT IN (SELECT txn_date FROM touched)")
            kept.createOrReplaceTempView("kept")
            frame = spark.sql("SELECT * FROM kept").unionByName(frame)
        replace(folder, frame, "txn_year" if name == "fact_transactions" else None)


def main() -> None:
    peer = Peer()
    peer.out.mkdir(parents=True, exist_ok=True)
    spark = session(peer)
    spark.sparkContext.setLogLevel("ERROR")
    if peer.stages == "ingest":
        ingest(peer, spark)
    elif peer.stages == "gold":
        gold(peer, spark, incremental=False)
    else:
        changed = ingest(peer, spark)
        has_gold = peer.table("gold/daily_kpis").exists()
        if changed is None or not has_gold:
            gold(peer, spark, incremental=False)
        elif changed:
            gold(peer, spark, incremental=True)
    spark.stop()
    shutil.rmtree(peer.out / "_spark_tmp", ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
