//! Open tables: after 30 daily incremental runs every Silver and Gold table reads the same in Python
//! `deltalake`, Polars and DuckDB's Delta extension as in `medallion sql` (rows, sums, schema); maintenance
//! keeps file counts small, refuses a vacuum that would break time travel, and time travel works.

use std::{collections::BTreeMap, path::Path, process::Command};

use crate::common::{
    Scratch, assert_fact_checked_on_whole_files, assert_success, keyed_fact, python,
    small_files_with_fact_sum, text,
};

const TABLES: [&str; 11] = [
    "silver.transactions",
    "silver.cards",
    "silver.users",
    "silver.mcc_codes",
    "gold.daily_kpis",
    "gold.merchant_daily",
    "gold.fact_transactions",
    "gold.dim_card",
    "gold.dim_user",
    "gold.dim_merchant",
    "gold.dim_date",
];

/// Delta schema types as `describe` prints them, in the readers' common vocabulary.
fn canonical(delta_type: &str) -> String {
    match delta_type {
        "long" => "int64".into(),
        "integer" => "int32".into(),
        "short" => "int16".into(),
        "boolean" => "bool".into(),
        "double" => "float64".into(),
        "timestamp_ntz" => "timestamp".into(),
        "timestamp" => "timestamp_tz".into(),
        other => other.replace(' ', ""),
    }
}

/// Per table: (rows, [(column, type)], {numeric column: sum as text}) as medallion sees it.
type Expected = BTreeMap<String, (u64, Vec<(String, String)>, BTreeMap<String, String>)>;

fn medallion_view(scratch: &Scratch) -> Expected {
    let lake = scratch.lake();
    let lake_arg = lake.display().to_string();
    let mut expected = Expected::new();
    for table in TABLES {
        let describe =
            scratch.command(&["describe", table, "--lake", &lake_arg, "--format", "json"]);
        assert_success(&describe);
        let description: serde_json::Value =
            serde_json::from_slice(&describe.stdout).expect("describe json");
        let columns: Vec<(String, String)> = description["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| {
                (
                    c[0].as_str().unwrap_or("").to_string(),
                    canonical(c[1].as_str().unwrap_or("")),
                )
            })
            .collect();
        let numeric: Vec<&String> = columns
            .iter()
            .filter(|(_, t)| t.starts_with("decimal") || t.starts_with("int"))
            .map(|(c, _)| c)
            .collect();
        let mut select = vec!["CAST(COUNT(*) AS VARCHAR) AS n".to_string()];
        select.extend(
            numeric
                .iter()
                .map(|c| format!("CAST(SUM(\"{c}\") AS VARCHAR) AS \"{c}\"")),
        );
        let sql = format!("SELECT {} FROM {table}", select.join(", "));
        let output = scratch.command(&["sql", &sql, "--lake", &lake_arg, "--format", "json"]);
        assert_success(&output);
        let row: serde_json::Value =
            serde_json::from_str(text(&output).lines().next().unwrap_or("{}")).expect("sql json");
        let rows: u64 = row["n"]
            .as_str()
            .and_then(|n| n.parse().ok())
            .expect("count");
        let sums = numeric
            .iter()
            .map(|c| {
                (
                    (*c).clone(),
                    row[c.as_str()].as_str().unwrap_or("NULL").to_string(),
                )
            })
            .collect();
        expected.insert(table.to_string(), (rows, columns, sums));
    }
    expected
}

const READERS: &str = r#"
import decimal, glob, json, os, sys
import duckdb, polars as pl
from deltalake import DeltaTable
lake = sys.argv[1]
wanted = json.loads(sys.argv[2])

def canon_arrow(t):
    t = str(t)
    if t.startswith("decimal128"): return "decimal" + t[len("decimal128"):].replace(" ", "")
    return {"int64": "int64", "int32": "int32", "int16": "int16", "bool": "bool", "double": "float64",
            "date32[day]": "date", "string": "string", "large_string": "string", "string_view": "string",
            "timestamp[us]": "timestamp", "timestamp[us, tz=UTC]": "timestamp_tz"}.get(t, t)

def canon_polars(t):
    if isinstance(t, pl.Decimal): return f"decimal({t.precision},{t.scale})"
    if isinstance(t, pl.Datetime): return "timestamp_tz" if t.time_zone else "timestamp"
    return {pl.Int64: "int64", pl.Int32: "int32", pl.Int16: "int16", pl.Boolean: "bool", pl.Float64: "float64",
            pl.Date: "date", pl.String: "string"}.get(t, str(t))

def canon_duck(t):
    t = str(t)
    if t.startswith("DECIMAL"): return "decimal" + t[len("DECIMAL"):].replace(" ", "")
    return {"BIGINT": "int64", "INTEGER": "int32", "SMALLINT": "int16", "BOOLEAN": "bool", "DOUBLE": "float64",
            "DATE": "date", "VARCHAR": "string", "TIMESTAMP": "timestamp",
            "TIMESTAMP WITH TIME ZONE": "timestamp_tz"}.get(t, t)

def total(values):
    values = [v for v in values if v is not None]
    return "NULL" if not values else str(sum(values))

ext = glob.glob(os.path.join(os.path.dirname(duckdb.__file__), "..", "duckdb_ext*", "extensions", "*", "*", "delta.duckdb_extension"))
con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
con.execute(f"LOAD '{ext[0]}'")
out = {}
for table, numeric in wanted.items():
    path = os.path.join(lake, *table.split("."))
    arrow = DeltaTable(path).to_pyarrow_table()
    frame = pl.read_delta(path)
    duck = con.execute(f"SELECT * FROM delta_scan('{path}')")
    duck_cols = [(d[0], canon_duck(d[1])) for d in duck.description]
    duck_rows = duck.fetchall()
    out[table] = {
        "deltalake": [arrow.num_rows, [(f.name, canon_arrow(f.type)) for f in arrow.schema],
                      {c: total(arrow.column(c).to_pylist()) for c in numeric}],
        "polars": [frame.height, [(n, canon_polars(t)) for n, t in frame.schema.items()],
                   {c: total(frame[c].to_list()) for c in numeric}],
        "duckdb": [len(duck_rows), duck_cols,
                   {c: total([r[[n for n, _ in duck_cols].index(c)] for r in duck_rows]) for c in numeric}],
    }
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)
"#;

fn read_with_python(lake: &Path, expected: &Expected) -> serde_json::Value {
    let wanted: BTreeMap<&String, Vec<&String>> = expected
        .iter()
        .map(|(t, (_, _, sums))| (t, sums.keys().collect()))
        .collect();
    readers_json(
        READERS,
        &[
            lake.as_os_str(),
            std::ffi::OsStr::new(&serde_json::to_string(&wanted).expect("json")),
        ],
    )
}

/// Runs the Python `script` with `args`; what it prints, as JSON.
fn readers_json(script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let output = Command::new(python())
        .args(["-c", script])
        .args(args)
        .output()
        .expect("python");
    assert!(
        output.status.success(),
        "python readers failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("readers json")
}

fn assert_readers_agree(expected: &Expected, seen: &serde_json::Value) {
    for (table, (rows, columns, sums)) in expected {
        for reader in ["deltalake", "polars", "duckdb"] {
            let got = &seen[table][reader];
            assert_eq!(got[0].as_u64(), Some(*rows), "{table}: rows in {reader}");
            let schema: Vec<(String, String)> =
                serde_json::from_value(got[1].clone()).expect("schema pairs");
            assert_eq!(&schema, columns, "{table}: schema in {reader}");
            for (column, sum) in sums {
                // Readers print decimals without trailing zeros differently; compare as numbers.
                let theirs = got[2][column].as_str().unwrap_or("?");
                let same = match (
                    sum.parse::<rust_decimal::Decimal>(),
                    theirs.parse::<rust_decimal::Decimal>(),
                ) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => sum == theirs,
                };
                assert!(same, "{table}.{column}: medallion {sum}, {reader} {theirs}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_daily_runs_read_the_same_everywhere_and_stay_compact() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 40, 30, 77);
    let held = scratch.hold_back_changes(30);
    assert_success(&scratch.run());
    let lake = scratch.lake();
    let lake_arg = lake.display().to_string();
    let first_count = text(&scratch.command(&[
        "sql",
        "SELECT COUNT(*) AS n FROM silver.transactions",
        "--lake",
        &lake_arg,
        "--format",
        "csv",
    ]));
    let silver_v1 =
        crate::common::delta_version(&scratch.table("silver", "transactions")).expect("silver");
    let after_first = chrono::Utc::now().to_rfc3339();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for (aside, original) in held {
        std::fs::rename(aside, original).expect("deliver the day's file");
        assert_success(&scratch.run());
    }

    let expected = medallion_view(&scratch);
    assert!(expected["silver.transactions"].0 > 0);
    assert_eq!(
        expected["gold.daily_kpis"]
            .1
            .iter()
            .find(|(c, _)| c == "total_amount")
            .map(|(_, t)| t.as_str()),
        Some("decimal(18,2)")
    );
    assert_readers_agree(&expected, &read_with_python(&lake, &expected));

    // Compaction leaves a handful of files per Gold partition.
    let maintain = scratch.command(&[
        "maintain",
        "pipelines/transactions.yaml",
        "--optimize",
        "--checkpoint",
    ]);
    assert_success(&maintain);
    for table in [
        "gold.fact_transactions",
        "gold.daily_kpis",
        "gold.merchant_daily",
        "silver.transactions",
    ] {
        let describe =
            scratch.command(&["describe", table, "--lake", &lake_arg, "--format", "json"]);
        let d: serde_json::Value = serde_json::from_slice(&describe.stdout).expect("json");
        let partitions = d["partition_columns"].as_array().map_or(0, |p| p.len());
        let files = d["files"].as_u64().expect("files");
        // fact_transactions is partitioned by year: the sample spans at most two years.
        let limit = if partitions > 0 { 2 * 2 } else { 2 };
        assert!(
            files <= limit,
            "{table}: {files} files after optimize\n{}",
            text(&maintain)
        );
    }

    // A vacuum shorter than the promised time travel is refused; the default one is allowed and keeps
    // every reader and time travel to the first run working.
    let refused = scratch.command(&[
        "maintain",
        "pipelines/transactions.yaml",
        "--vacuum",
        "--retention-days",
        "1",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("refusing to vacuum with a retention of 1 day(s)"),
        "{}",
        text(&refused)
    );
    assert_success(&scratch.command(&["maintain", "pipelines/transactions.yaml", "--vacuum"]));
    assert_readers_agree(&expected, &read_with_python(&lake, &expected));
    for args in [
        vec!["--version".to_string(), silver_v1.to_string()],
        vec!["--as-of".to_string(), after_first.clone()],
    ] {
        let mut command = vec![
            "sql",
            "SELECT COUNT(*) AS n FROM silver.transactions",
            "--lake",
            &lake_arg,
            "--format",
            "csv",
        ];
        command.extend(args.iter().map(String::as_str));
        let travelled = scratch.command(&command);
        assert_success(&travelled);
        assert_eq!(text(&travelled), first_count, "time travel {args:?}");
    }

    // describe shows the commits with the runs that made them.
    let describe = scratch.command(&[
        "describe",
        "gold.daily_kpis",
        "--lake",
        &lake_arg,
        "--format",
        "json",
    ]);
    let d: serde_json::Value = serde_json::from_slice(&describe.stdout).expect("json");
    let history = scratch.command(&[
        "history",
        "pipelines/transactions.yaml",
        "--format",
        "json",
        "--limit",
        "100",
    ]);
    let runs: serde_json::Value = serde_json::from_slice(&history.stdout).expect("json");
    let run_ids: Vec<&str> = runs
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["run_id"].as_str())
        .collect();
    let commits = d["history"].as_array().expect("history");
    assert!(commits.len() >= 2);
    let with_runs = commits
        .iter()
        .filter(|c| c["run_id"].as_str().is_some_and(|r| run_ids.contains(&r)))
        .count();
    assert!(
        with_runs >= 2,
        "commits name the runs that made them: {commits:?}"
    );
}

/// Transactions and money of Silver and `gold.daily_kpis` in Polars, DuckDB's `delta_scan` and Python
/// `deltalake`'s `QueryBuilder` (the readers of a table with deletion vectors), and whether
/// `to_pyarrow_table` refuses Silver.
const VECTOR_READERS: &str = r#"
import glob, json, os, sys
import duckdb, polars as pl
from deltalake import DeltaTable, QueryBuilder
lake = sys.argv[1]
ext = glob.glob(os.path.join(os.path.dirname(duckdb.__file__), "..", "duckdb_ext*", "extensions", "*", "*", "delta.duckdb_extension"))
con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
con.execute(f"LOAD '{ext[0]}'")
out = {}
# Per table: the column counting transactions (None: rows), and the money column.
for table, count, money in [("silver/transactions", None, "amount"), ("gold/daily_kpis", "txn_count", "total_amount"), ("gold/fact_transactions", None, "amount")]:
    path = os.path.join(lake, table)
    frame = pl.read_delta(path)
    n = "COUNT(*)" if count is None else f"SUM({count})"
    duck = con.execute(f"SELECT {n}, CAST(SUM({money}) AS VARCHAR) FROM delta_scan('{path}')").fetchone()
    qb = QueryBuilder().register("t", DeltaTable(path)).execute(f"SELECT {n} AS n, CAST(SUM({money}) AS VARCHAR) AS s FROM t").read_all()
    out[table] = {
        "polars": [frame.height if count is None else int(frame[count].sum()), str(frame[money].sum())],
        "duckdb": [duck[0], duck[1]],
        "querybuilder": [qb.column("n")[0].as_py(), qb.column("s")[0].as_py()],
    }
try:
    DeltaTable(os.path.join(lake, "silver/transactions")).to_pyarrow_table()
    out["pyarrow_refuses"] = False
except Exception:
    out["pyarrow_refuses"] = True
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)
"#;

/// `(rows, sum of money)` of Silver, `gold.daily_kpis` and `gold.fact_transactions` as `medallion sql`
/// reads them.
fn medallion_sums(scratch: &Scratch) -> [(u64, rust_decimal::Decimal); 3] {
    let lake = scratch.lake().display().to_string();
    let read = |sql: &str| {
        let output = scratch.command(&["sql", sql, "--lake", &lake, "--format", "csv"]);
        assert_success(&output);
        let line = text(&output).lines().nth(1).unwrap_or_default().to_string();
        let (rows, money) = line.split_once(',').expect("two columns");
        (rows.parse().expect("rows"), money.parse().expect("money"))
    };
    [
        read("SELECT COUNT(*), SUM(amount) FROM silver.transactions"),
        read("SELECT SUM(txn_count), SUM(total_amount) FROM gold.daily_kpis"),
        read("SELECT COUNT(*), SUM(amount) FROM gold.fact_transactions"),
    ]
}

/// Rows of `gold.fact_transactions` and of its SQL over Silver that the other lacks, counted; and
/// the fact's rows with a transaction id held more than once.
fn fact_differences(scratch: &Scratch) -> String {
    let lake = scratch.lake().display().to_string();
    let sql = std::fs::read_to_string(crate::common::repo().join("sql/gold/fact_transactions.sql"))
        .expect("fact sql");
    let sql = sql.trim().trim_end_matches(';');
    // In the SQL's order (a reader may give the partition column last).
    let columns = "transaction_id, txn_ts, txn_date, txn_year, card_id, user_id, merchant_id, mcc, \
                   amount, channel, is_refund, amount_category, errors, has_errors";
    let fact = format!("SELECT {columns} FROM gold.fact_transactions");
    let query = format!(
        "SELECT \
           (SELECT COUNT(*) FROM ({fact} EXCEPT ALL {sql}\n)) AS extra, \
           (SELECT COUNT(*) FROM ({sql}\n EXCEPT ALL {fact})) AS missing, \
           (SELECT COUNT(*) - COUNT(DISTINCT transaction_id) FROM gold.fact_transactions) AS repeated"
    );
    let output = scratch.command(&["sql", &query, "--lake", &lake, "--format", "csv"]);
    assert_success(&output);
    text(&output).lines().nth(1).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn silver_with_deletion_vectors_ends_as_the_replay_and_reads_the_same_in_every_reader_of_them()
 {
    let scratch = Scratch::new();
    scratch.generate(3_000, 40, 8, 78);
    let mut held = scratch.hold_back_changes(8);
    let last = held.pop().expect("a held file");
    // Silver with deletion vectors, and the fact refreshed by key with them (`incremental.key`).
    let project = scratch.edit_project(&keyed_fact, None);
    assert_success(&scratch.command_in(&project, &["run", "pipelines/t.yaml"]));
    assert_eq!(fact_differences(&scratch), "0,0,0");
    for (aside, original) in held {
        std::fs::rename(aside, original).expect("deliver the day's file");
        let output = scratch.command_in(&project, &["run", "pipelines/t.yaml"]);
        assert_success(&output);
        // Only the keys the day changed were recomputed, and the fact is its SQL over Silver.
        assert!(
            text(&output).contains("changed `transaction_id` value(s) recomputed"),
            "{}",
            text(&output)
        );
        assert_eq!(fact_differences(&scratch), "0,0,0");
    }
    let commits = |table: &Path| -> String {
        std::fs::read_dir(table.join("_delta_log"))
            .expect("log")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| std::fs::read_to_string(e.path()).expect("commit"))
            .collect()
    };
    assert!(
        commits(&scratch.table("gold", "fact_transactions")).contains("\"deletionVector\":{"),
        "no deletion vector written in the fact"
    );

    // The batches marked rows: some file of Silver carries a deletion vector, and its protocol
    // names the feature.
    let log = scratch.table("silver", "transactions").join("_delta_log");
    let entries = commits(&scratch.table("silver", "transactions"));
    assert!(
        entries.contains("\"deletionVector\":{"),
        "no deletion vector written"
    );
    assert!(
        entries.contains("\"deletionVectors\""),
        "feature not in the protocol"
    );

    // Silver and Gold hold what the landing's changes, replayed without medallion, say, in medallion
    // and in every reader that reads deletion vectors. Python deltalake's pyarrow reader (1.6)
    // refuses such a table: it does not return the deleted rows.
    let check = || {
        let live = crate::common::replay(&scratch.transactions_dir());
        let replayed = (
            live.len() as u64,
            live.values()
                .map(|t| t.amount)
                .sum::<rust_decimal::Decimal>(),
        );
        let seen = medallion_sums(&scratch);
        assert_eq!(seen, [replayed, replayed, replayed]);
        assert_eq!(fact_differences(&scratch), "0,0,0");
        let lake = scratch.lake();
        let read = readers_json(VECTOR_READERS, &[lake.as_os_str()]);
        let tables = [
            "silver/transactions",
            "gold/daily_kpis",
            "gold/fact_transactions",
        ];
        for (table, (rows, money)) in tables.iter().zip(seen) {
            for reader in ["polars", "duckdb", "querybuilder"] {
                let got = &read[table][reader];
                assert_eq!(got[0].as_u64(), Some(rows), "{table}: rows in {reader}");
                let theirs: rust_decimal::Decimal = got[1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("{table}: money in {reader}: {}", got[1]));
                assert_eq!(theirs, money, "{table}: money in {reader}");
            }
        }
        assert_eq!(read["pyarrow_refuses"].as_bool(), Some(true));
    };
    check();

    // Compaction reads the files through their vectors, and a checkpoint keeps them; a batch after
    // both marks rows in the compacted files, known from the checkpoint.
    assert_success(&scratch.command_in(
        &project,
        &["maintain", "pipelines/t.yaml", "--optimize", "--checkpoint"],
    ));
    assert!(
        std::fs::read_dir(&log)
            .expect("log")
            .filter_map(|e| e.ok())
            .any(|e| e
                .file_name()
                .to_string_lossy()
                .ends_with(".checkpoint.parquet")),
        "no checkpoint written"
    );
    check();
    std::fs::rename(last.0, last.1).expect("deliver the last day's file");
    assert_success(&scratch.command_in(&project, &["run", "pipelines/t.yaml"]));
    check();
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_vectors_are_refused_off_cdc_and_noted_on_a_table_created_without() {
    let scratch = Scratch::new();
    scratch.generate(200, 5, 0, 5);
    // On a stage that does not apply changes: refused before anything runs.
    let on_gold = |yaml: String| {
        yaml.replacen(
            "    target: gold.daily_kpis\n",
            "    target: gold.daily_kpis\n    deletion_vectors: true\n",
            1,
        )
    };
    let output = scratch.run_edited(&on_gold, None);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("`deletion_vectors` needs mode `cdc`"),
        "{}",
        text(&output)
    );
    // Set on a Silver created without them: the run goes on, rewriting files, and says so.
    assert_success(&scratch.run());
    let with_vectors = |yaml: String| {
        yaml.replacen(
            "    mode: cdc\n    zorder_by: [dms_id]\n",
            "    mode: cdc\n    deletion_vectors: true\n    zorder_by: [dms_id]\n",
            1,
        )
    };
    let output = scratch.run_edited(&with_vectors, None);
    assert_success(&output);
    assert!(
        text(&output).contains("the existing table was created without them"),
        "{}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_key_is_refused_without_vectors_beside_a_column_or_over_sql_not_row_wise() {
    let scratch = Scratch::new();
    scratch.generate(200, 5, 0, 5);
    let fact_incremental = "    target: gold.fact_transactions\n    mode: overwrite\n    incremental: { column: txn_date, source: silver.transactions }\n";
    let keyed = |with: &'static str| {
        move |yaml: String| {
            assert!(
                yaml.contains(fact_incremental),
                "the reference fact stage changed"
            );
            yaml.replacen(
                fact_incremental,
                &format!("    target: gold.fact_transactions\n    mode: overwrite\n{with}"),
                1,
            )
        }
    };
    // Without deletion vectors, or with a column too: refused before anything runs.
    for (with, says) in [
        (
            "    incremental: { key: transaction_id, source: silver.transactions }\n",
            "`incremental.key` needs `deletion_vectors: true`",
        ),
        (
            "    deletion_vectors: true\n    incremental: { key: transaction_id, column: txn_date, source: silver.transactions }\n",
            "`incremental` needs one of `column` (recompute",
        ),
    ] {
        let output = scratch.run_edited(&keyed(with), None);
        assert_eq!(output.status.code(), Some(2), "{}", text(&output));
        assert!(text(&output).contains(says), "{}", text(&output));
    }
    // A fact that is not one row per transaction: the stage fails on its first run, saying why, and
    // writes nothing; the stages before it are published.
    let vectors = "    deletion_vectors: true\n    incremental: { key: transaction_id, source: silver.transactions }\n";
    let aggregated = |sql: String| sql.replacen("SELECT\n", "SELECT DISTINCT\n", 1);
    let output = scratch.run_edited(
        &keyed(vectors),
        Some(("gold/fact_transactions.sql", &aggregated)),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains(
            "`incremental.key` needs its SQL to give at most one row per row of its source"
        ),
        "{}",
        text(&output)
    );
    assert!(text(&output).contains("not one row per row of `silver.transactions`"));
    assert!(!scratch.table("gold", "fact_transactions").exists());
    assert!(scratch.table("silver", "transactions").exists());

    // SQL that reads the run's date would give other rows on another date than the keys'
    // refresh recomputes: refused before anything runs, whichever way the variable is written.
    for bounded in [
        "FROM silver.transactions\nWHERE txn_date < CAST($end AS DATE)",
        "FROM silver.transactions\nWHERE txn_date < CAST('{{ end }}' AS DATE)",
    ] {
        let dated = |sql: String| {
            assert!(
                sql.contains("FROM silver.transactions"),
                "the fact's SQL changed"
            );
            sql.replacen("FROM silver.transactions", bounded, 1)
        };
        let project = scratch.edit_project(
            &keyed(vectors),
            Some(("gold/fact_transactions.sql", &dated)),
        );
        let output = scratch.command_in(
            &project,
            &["run", "pipelines/t.yaml", "--date", "2026-01-01"],
        );
        assert_eq!(output.status.code(), Some(2), "{}", text(&output));
        assert!(
            text(&output).contains("its SQL must give the same row whatever the run's date"),
            "{}",
            text(&output)
        );
    }
}

/// The rows of `gold.fact_transactions`.
fn fact_rows(scratch: &Scratch) -> i64 {
    let lake = scratch.lake().display().to_string();
    let query = "SELECT COUNT(*) FROM gold.fact_transactions";
    let output = scratch.command(&["sql", query, "--lake", &lake, "--format", "csv"]);
    assert_success(&output);
    let count = text(&output).lines().nth(1).unwrap_or_default().to_string();
    count.parse().unwrap_or_else(|_| panic!("{count}"))
}

/// A keyed fact over a Silver of several files, after a batch over its last days: the keys gone
/// are read from the files the batch marked, not from every live key, and the fact still equals its
/// SQL over Silver.
#[tokio::test(flavor = "multi_thread")]
async fn a_keyed_fact_reads_the_keys_gone_from_the_files_a_recent_batch_changed() {
    let scratch = Scratch::new();
    // Over three years: the fact's files of the years before the batch's hold no key it changes.
    scratch.generate_with_recent_batch(60_000, 1_000, 0, 21, 600, 3);
    // Files of 1 MiB: Silver's first load is files of key ranges, the batch's days in few of them.
    let small_files = |yaml: String| small_files_with_fact_sum(keyed_fact(yaml));
    let project = scratch.edit_project(&small_files, None);
    let run = || {
        let output = scratch.command_in_logging(
            &project,
            &["run", "pipelines/t.yaml"],
            "warn,medallion::delta::keyed=debug,medallion::runner=debug,medallion::checks=debug",
        );
        assert_success(&output);
        format!(
            "{}{}",
            text(&output),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    run();
    assert_eq!(fact_differences(&scratch), "0,0,0");
    let rows_before = fact_rows(&scratch);
    scratch.deliver_batch();
    let log = run();
    let gone = log
        .lines()
        .find(|l| l.contains("keys gone since version"))
        .unwrap_or_else(|| panic!("no keyed refresh: {log}"));
    assert!(gone.contains("from_changed_files=true"), "{gone}");
    // The checks read the fact's files that hold no key replaced or deleted whole.
    assert_fact_checked_on_whole_files(&log);
    // The fact lost the rows it marked and gained those it recomputed, and equals its SQL.
    let fact = log
        .lines()
        .find(|l| l.contains("gold_fact_transactions") && l.contains("recomputed"))
        .unwrap_or_else(|| panic!("{log}"));
    let number_before = |words: &str| -> i64 {
        let at = fact.find(words).unwrap_or_else(|| panic!("{fact}"));
        let number = fact[..at].trim_end().rsplit(' ').next().unwrap_or_default();
        number.parse().unwrap_or_else(|_| panic!("{fact}"))
    };
    let recomputed = number_before("changed `transaction_id` value(s)");
    let marked = number_before("row(s) replaced or deleted");
    assert!(marked > 0, "the batch's updates and deletes: {fact}");
    assert_eq!(
        fact_rows(&scratch),
        rows_before - marked + recomputed,
        "{fact}"
    );
    assert_eq!(fact_differences(&scratch), "0,0,0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyed_fact_follows_a_restore_of_its_source_and_is_rebuilt_for_a_new_column_or_a_backfill()
 {
    let scratch = Scratch::new();
    scratch.generate(600, 12, 5, 21);
    let mut held = scratch.hold_back_changes(5);
    let (last_aside, last_day) = held.pop().expect("a held file");
    let mut held = held.into_iter();
    let mut deliver = || {
        let (aside, original) = held.next().expect("a held file");
        std::fs::rename(aside, original).expect("deliver the day's file");
    };
    let keyed = "changed `transaction_id` value(s) recomputed";
    let project = scratch.edit_project(&keyed_fact, None);
    let run = |project: &std::path::Path| {
        let output = scratch.command_in(project, &["run", "pipelines/t.yaml"]);
        assert_success(&output);
        text(&output)
    };
    run(&project);
    deliver();
    assert!(run(&project).contains(keyed));
    assert_eq!(fact_differences(&scratch), "0,0,0");

    // Silver restored to its version before that day (another tool's RESTORE): the rows the day
    // deleted or replaced are live again, in files whose vectors shrank or went. The fact recomputes
    // them by key, and equals its SQL over Silver again.
    let silver = scratch.table("silver", "transactions");
    let version = crate::common::delta_version(&silver).expect("silver version");
    crate::common::restore_with_python(&silver, version - 1);
    let after_restore = run(&project);
    let fact_line = |report: &str| {
        report
            .lines()
            .find(|l| l.contains("gold_fact_transactions"))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        fact_line(&after_restore).contains("succeeded"),
        "{after_restore}"
    );
    assert!(fact_line(&after_restore).contains(keyed), "{after_restore}");
    assert_eq!(fact_differences(&scratch), "0,0,0");
    deliver();
    assert!(run(&project).contains(keyed));
    assert_eq!(fact_differences(&scratch), "0,0,0");

    // A column added to the fact: the old files cannot take the new rows, so it is rebuilt in full
    // with the column; the next day is refreshed by key again.
    let widened = |sql: String| {
        sql.replacen(
            "    errors IS NOT NULL                               AS has_errors\n",
            "    errors IS NOT NULL                               AS has_errors,\n    amount * 2 AS twice\n",
            1,
        )
    };
    let project = scratch.edit_project(&keyed_fact, Some(("gold/fact_transactions.sql", &widened)));
    deliver();
    let widened_run = run(&project);
    assert!(!fact_line(&widened_run).contains(keyed), "{widened_run}");
    deliver();
    assert!(run(&project).contains(keyed));
    assert!(
        crate::common::schema(&scratch.table("gold", "fact_transactions"))
            .await
            .iter()
            .any(|c| c.starts_with("twice")),
        "the new column is not in the fact"
    );
    let lake = scratch.lake().display().to_string();
    let sums = |sql: &str| {
        let output = scratch.command(&["sql", sql, "--lake", &lake, "--format", "csv"]);
        assert_success(&output);
        text(&output).lines().nth(1).unwrap_or_default().to_string()
    };
    assert_eq!(
        sums("SELECT COUNT(*), SUM(twice) FROM gold.fact_transactions"),
        sums("SELECT COUNT(*), SUM(amount * 2) FROM silver.transactions")
    );

    // The SQL edited, its columns the same: unchanged keys keep their rows until a rebuild is asked
    // for, which `backfill --stages gold` over any day does for a keyed stage (README).
    let tripled = |sql: String| {
        sql.replacen(
            "    errors IS NOT NULL                               AS has_errors\n",
            "    errors IS NOT NULL                               AS has_errors,\n    amount * 3 AS twice\n",
            1,
        )
    };
    let project = scratch.edit_project(&keyed_fact, Some(("gold/fact_transactions.sql", &tripled)));
    let output = scratch.command_in(
        &project,
        &[
            "backfill",
            "pipelines/t.yaml",
            "--from",
            "2026-01-01",
            "--to",
            "2026-01-01",
            "--stages",
            "gold",
        ],
    );
    assert_success(&output);
    assert_eq!(
        sums("SELECT COUNT(*), SUM(twice) FROM gold.fact_transactions"),
        sums("SELECT COUNT(*), SUM(amount * 3) FROM silver.transactions")
    );

    // `backfill --force` over three days around the last day's changes rebuilds the keyed fact in
    // full once, not once a day: the day with changes refreshes it by key, the day after has
    // nothing to write.
    let name = crate::common::file_name(&last_day);
    let day = chrono::NaiveDate::parse_from_str(&name[..8], "%Y%m%d").expect("a dated file");
    std::fs::rename(&last_aside, &last_day).expect("deliver the day's file");
    let fact = scratch.table("gold", "fact_transactions");
    let before = crate::common::delta_version(&fact).expect("fact");
    let (from, to) = (
        day.pred_opt().expect("a day"),
        day.succ_opt().expect("a day"),
    );
    let output = scratch.command_in(
        &project,
        &[
            "backfill",
            "pipelines/t.yaml",
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
            "--force",
        ],
    );
    assert_success(&output);
    assert_eq!(
        text(&output).matches("ran: succeeded").count(),
        3,
        "{}",
        text(&output)
    );
    assert_eq!(
        crate::common::delta_version(&fact),
        Some(before + 2),
        "{}",
        text(&output)
    );
    assert_eq!(fact_differences(&scratch), "0,0,0");
    let operation = |version: u64| {
        let commit = std::fs::read_to_string(fact.join(format!("_delta_log/{version:020}.json")))
            .expect("commit");
        commit
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|a| a["commitInfo"]["operation"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    assert_ne!(
        operation(before + 1),
        "MERGE",
        "the first day did not rebuild"
    );
    assert_eq!(
        operation(before + 2),
        "MERGE",
        "the day with changes did not refresh by key"
    );
}
