//! CDC apply on the generated reference data: every DMS file style, files delivered out of order over
//! several runs, Gold recomputed only for touched dates and always equal to an aggregation of Silver.

use std::path::{Path, PathBuf};

use medallion::generate::{FileStyle, GenerateOptions, generate};

use crate::common::{Scratch, assert_success, daily, delta_version, query, replay, text};

fn run_edited(scratch: &Scratch, edit: &dyn Fn(String) -> String) -> std::process::Output {
    scratch.run_edited(edit, None)
}

fn generate_into(out: &Path, style: FileStyle, date_folders: bool, change_seq: bool) {
    generate(&GenerateOptions {
        out: out.to_path_buf(),
        transactions: 6_000,
        days: 20,
        change_days: 6,
        seed: 7,
        style,
        date_folders,
        change_seq,
        rows_per_load_file: 2_000,
        change_batch: 0,
        change_batch_days: 0,
    })
    .expect("generate");
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Gold daily_kpis must equal the aggregation of Silver as it is now.
async fn assert_gold_is_silver_aggregated(lake: &Path) {
    let from_silver = query(
        lake,
        &["silver.transactions"],
        "SELECT CAST(txn_date AS VARCHAR) AS d, COUNT(*) AS n, CAST(SUM(amount) AS VARCHAR) AS s \
         FROM silver.transactions GROUP BY txn_date ORDER BY txn_date",
    )
    .await;
    let gold = query(
        lake,
        &["gold.daily_kpis"],
        "SELECT CAST(txn_date AS VARCHAR) AS d, txn_count, CAST(total_amount AS VARCHAR) AS s \
         FROM gold.daily_kpis ORDER BY txn_date",
    )
    .await;
    assert_eq!(
        gold, from_silver,
        "gold.daily_kpis = silver aggregated by txn_date"
    );
}

/// Delivers the styled files in a scrambled order over three runs; checks Gold after each run and Silver
/// against an independent replay at the end.
async fn out_of_order_delivery(
    style: FileStyle,
    date_folders: bool,
    change_seq: bool,
    edit: &dyn Fn(String) -> String,
) {
    let scratch = Scratch::new();
    // The same seed in plain CSV for the replay; the styled copy is what medallion reads.
    let plain = scratch.dir.path().join("plain");
    generate_into(
        &plain,
        FileStyle {
            header: true,
            parquet: false,
            gzip: false,
        },
        false,
        false,
    );
    let staged = scratch.dir.path().join("staged");
    generate_into(&staged, style, date_folders, change_seq);

    // Everything but transactions lands at once; transactions arrive newest first, in three runs.
    let all = files_under(&staged);
    let (mut txns, others): (Vec<PathBuf>, Vec<PathBuf>) = all
        .into_iter()
        .partition(|p| p.to_string_lossy().contains("/public/transactions/"));
    txns.reverse();
    let place = |file: &Path| {
        let to = scratch
            .landing()
            .join(file.strip_prefix(&staged).expect("under staged"));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(file, &to).expect("copy");
    };
    for file in &others {
        place(file);
    }
    std::fs::create_dir_all(scratch.transactions_dir()).expect("transactions dir");
    let chunk = txns.len().div_ceil(3);
    for (run, batch) in txns.chunks(chunk).enumerate() {
        for file in batch {
            place(file);
        }
        // A file delivered again, under the same name.
        place(&batch[0]);
        let output = run_edited(&scratch, edit);
        assert_success(&output);
        assert!(
            !text(&output).contains("failed"),
            "run {run}: {}",
            text(&output)
        );
        assert_gold_is_silver_aggregated(&scratch.lake()).await;
    }

    let live = replay(&plain.join("public/transactions"));
    let silver = query(
        &scratch.lake(),
        &["silver.transactions"],
        "SELECT dms_id, CAST(amount AS VARCHAR) FROM silver.transactions ORDER BY dms_id",
    )
    .await;
    let want: Vec<Vec<String>> = live
        .iter()
        .map(|(id, t)| vec![id.to_string(), t.amount.to_string()])
        .collect();
    assert_eq!(
        silver.len(),
        want.len(),
        "silver rows = live keys of the replay"
    );
    assert_eq!(silver, want, "silver = replay, row for row");
    let kpis = query(
        &scratch.lake(),
        &["gold.daily_kpis"],
        "SELECT CAST(txn_date AS VARCHAR) AS d, txn_count, CAST(total_amount AS VARCHAR) AS t FROM gold.daily_kpis ORDER BY txn_date",
    )
    .await;
    let want: Vec<Vec<String>> = daily(&live)
        .into_iter()
        .map(|(d, (n, s, _, _, _))| vec![d, n.to_string(), s.to_string()])
        .collect();
    assert_eq!(kpis, want, "gold.daily_kpis = aggregation of the replay");

    // Nothing new: no commit anywhere.
    let versions = |lake: &Path| {
        [
            "silver/transactions",
            "gold/daily_kpis",
            "gold/fact_transactions",
        ]
        .map(|t| delta_version(&lake.join(t)))
    };
    let before = versions(&scratch.lake());
    assert_success(&run_edited(&scratch, edit));
    assert_eq!(
        versions(&scratch.lake()),
        before,
        "a run with nothing new commits nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn headerless_gzip_in_date_folders_out_of_order() {
    out_of_order_delivery(
        FileStyle {
            header: false,
            parquet: false,
            gzip: true,
        },
        true,
        false,
        &|yaml| {
            yaml.replace("    header: true\n", "")
                .replace("    format: csv\n", "    format: csv\n    header: false\n")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_with_change_seq_out_of_order() {
    out_of_order_delivery(
        FileStyle {
            header: true,
            parquet: true,
            gzip: false,
        },
        false,
        true,
        &|yaml| {
            yaml.replace("    format: csv\n", "    format: parquet\n")
                .replace(
                    "      timestamp_column: dms_commit_ts\n",
                    "      timestamp_column: dms_commit_ts\n      change_seq: true\n",
                )
        },
    )
    .await;
}

/// A change that moves a transaction to another date, and a key-only delete: Gold recomputes both the old
/// and the new date (and only touched dates), and equals Silver aggregated.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_moving_a_transaction_between_dates_recomputes_both() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 10, 2, 11);
    assert_success(&scratch.run());
    let lake = scratch.lake();
    let picked = query(
        &lake,
        &["silver.transactions"],
        "SELECT dms_id, CAST(txn_date AS VARCHAR) FROM silver.transactions ORDER BY dms_id LIMIT 2",
    )
    .await;
    let (moved, moved_from) = (&picked[0][0], &picked[0][1]);
    let (deleted, deleted_from) = (&picked[1][0], &picked[1][1]);
    let target_date = if moved_from == "2019-10-31" {
        "2019-10-30"
    } else {
        "2019-10-31"
    };
    let change = format!(
        "Op,dms_commit_ts,id,date,client_id,card_id,amount,use_chip,merchant_id,merchant_city,merchant_state,zip,mcc,errors\n\
         U,2030-01-01 00:00:00.000000,{moved},{target_date} 12:00:00,1,1,$10.00,Chip Transaction,5,Springfield,IL,62701.0,5812,\n\
         D,2030-01-01 00:00:00.000000,{deleted},,,,,,,,,,,\n"
    );
    std::fs::write(
        scratch.transactions_dir().join("20300101-0000000001.csv"),
        change,
    )
    .expect("write change");
    let fact_before = delta_version(&scratch.table("gold", "fact_transactions"));
    let output = scratch.run();
    assert_success(&output);
    let summary = text(&output);
    let mut touched = vec![moved_from.as_str(), target_date, deleted_from.as_str()];
    touched.sort();
    touched.dedup();
    assert!(
        summary.contains(&format!("{} `txn_date` value(s) recomputed", touched.len())),
        "gold recomputes the old and new dates only: {summary}"
    );
    assert!(
        summary.contains("+0 ~1 -1"),
        "silver applies one update and one delete: {summary}"
    );
    assert_ne!(
        delta_version(&scratch.table("gold", "fact_transactions")),
        fact_before
    );
    assert_gold_is_silver_aggregated(&lake).await;
    let row = query(
        &lake,
        &["gold.fact_transactions"],
        &format!("SELECT CAST(txn_date AS VARCHAR) FROM gold.fact_transactions WHERE transaction_id = {moved}"),
    )
    .await;
    assert_eq!(
        row,
        vec![vec![target_date.to_string()]],
        "the fact moved to its new date"
    );
    let gone = query(
        &lake,
        &["gold.fact_transactions"],
        &format!("SELECT COUNT(*) FROM gold.fact_transactions WHERE transaction_id = {deleted}"),
    )
    .await;
    assert_eq!(
        gone,
        vec![vec!["0".to_string()]],
        "the deleted transaction left the fact table"
    );
}

/// Two changes of one key with the same full sequence: the stage fails with both named, nothing written.
#[tokio::test(flavor = "multi_thread")]
async fn a_sequence_tie_fails_the_stage_and_names_the_key() {
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 0, 3);
    let silver_before = {
        assert_success(&run_edited(&scratch, &tie_edit));
        delta_version(&scratch.table("silver", "transactions"))
    };
    let change = "Op,dms_commit_ts,id,date,client_id,card_id,amount,use_chip,merchant_id,merchant_city,merchant_state,zip,mcc,errors\n\
         U,2030-01-01 00:00:00.000000,424242,2019-10-30 12:00:00,1,1,$10.00,Chip Transaction,5,Springfield,IL,62701.0,5812,\n\
         U,2030-01-01 00:00:00.000000,424242,2019-10-30 12:00:00,1,1,$12.00,Chip Transaction,5,Springfield,IL,62701.0,5812,\n";
    std::fs::write(
        scratch.transactions_dir().join("20300101-0000000001.csv"),
        change,
    )
    .expect("write change");
    let output = run_edited(&scratch, &tie_edit);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let summary = text(&output);
    assert!(
        summary.contains("2 changes with dms_id=424242, _commit_ts=2030-01-01T00:00:00"),
        "{summary}"
    );
    assert_eq!(
        delta_version(&scratch.table("silver", "transactions")),
        silver_before,
        "silver unchanged"
    );
}

/// Sequence by commit timestamp only, so that two changes of one commit tie.
fn tie_edit(yaml: String) -> String {
    yaml.replacen(
        "    sequence_by: [_commit_ts, _file_order, _source_row]\n",
        "    sequence_by: [_commit_ts]\n",
        1,
    )
}
