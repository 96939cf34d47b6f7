//! The bad-input corpus (`tests/fixtures/bad/`): each file delivered as a change file of the reference
//! pipeline, with its exact outcome asserted, per the policy in the corpus README. A file that cannot be
//! read fails the ingest with nothing landed (or is set aside with `on_bad_file`); a row that does not type
//! is quarantined; the rest lands.

use std::path::Path;

use crate::common::{Scratch, assert_success, delta_version, on_bad_file, query, repo, text};

enum Outcome {
    /// The run fails naming the file; the message contains this; no table changes.
    Fails(&'static str),
    /// The run succeeds; the query over Silver (and quarantine) gives these rows.
    Lands(&'static str, &'static [&'static str]),
}

fn cases() -> Vec<(&'static str, Outcome)> {
    use Outcome::*;
    vec![
        ("empty.csv", Fails("file is empty: expected a header row")),
        (
            "header_only.csv",
            Lands(
                "SELECT COUNT(*) FROM silver.transactions WHERE dms_id >= 9900000000",
                &["0"],
            ),
        ),
        (
            "wrong_delimiter.csv",
            Fails("column `Op;dms_commit_ts;id;date"),
        ),
        (
            "wrong_column_count.csv",
            Fails("row 2 column `zip`: expected 14 fields, found 11"),
        ),
        (
            "unterminated_quote.csv",
            Lands(QUARANTINE, &["errors_known", "9900000002"]),
        ),
        ("invalid_utf8.csv", Fails("row 1")),
        (
            "schema_drift.csv",
            Fails("column `new_col` is not one of the source's columns"),
        ),
        ("truncated.csv.gz", Fails("truncated.csv.gz")),
        ("corrupt.parquet", Fails("corrupt.parquet")),
        (
            "other_schema.parquet",
            Fails("column `colour` is not one of the source's columns"),
        ),
        (
            "bom.csv",
            Lands(
                "SELECT CAST(amount AS VARCHAR) FROM silver.transactions WHERE dms_id >= 9900000000",
                &["10.00"],
            ),
        ),
        (
            "crlf.csv",
            Lands(
                "SELECT CAST(amount AS VARCHAR) || '|' || COALESCE(errors, 'none') FROM silver.transactions WHERE dms_id >= 9900000000",
                &["10.00|none"],
            ),
        ),
        (
            "huge_field.csv",
            Lands(
                "SELECT _reason || ':' || CAST(LENGTH(errors) AS VARCHAR) FROM quarantine.transactions WHERE _source_file LIKE '20300101%'",
                &["errors_known:1048576"],
            ),
        ),
        (
            "duplicate_sequence.csv",
            Lands(
                "SELECT CAST(amount AS VARCHAR) FROM silver.transactions WHERE dms_id >= 9900000000",
                &["12.00"],
            ),
        ),
        (
            "amount_overflow.csv",
            Lands(QUARANTINE, &["amount_parses", "9900000002"]),
        ),
        (
            "impossible_date.csv",
            Lands(QUARANTINE, &["date_parses", "9900000002"]),
        ),
        (
            "unknown_op.csv",
            Lands(QUARANTINE, &["op_known", "9900000002"]),
        ),
        (
            "missing_key.csv",
            Lands(QUARANTINE, &["dms_id_present", "9900000002"]),
        ),
    ]
}

/// The reason of the one quarantined row of the bad file, and the key that reached Silver.
const QUARANTINE: &str = "SELECT (SELECT string_agg(_reason, ',') FROM quarantine.transactions WHERE _source_file LIKE '20300101%'), \
     (SELECT string_agg(CAST(dms_id AS VARCHAR), ',') FROM silver.transactions WHERE dms_id >= 9900000000)";

/// A Parquet file with columns the source does not have.
fn other_schema_parquet(path: &Path) {
    use std::sync::Arc;

    use arrow::{
        array::{Int64Array, StringArray},
        datatypes::{DataType, Field, Schema},
        record_batch::RecordBatch,
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("colour", DataType::Utf8, false),
        Field::new("size", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["red"])),
            Arc::new(Int64Array::from(vec![3])),
        ],
    )
    .expect("batch");
    let file = std::fs::File::create(path).expect("create");
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

fn generate_sample(scratch: &Scratch, parquet: bool) {
    medallion::generate::generate(&medallion::generate::GenerateOptions {
        out: scratch.landing(),
        transactions: 300,
        days: 3,
        change_days: 0,
        seed: 51,
        style: medallion::generate::FileStyle {
            header: true,
            parquet,
            gzip: false,
        },
        date_folders: false,
        change_seq: false,
        rows_per_load_file: 1_000,
        change_batch: 0,
        change_batch_days: 0,
    })
    .expect("generate");
}

fn deliver(scratch: &Scratch, name: &str) -> std::path::PathBuf {
    let to = scratch.transactions_dir().join(format!("20300101-{name}"));
    if name == "other_schema.parquet" {
        other_schema_parquet(&to);
    } else {
        std::fs::copy(repo().join("tests/fixtures/bad").join(name), &to).expect("copy fixture");
    }
    to
}

fn versions(scratch: &Scratch) -> Vec<Option<u64>> {
    scratch.versions(&[
        "bronze/transactions",
        "silver/transactions",
        "gold/daily_kpis",
        "quarantine/transactions",
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn every_file_of_the_bad_input_corpus_has_its_documented_outcome() {
    let mut failures = Vec::new();
    for (name, outcome) in cases() {
        let scratch = Scratch::new();
        // Parquet files are read only by a Parquet source: those cases run the pipeline on Parquet files.
        let parquet = name.ends_with(".parquet");
        generate_sample(&scratch, parquet);
        let edit = move |yaml: String| {
            if parquet {
                yaml.replace("    format: csv\n", "    format: parquet\n")
            } else {
                yaml
            }
        };
        assert_success(&scratch.run_edited(&edit, None));
        let before = versions(&scratch);
        deliver(&scratch, name);
        let output = scratch.run_edited(&edit, None);
        let message = text(&output);
        match outcome {
            Outcome::Fails(needle) => {
                if output.status.code() != Some(1)
                    || !message.contains(needle)
                    || !message.contains(name)
                {
                    failures.push(format!(
                        "{name}: expected a failure naming the file and `{needle}`:\n{message}"
                    ));
                } else if versions(&scratch) != before {
                    failures.push(format!(
                        "{name}: a table changed although the ingest failed"
                    ));
                }
            }
            Outcome::Lands(sql, want) => {
                if !output.status.success() {
                    failures.push(format!("{name}: expected success:\n{message}"));
                    continue;
                }
                let tables: &[&str] = if sql.contains("quarantine.") {
                    &["silver.transactions", "quarantine.transactions"]
                } else {
                    &["silver.transactions"]
                };
                let got = query(&scratch.lake(), tables, sql).await;
                let got: Vec<String> = got.into_iter().flatten().collect();
                if got != want {
                    failures.push(format!("{name}: {sql} gave {got:?}, expected {want:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn on_bad_file_quarantine_sets_the_file_aside_and_lands_the_good_ones() {
    let scratch = Scratch::new();
    scratch.generate(300, 3, 0, 52);
    let quarantine = on_bad_file("quarantine");
    assert_success(&scratch.run_edited(&quarantine, None));
    let bad = deliver(&scratch, "wrong_column_count.csv");
    deliver(&scratch, "bom.csv");
    let output = scratch.run_edited(&quarantine, None);
    assert_success(&output);
    assert!(
        text(&output).contains("1 bad file(s) quarantined (`20300101-wrong_column_count.csv`)"),
        "{}",
        text(&output)
    );
    let kept = scratch
        .lake()
        .join("quarantine/files/transactions/20300101-wrong_column_count.csv");
    assert_eq!(
        std::fs::read(&kept).expect("quarantined copy"),
        std::fs::read(&bad).expect("original")
    );
    let landed = query(
        &scratch.lake(),
        &["silver.transactions"],
        "SELECT COUNT(*) FROM silver.transactions WHERE dms_id = 9900000001",
    )
    .await;
    assert_eq!(
        landed,
        vec![vec!["1".to_string()]],
        "the good file of the same run landed"
    );
    let recorded = query(
        &scratch.lake(),
        &["_medallion.bad_files"],
        "SELECT file, policy, reason LIKE '%expected 14 fields, found 11%' FROM _medallion.bad_files",
    )
    .await;
    assert_eq!(
        recorded,
        vec![vec![
            "20300101-wrong_column_count.csv".to_string(),
            "quarantine".to_string(),
            "true".to_string()
        ]]
    );
    // The next run leaves it aside (a fixed delivery, with new content, would land).
    let bronze = delta_version(&scratch.table("bronze", "transactions"));
    assert_success(&scratch.run_edited(&quarantine, None));
    assert_eq!(
        delta_version(&scratch.table("bronze", "transactions")),
        bronze
    );
}
