"""What every peer shares: its command line, which landing files are new, and the table contract.

A peer is `<engine>_peer.py {ingest,gold,all} --landing L --out O`. `ingest` lands the new transaction
files of `L/public/transactions` into `O/bronze/transactions` and applies them to `O/silver/transactions`
(the last change per `dms_id` by commit time, file order, row; deletes remove the key; an older change
never overwrites a newer row). `gold` builds `O/gold/{daily_kpis,merchant_daily,fact_transactions}` from
Silver in full. `all` does both, and Gold only for the dates the new changes touched when Gold exists.
The semantics are medallion's reference pipeline (sql/silver/transactions.sql, sql/gold/*.sql).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path

SILVER_COLUMNS = [
    "dms_id", "txn_ts", "txn_date", "client_id", "card_id", "amount", "channel", "merchant_id",
    "merchant_city", "merchant_state", "zip", "mcc", "errors", "is_refund", "amount_category",
    "_commit_ts", "_source_file",
]
TXN_COLUMNS = [
    "id", "date", "client_id", "card_id", "amount", "use_chip", "merchant_id", "merchant_city",
    "merchant_state", "zip", "mcc", "errors",
]
ERRORS_PATTERN = (
    "^(Insufficient Balance|Bad PIN|Technical Glitch|Bad Card Number|Bad Expiration|Bad CVV|Bad Zipcode)"
    "(,(Insufficient Balance|Bad PIN|Technical Glitch|Bad Card Number|Bad Expiration|Bad CVV|Bad Zipcode))*$"
)


# Silver's computed columns from its typed ones, as sql/silver/transactions.sql computes them.
SILVER_SELECT = ", ".join(
    [c for c in SILVER_COLUMNS if c not in ("is_refund", "amount_category")]
    + [
        "amount < 0 AS is_refund",
        "CASE WHEN abs(amount) >= 1000 THEN 'high_value' WHEN abs(amount) >= 100 THEN 'medium_value' "
        "ELSE 'standard' END AS amount_category",
    ]
)

# The Gold SQL of sql/gold/*.sql over `{source}` (Silver, or the part of it in scope), in the SQL that
# DataFusion, DuckDB and Spark all read.
GOLD = {
    "daily_kpis": """
        SELECT txn_date, COUNT(*) AS txn_count, CAST(COALESCE(SUM(amount), 0) AS DECIMAL(18, 2)) AS total_amount,
               COUNT(*) FILTER (WHERE amount < 0) AS refund_count,
               CAST(COALESCE(-SUM(amount) FILTER (WHERE amount < 0), 0) AS DECIMAL(18, 2)) AS refund_amount,
               COUNT(errors) AS error_count, COUNT(*) FILTER (WHERE channel = 'ONLINE') AS online_count,
               COUNT(DISTINCT card_id) AS distinct_cards
        FROM {source} GROUP BY txn_date ORDER BY txn_date""",
    "merchant_daily": """
        SELECT merchant_id, txn_date, COUNT(*) AS txn_count,
               CAST(COALESCE(SUM(amount), 0) AS DECIMAL(18, 2)) AS total_amount
        FROM {source} GROUP BY merchant_id, txn_date ORDER BY txn_date, merchant_id""",
    "fact_transactions": """
        SELECT dms_id AS transaction_id, txn_ts, txn_date, CAST(date_part('year', txn_date) AS INT) AS txn_year,
               card_id, client_id AS user_id, merchant_id, mcc, amount, channel, is_refund, amount_category,
               errors, errors IS NOT NULL AS has_errors
        FROM {source}""",
}

class Peer:
    def __init__(self) -> None:
        parser = argparse.ArgumentParser()
        parser.add_argument("stages", choices=["ingest", "gold", "all"])
        parser.add_argument("--landing", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        args = parser.parse_args()
        self.stages: str = args.stages
        self.landing: Path = args.landing
        self.out: Path = args.out
        self.run_id = str(uuid.uuid4())
        self.state_file = self.out / "_peer" / "ingested.json"
        cap = os.environ.get("BENCH_MEMORY_CAP")
        self.memory_cap = int(cap) if cap else None

    def table(self, name: str) -> Path:
        return self.out / name

    def new_files(self) -> list[tuple[int, Path]]:
        """New transaction files with their file order: full-load files first, then change files by name."""
        folder = self.landing / "public" / "transactions"
        files = sorted(folder.rglob("*.csv"), key=lambda p: (not p.name.startswith("LOAD"), p.name))
        done = set(json.loads(self.state_file.read_text())) if self.state_file.exists() else set()
        return [(order, path) for order, path in enumerate(files) if path.name not in done]

    def mark_ingested(self, files: list[tuple[int, Path]]) -> None:
        done = set(json.loads(self.state_file.read_text())) if self.state_file.exists() else set()
        done.update(path.name for _, path in files)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(sorted(done)))
        temporary.replace(self.state_file)
