//! Quality gates: KPI checks and reconciliation stop a stage before it publishes, warnings do not, and run
//! history (`medallion history`, `_medallion/runs`) records what happened.

use crate::common::{
    Scratch, assert_success, codecs, delta_version, query, repo, run_python_with, text,
};

fn versions(scratch: &Scratch) -> Vec<Option<u64>> {
    scratch.versions(&[
        "silver/transactions",
        "gold/daily_kpis",
        "gold/fact_transactions",
    ])
}

/// Adds `checks` (YAML list items) to the silver_transactions stage.
fn with_silver_checks(checks: &'static str) -> impl Fn(String) -> String {
    move |yaml: String| {
        yaml.replacen(
            "    checks:\n      - { name: dms_id_unique",
            &format!("    checks:\n{checks}      - {{ name: dms_id_unique"),
            1,
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_check_keeps_silver_and_gold_unpublished_and_a_warning_does_not() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 10, 3, 21);
    let held = scratch.hold_back_changes(1);

    // A failing warn check: the run succeeds and says so.
    let warn_only = with_silver_checks(
        "      - { name: impossible_soft, query: \"SELECT COUNT(*) FROM candidate\", expect: \"< 0\", severity: warn }\n",
    );
    let output = scratch.run_edited(&warn_only, None);
    assert_success(&output);
    assert!(
        text(&output).contains("check `impossible_soft` failed"),
        "{}",
        text(&output)
    );
    let published = versions(&scratch);

    // A failing error check on the change batch: nothing downstream is published.
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("restore change file");
    }
    let gate = with_silver_checks(
        "      - { name: small_batches, query: \"SELECT COUNT(*) FROM batch\", expect: \"< 5\", severity: error }\n",
    );
    let output = scratch.run_edited(&gate, None);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let summary = text(&output);
    assert!(
        summary.contains("check `small_batches` failed: observed "),
        "{summary}"
    );
    assert!(summary.contains("nothing was published"), "{summary}");
    assert_eq!(versions(&scratch), published, "Silver and Gold unchanged");

    // History records the failed check with its observed value.
    let runs = scratch.edited_history();
    let latest = &runs[0];
    assert_eq!(latest["status"], "failed");
    let failed = &latest["checks_not_passed"][0];
    assert_eq!(failed["check"], "small_batches");
    assert_eq!(failed["outcome"], "failed");
    let observed: u64 = failed["observed"]
        .as_str()
        .expect("observed")
        .parse()
        .expect("number");
    assert!(observed >= 5, "{failed}");
    assert_eq!(runs[1]["status"], "succeeded");
    assert_eq!(runs[1]["checks_not_passed"][0]["outcome"], "warned");

    // Without the gate the same batch publishes.
    assert_success(&scratch.run_edited(&|y| y, None));
    assert_ne!(versions(&scratch)[0], published[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_reconciliation_stops_gold_before_it_is_published() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 10, 2, 8);
    let output = scratch.run_edited(
        &|y| y,
        Some(("gold/daily_kpis.sql", &crate::common::drop_refunds)),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let summary = text(&output);
    assert!(
        summary.contains("check `total_amount_matches_silver` failed"),
        "{summary}"
    );
    assert_eq!(
        delta_version(&scratch.table("gold", "daily_kpis")),
        None,
        "gold.daily_kpis was never published"
    );
    assert!(
        delta_version(&scratch.table("gold", "fact_transactions")).is_some(),
        "other Gold stages ran"
    );

    // A rebuilt table is written before its checks run: its files go when they fail.
    assert_eq!(
        data_files(&scratch.table("gold", "daily_kpis")),
        Vec::<String>::new()
    );

    // With the SQL fixed the same data publishes, and the numbers reconcile.
    assert_success(&scratch.run_edited(&|y| y, None));
    let sums = query(
        &scratch.lake(),
        &["silver.transactions", "gold.daily_kpis"],
        "SELECT (SELECT CAST(SUM(total_amount) AS VARCHAR) FROM gold.daily_kpis) AS g, \
                (SELECT CAST(SUM(amount) AS VARCHAR) FROM silver.transactions) AS s",
    )
    .await;
    assert_eq!(sums[0][0], sums[0][1]);
}

/// The Parquet files under a table's folder, published or not, sorted.
fn data_files(table: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                found.push(path.display().to_string());
            }
        }
    }
    let mut found = Vec::new();
    walk(table, &mut found);
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_check_on_a_table_rebuilt_in_full_publishes_nothing_and_leaves_no_files() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 10, 3, 8);
    let held = scratch.hold_back_changes(1);
    // merchant_daily without its incremental scope: every run rebuilds it in full.
    let in_full = |yaml: String| {
        yaml.replacen(
            "target: gold.merchant_daily\n    mode: overwrite\n    incremental: { column: txn_date, source: silver.transactions }\n",
            "target: gold.merchant_daily\n    mode: overwrite\n",
            1,
        )
    };
    assert_success(&scratch.run_edited(&in_full, None));
    let table = scratch.table("gold", "merchant_daily");
    let published = (delta_version(&table), data_files(&table));
    assert!(!published.1.is_empty());
    let contents = "SELECT CAST(SUM(total_amount) AS VARCHAR), CAST(COUNT(*) AS VARCHAR) \
                    FROM gold.merchant_daily";
    let before = query(&scratch.lake(), &["gold.merchant_daily"], contents).await;

    // New changes arrive and the Gold SQL loses the refunds: the reconciliation fails.
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("restore change file");
    }
    let output = scratch.run_edited(
        &in_full,
        Some(("gold/merchant_daily.sql", &crate::common::drop_refunds)),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("check `total_amount_matches_silver` failed"),
        "{}",
        text(&output)
    );
    assert_eq!(
        (delta_version(&table), data_files(&table)),
        published,
        "no new version and no file left behind"
    );
    let after = query(&scratch.lake(), &["gold.merchant_daily"], contents).await;
    assert_eq!(after, before);

    // A check that fails to run (a division by zero while it reads the copy) publishes nothing either.
    let broken_check = |yaml: String| {
        in_full(yaml).replacen(
            "query: SELECT COALESCE(SUM(total_amount), 0) FROM candidate\n        equals: SELECT COALESCE(SUM(amount), 0) FROM silver.transactions\n  - name: gold_fact",
            "query: SELECT SUM(txn_count / (txn_count - txn_count)) FROM candidate\n        expect: \"> 0\"\n  - name: gold_fact",
            1,
        )
    };
    let yaml = std::fs::read_to_string(repo().join("pipelines/transactions.yaml")).expect("yaml");
    assert!(broken_check(yaml).contains("txn_count - txn_count"));
    let output = scratch.run_edited(&broken_check, None);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("ivide by zero"), "{}", text(&output));
    assert_eq!((delta_version(&table), data_files(&table)), published);

    // Fixed, the rebuild publishes and reconciles.
    assert_success(&scratch.run_edited(&in_full, None));
    assert!(delta_version(&table) > published.0);
    let sums = query(
        &scratch.lake(),
        &["silver.transactions", "gold.merchant_daily"],
        "SELECT (SELECT CAST(SUM(total_amount) AS VARCHAR) FROM gold.merchant_daily), \
                (SELECT CAST(SUM(amount) AS VARCHAR) FROM silver.transactions)",
    )
    .await;
    assert_eq!(sums[0][0], sums[0][1]);
}

const RUNS_SCRIPT: &str = r#"
import os, sys
from deltalake import DeltaTable
runs = DeltaTable(os.path.join(sys.argv[1], "_medallion", "runs")).to_pyarrow_table().to_pylist()
for run in sorted(runs, key=lambda r: r["started_at"], reverse=True):
    print(run["run_id"], run["status"])
sys.stdout.flush()
os._exit(0)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn history_and_python_read_the_same_runs() {
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 4);
    assert_success(&scratch.run());
    assert_success(&scratch.run());
    let history = scratch.command(&["history", "pipelines/transactions.yaml", "--format", "json"]);
    assert_success(&history);
    let runs: serde_json::Value = serde_json::from_slice(&history.stdout).expect("json");
    let ours: Vec<String> = runs
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["run_id"].as_str().unwrap_or(""),
                r["status"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(ours.len(), 2);
    let theirs: Vec<String> = run_python_with(RUNS_SCRIPT, &[scratch.lake().as_os_str()])
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        ours, theirs,
        "medallion history = _medallion/runs read by Python deltalake"
    );
    let table = scratch.command(&["history", "pipelines/transactions.yaml"]);
    assert!(text(&table).contains(ours[0].split(' ').next().unwrap_or("-")));
}

/// The observed value of each check of the latest run that did not pass, by name, from
/// `medallion history`.
fn not_passed(scratch: &Scratch) -> std::collections::BTreeMap<String, u64> {
    observed(scratch)
        .into_iter()
        .map(|(check, seen)| (check, seen.parse().expect("a count")))
        .collect()
}

/// What each check and expectation that did not pass observed in the latest run of the edited project.
fn observed(scratch: &Scratch) -> std::collections::BTreeMap<String, String> {
    scratch.edited_history()[0]["checks_not_passed"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["check"].as_str().expect("name").to_string(),
                c["observed"].as_str().expect("observed").to_string(),
            )
        })
        .collect()
}

/// The rows of `table` (`layer.name`) in the scratch lake.
async fn rows_of(scratch: &Scratch, table: &str) -> u64 {
    let rows = query(
        &scratch.lake(),
        &[table],
        &format!("SELECT CAST(COUNT(*) AS VARCHAR) FROM {table}"),
    )
    .await;
    rows[0][0].parse().expect("a count")
}

/// The number after `sign` in the silver_transactions line of a run's summary (`+` inserts, `~`
/// updates, `-` deletes).
fn silver_count(output: &std::process::Output, sign: char) -> u64 {
    let summary = text(output);
    let line = summary
        .lines()
        .find(|l| l.trim_start().starts_with("silver_transactions"))
        .unwrap_or_else(|| panic!("no silver line in {summary}"));
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(sign).and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no `{sign}` count in {line}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_over_changed_reads_the_rows_the_write_adds_not_the_table() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 20, 4, 33);
    let held = scratch.hold_back_changes(2);
    // Warnings that always fail (a count is never below 0), so that history records what they saw.
    let silver_checks = with_silver_checks(concat!(
        "      - { name: changed_rows, query: \"SELECT COUNT(*) FROM changed\", expect: \"< 0\", severity: warn }\n",
        "      - { name: changed_outside_batch, query: \"SELECT COUNT(*) FROM changed WHERE dms_id NOT IN (SELECT dms_id FROM batch)\", expect: \"< 0\", severity: warn }\n",
        "      - { name: changed_in_candidate, query: \"SELECT COUNT(*) FROM candidate WHERE dms_id IN (SELECT dms_id FROM changed)\", expect: \"< 0\", severity: warn }\n",
    ));
    // And on a Gold table rebuilt for the dates the batch touched (in full the first time).
    let counted = |yaml: String| {
        silver_checks(yaml).replacen(
            "      # Reconciliation with Silver, to the cent: Gold is not published if it disagrees.\n",
            "      - { name: changed_days, query: \"SELECT COUNT(*) FROM changed\", expect: \"< 0\", severity: warn }\n",
            1,
        )
    };
    // The first load adds every row.
    let first = scratch.run_edited(&counted, None);
    assert_success(&first);
    let seen = not_passed(&scratch);
    let loaded = rows_of(&scratch, "silver.transactions").await;
    assert!(loaded > 2_000, "{loaded}");
    assert_eq!(seen["changed_rows"], loaded, "{seen:?}");
    assert_eq!(seen["changed_in_candidate"], loaded, "{seen:?}");
    assert_eq!(seen["changed_outside_batch"], 0, "{seen:?}");
    assert_eq!(
        seen["changed_days"],
        rows_of(&scratch, "gold.daily_kpis").await,
        "{seen:?}"
    );

    // A change batch adds its inserts and the new versions of its updates: not the rows it leaves, not
    // its deletes, not the changes it supersedes.
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("restore change file");
    }
    let second = scratch.run_edited(&counted, None);
    assert_success(&second);
    let seen = not_passed(&scratch);
    let (inserts, updates, deletes) = (
        silver_count(&second, '+'),
        silver_count(&second, '~'),
        silver_count(&second, '-'),
    );
    assert!(
        inserts > 0 && updates > 0 && deletes > 0,
        "{}",
        text(&second)
    );
    assert_eq!(seen["changed_rows"], inserts + updates, "{seen:?}");
    assert!(seen["changed_rows"] < loaded / 2, "{seen:?}");
    assert_eq!(seen["changed_in_candidate"], inserts + updates, "{seen:?}");
    assert_eq!(seen["changed_outside_batch"], 0, "{seen:?}");
    let recomputed: u64 = text(&second)
        .lines()
        .find(|l| l.trim_start().starts_with("gold_daily_kpis"))
        .and_then(|l| l.split("value(s) recomputed").next())
        .and_then(|l| l.split_whitespace().rev().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no recomputed dates in {}", text(&second)));
    assert!(recomputed > 0 && recomputed < rows_of(&scratch, "gold.daily_kpis").await);
    assert_eq!(seen["changed_days"], recomputed, "{seen:?}");
    assert_eq!(
        rows_of(&scratch, "silver.transactions").await,
        loaded + inserts - deletes,
        "the table holds the rows it kept and the ones added"
    );
}

/// Appends a LOAD file of the given rows (`dms_commit_ts,id,date,...` without the header) to the
/// scratch landing; returns its path.
fn add_load_file(scratch: &Scratch, name: &str, rows: &[String]) -> std::path::PathBuf {
    let header = "dms_commit_ts,id,date,client_id,card_id,amount,use_chip,merchant_id,merchant_city,\
                  merchant_state,zip,mcc,errors";
    let path = scratch.transactions_dir().join(name);
    std::fs::write(&path, format!("{header}\n{}\n", rows.join("\n"))).expect("write load file");
    path
}

/// Whether silver_transactions logged the end of step `step` (see [`run_logged`]).
fn silver_step(output: &std::process::Output, step: &str) -> bool {
    text(output)
        .lines()
        .any(|l| l.contains("stage=silver_transactions ") && l.contains(&format!("step={step} ")))
}

/// `medallion run` of the reference pipeline with the stages' steps logged.
fn run_logged(scratch: &Scratch) -> std::process::Output {
    scratch.command_logging(&["run", "pipelines/transactions.yaml"], "medallion=debug")
}

/// A first load that changes each key once goes to Silver's files as it is computed, and is published
/// only after its expectations and checks pass: a failing check or a failing `fail` expectation leaves
/// no file behind; quarantined rows go to quarantine with their raw values; the table equals a replay
/// of the files, and the next batch merges into it.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_written_as_computed_is_published_only_when_it_passes() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 10, 2, 33);
    let held = scratch.hold_back_all_changes();
    let clean = crate::common::replay(&scratch.transactions_dir());
    // One row whose amount does not parse, under a key no other row has.
    let bad = add_load_file(
        &scratch,
        "LOAD00000099.csv",
        &["2010-01-01 00:00:00.000000,99999001,2010-01-01 10:00:00,1,2,$12x,Swipe Transaction,3,Reno,NV,89501.0,5411,".to_string()],
    );
    let silver = scratch.table("silver", "transactions");

    // A check that fails: nothing is published, and the files written as the load was computed are gone.
    let refuse = with_silver_checks(
        "      - { name: no_rows, query: \"SELECT COUNT(*) FROM changed\", expect: \"= 0\" }\n",
    );
    let output = scratch.run_edited(&refuse, None);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("check `no_rows` failed"),
        "{}",
        text(&output)
    );
    assert!(
        data_files(&silver).is_empty(),
        "no Silver file left: {:?}",
        data_files(&silver)
    );
    let version = delta_version(&silver);
    assert!(
        version.is_none_or(|v| v == 0),
        "nothing committed: {version:?}"
    );

    // The reference checks pass: written as computed, published, and equal to the replay.
    let output = run_logged(&scratch);
    assert_success(&output);
    assert!(
        silver_step(&output, "writing the first load"),
        "the first load went to its files as it was computed: {}",
        text(&output)
    );
    let files = data_files(&silver);
    let published = query(
        &scratch.lake(),
        &["silver.transactions"],
        "SELECT COUNT(*), COUNT(DISTINCT dms_id), CAST(SUM(amount) AS VARCHAR), \
                COUNT(DISTINCT \"_source_file\") FROM silver.transactions",
    )
    .await;
    let total: rust_decimal::Decimal = clean.values().map(|t| t.amount).sum();
    let loads = std::fs::read_dir(scratch.transactions_dir())
        .expect("landing")
        .count()
        - 1;
    assert_eq!(
        published,
        vec![vec![
            clean.len().to_string(),
            clean.len().to_string(),
            total.to_string(),
            loads.to_string()
        ]],
        "rows, keys, sum of amount, files: the replay without the quarantined row"
    );
    let quarantined = query(
        &scratch.lake(),
        &["quarantine.transactions"],
        "SELECT id, amount, _reason FROM quarantine.transactions",
    )
    .await;
    assert_eq!(
        quarantined,
        vec![vec![
            "99999001".to_string(),
            "$12x".to_string(),
            "amount_parses".to_string()
        ]]
    );
    assert_eq!(
        files.len(),
        delta_files_in_log(&silver),
        "every file in the table's folder is in its log"
    );

    // The held changes merge into the first load as any batch does.
    std::fs::remove_file(&bad).expect("remove the bad file from the landing");
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("restore change file");
    }
    assert_success(&scratch.run());
    let live = crate::common::replay(&scratch.transactions_dir());
    let total: rust_decimal::Decimal = live.values().map(|t| t.amount).sum();
    let merged = query(
        &scratch.lake(),
        &["silver.transactions"],
        "SELECT COUNT(*), COUNT(DISTINCT dms_id), CAST(SUM(amount) AS VARCHAR) FROM silver.transactions",
    )
    .await;
    assert_eq!(
        merged,
        vec![vec![
            live.len().to_string(),
            live.len().to_string(),
            total.to_string()
        ]]
    );
}

/// A first load whose `fail` expectation fails publishes nothing and leaves no file in Silver.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_failing_an_expectation_leaves_no_file() {
    let scratch = Scratch::new();
    scratch.generate(500, 5, 1, 34);
    scratch.hold_back_all_changes();
    add_load_file(
        &scratch,
        "LOAD00000099.csv",
        &["yesterday,99999002,2010-01-01 10:00:00,1,2,$12.00,Swipe Transaction,3,Reno,NV,89501.0,5411,".to_string()],
    );
    let output = run_logged(&scratch);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("expectation `commit_ts_parses` failed for 1 row(s)")
            && text(&output).contains("LOAD00000099.csv"),
        "{}",
        text(&output)
    );
    assert!(
        silver_step(&output, "writing the first load"),
        "{}",
        text(&output)
    );
    let silver = scratch.table("silver", "transactions");
    assert!(
        data_files(&silver).is_empty(),
        "no Silver file left: {:?}",
        data_files(&silver)
    );
    assert_eq!(delta_version(&silver), None, "no Silver table either");
}

/// Data files the table's log adds and does not remove.
fn delta_files_in_log(table: &std::path::Path) -> usize {
    let mut live = std::collections::BTreeSet::new();
    let mut entries: Vec<_> = std::fs::read_dir(table.join("_delta_log"))
        .expect("log")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    for entry in entries {
        for line in std::fs::read_to_string(entry).expect("log entry").lines() {
            let action: serde_json::Value = serde_json::from_str(line).expect("json");
            if let Some(path) = action["add"]["path"].as_str() {
                live.insert(path.to_string());
            }
            if let Some(path) = action["remove"]["path"].as_str() {
                live.remove(path);
            }
        }
    }
    live.len()
}

/// Removes every transactions file from the scratch landing.
fn clear_transactions(scratch: &Scratch) {
    for entry in std::fs::read_dir(scratch.transactions_dir()).expect("landing") {
        std::fs::remove_file(entry.expect("entry").path()).expect("clear transactions");
    }
}

/// A DMS change row (`Op,dms_commit_ts,id,...`) of transaction `id`, dated 2020-01-01, committed at
/// `commit`.
fn change_row(op: &str, commit: &str, id: u32, amount: &str) -> String {
    format!(
        "{op},{commit},{id},2020-01-01 10:00:00,1,2,{amount},Swipe Transaction,3,Reno,NV,89501.0,5411,"
    )
}

/// Writes change file `name` of `rows` ([`change_row`]) to the scratch landing, with its header.
fn write_changes(scratch: &Scratch, name: &str, rows: &[String]) {
    let header = "Op,dms_commit_ts,id,date,client_id,card_id,amount,use_chip,merchant_id,merchant_city,\
                  merchant_state,zip,mcc,errors";
    std::fs::write(
        scratch.transactions_dir().join(name),
        format!("{header}\n{}\n", rows.join("\n")),
    )
    .expect("write changes");
}

/// A first load of change files, each key once, deletes among them: written as computed, its deletes
/// become tombstones, so a late insert of a deleted key stays out and a new key goes in.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_of_changes_keeps_its_deletes_as_tombstones() {
    let scratch = Scratch::new();
    scratch.generate(500, 5, 1, 35);
    clear_transactions(&scratch);
    let row = change_row;
    let at = "2020-01-02 00:00:00.000000";
    let first = [
        row("I", at, 1, "$10.00"),
        row("I", at, 2, "$20.05"),
        row("U", at, 3, "$-30.00"),
        row("D", at, 4, "$40.00"),
    ];
    write_changes(&scratch, "20200102-0000000001.csv", &first);
    let output = run_logged(&scratch);
    assert_success(&output);
    assert!(
        silver_step(&output, "writing the first load"),
        "{}",
        text(&output)
    );
    let silver = "SELECT CAST(COUNT(*) AS VARCHAR), CAST(SUM(amount) AS VARCHAR), \
                  CAST(MIN(dms_id) AS VARCHAR), CAST(MAX(dms_id) AS VARCHAR) FROM silver.transactions";
    assert_eq!(
        query(&scratch.lake(), &["silver.transactions"], silver).await,
        vec![
            vec!["3", "0.05", "1", "3"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        ]
    );
    let tombstones = scratch
        .lake()
        .join("_medallion/tombstones/silver/transactions");
    assert!(
        delta_version(&tombstones).is_some(),
        "the delete is kept as a tombstone"
    );

    // An insert of key 4 older than its delete is stale; key 5 is new.
    let late = [
        row("I", "2020-01-01 00:00:00.000000", 4, "$40.00"),
        row("I", at, 5, "$5.00"),
    ];
    write_changes(&scratch, "20200102-0000000002.csv", &late);
    assert_success(&scratch.run());
    assert_eq!(
        query(&scratch.lake(), &["silver.transactions"], silver).await,
        vec![
            vec!["4", "5.05", "1", "5"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        ]
    );
}

/// A first load whose checks read only the rows it adds keeps in scratch only the rows the steps after
/// its write look at (those an expectation flags, and the deletes): its checks read the rows added from
/// the files it wrote, a warning and a quarantine are counted as before, and the delete is a tombstone.
/// A check that reads the stage's output (`batch`) keeps a copy of every row again.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_copies_only_its_flagged_rows_and_checks_the_rows_it_wrote() {
    let scratch = Scratch::new();
    scratch.generate(500, 5, 1, 37);
    clear_transactions(&scratch);
    let row =
        |op: &str, id: u32, amount: &str| change_row(op, "2020-01-02 00:00:00.000000", id, amount);
    // Written: 1, 2, 3 and 6 (flagged by a warning). Copied: 4 (a delete), 5 (quarantined) and 6.
    let rows = [
        row("I", 1, "$10.00"),
        row("I", 2, "$20.05"),
        row("U", 3, "$-30.00"),
        row("D", 4, "$40.00"),
        row("I", 5, "$12x"),
        row("I", 6, "$5000.00"),
    ];
    write_changes(&scratch, "20200102-0000000001.csv", &rows);
    let edit = |reads_batch: bool| {
        let checks = with_silver_checks(if reads_batch {
            concat!(
                "      - { name: batch_rows, query: \"SELECT COUNT(*) FROM batch\", expect: \"< 0\", severity: warn }\n",
                "      - { name: changed_rows, query: \"SELECT COUNT(*) FROM changed\", expect: \"< 0\", severity: warn }\n",
                "      - { name: changed_cents, query: \"SELECT CAST(SUM(amount) * 100 AS BIGINT) FROM changed\", expect: \"< 0\", severity: warn }\n",
                "      - { name: candidate_zips, query: \"SELECT COUNT(zip) FROM candidate\", expect: \"< 0\", severity: warn }\n",
            )
        } else {
            concat!(
                "      - { name: changed_rows, query: \"SELECT COUNT(*) FROM changed\", expect: \"< 0\", severity: warn }\n",
                "      - { name: changed_cents, query: \"SELECT CAST(SUM(amount) * 100 AS BIGINT) FROM changed\", expect: \"< 0\", severity: warn }\n",
                "      - { name: candidate_zips, query: \"SELECT COUNT(zip) FROM candidate\", expect: \"< 0\", severity: warn }\n",
            )
        });
        move |yaml: String| {
            checks(yaml).replacen(
                "      - { name: commit_ts_parses",
                "      - { name: small_amounts, expr: \"amount IS NULL OR amount < 1000\", column: amount, action: warn }\n      - { name: commit_ts_parses",
                1,
            )
        }
    };
    let silver =
        "SELECT CAST(COUNT(*) AS VARCHAR), CAST(SUM(amount) AS VARCHAR) FROM silver.transactions";
    for reads_batch in [false, true] {
        let _ = std::fs::remove_dir_all(scratch.lake());
        let project = scratch.edit_project(&edit(reads_batch), None);
        let output =
            scratch.command_in_logging(&project, &["run", "pipelines/t.yaml"], "medallion=debug");
        assert_success(&output);
        let copied = if reads_batch {
            "first load: 6 of 6 row(s) copied to scratch (Every)"
        } else {
            "first load: 3 of 6 row(s) copied to scratch (Flagged)"
        };
        assert!(text(&output).contains(copied), "{}", text(&output));
        let seen = observed(&scratch);
        assert_eq!(seen["changed_rows"], "4", "{seen:?}");
        assert_eq!(seen["changed_cents"], "500005", "{seen:?}");
        assert_eq!(seen["candidate_zips"], "4", "{seen:?}");
        assert_eq!(seen["small_amounts"], "1 row(s) violating", "{seen:?}");
        assert_eq!(seen["amount_parses"], "1 row(s) violating", "{seen:?}");
        if reads_batch {
            // The output the expectations keep: all but the quarantined row.
            assert_eq!(seen["batch_rows"], "5", "{seen:?}");
        }
        assert_eq!(
            query(&scratch.lake(), &["silver.transactions"], silver).await,
            vec![vec!["4".to_string(), "5000.05".to_string()]]
        );
        assert_eq!(
            query(
                &scratch.lake(),
                &["quarantine.transactions"],
                "SELECT id, _reason FROM quarantine.transactions"
            )
            .await,
            vec![vec!["5".to_string(), "amount_parses".to_string()]]
        );
        assert!(
            delta_version(
                &scratch
                    .lake()
                    .join("_medallion/tombstones/silver/transactions")
            )
            .is_some(),
            "the delete is kept as a tombstone"
        );
    }
}

/// A first load that keeps no row (every row quarantined) has no files: its checks read what they
/// read of the rows from its copy, and find none. The table is created all the same, empty, so that
/// the stages reading it run (and find no rows) rather than fail on a table that does not exist,
/// with the stage's options (its codec here), which the files it gets later follow.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_that_keeps_no_row_is_checked_on_its_copy() {
    let scratch = Scratch::new();
    scratch.generate(100, 2, 1, 39);
    clear_transactions(&scratch);
    add_load_file(
        &scratch,
        "LOAD00000001.csv",
        &[
            "2010-01-01 00:00:00.000000,1,2010-01-01 10:00:00,1,2,$1x,Swipe Transaction,3,Reno,NV,89501.0,5411,".to_string(),
            "2010-01-01 00:00:00.000000,2,2010-01-01 10:00:00,1,2,$2x,Swipe Transaction,3,Reno,NV,89501.0,5411,".to_string(),
        ],
    );
    let with_checks = with_silver_checks(
        "      - { name: changed_cents, query: \"SELECT COALESCE(SUM(amount), 0) FROM changed\", expect: \"< 0\", severity: warn }\n",
    );
    // The stage names its codec, which the table created empty keeps for the files it gets later.
    let silver = "    target: silver.transactions\n";
    let checks = |yaml: String| {
        with_checks(yaml).replacen(silver, &format!("{silver}    compression: lz4\n"), 1)
    };
    let output = scratch.run_edited(&checks, None);
    assert!(output.status.success(), "{}", text(&output));
    let seen = observed(&scratch);
    assert_eq!(seen["changed_cents"], "0", "{seen:?}");
    assert_eq!(seen["amount_parses"], "2 row(s) violating", "{seen:?}");
    assert_eq!(
        query(
            &scratch.lake(),
            &["quarantine.transactions"],
            "SELECT CAST(COUNT(*) AS VARCHAR) FROM quarantine.transactions"
        )
        .await,
        vec![vec!["2".to_string()]]
    );
    assert_eq!(
        query(
            &scratch.lake(),
            &[
                "silver.transactions",
                "gold.fact_transactions",
                "gold.daily_kpis"
            ],
            "SELECT CAST((SELECT COUNT(*) FROM silver.transactions) AS VARCHAR) AS silver, \
                    CAST((SELECT COUNT(*) FROM gold.fact_transactions) AS VARCHAR) AS facts, \
                    CAST((SELECT COUNT(*) FROM gold.daily_kpis) AS VARCHAR) AS kpis"
        )
        .await,
        vec![vec!["0".to_string(), "0".to_string(), "0".to_string()]],
        "Silver is created empty, and Gold built from it"
    );
    let silver_table = scratch.table("silver", "transactions");
    assert_eq!(
        codecs(&silver_table),
        (Some("lz4_raw".to_string()), Default::default())
    );
    // The next delivery loads into the empty table,
    add_load_file(
        &scratch,
        "LOAD00000002.csv",
        &["2010-01-01 00:00:01.000000,3,2010-01-01 10:00:00,1,2,$3.25,Swipe Transaction,3,Reno,NV,89501.0,5411,".to_string()],
    );
    // as a first load: written as it is computed, with the table's codec though the YAML names none now.
    let project = scratch.edit_project(&with_checks, None);
    let output =
        scratch.command_in_logging(&project, &["run", "pipelines/t.yaml"], "medallion=debug");
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        silver_step(&output, "writing the first load"),
        "{}",
        text(&output)
    );
    assert_eq!(
        query(
            &scratch.lake(),
            &["silver.transactions", "gold.daily_kpis"],
            "SELECT CAST((SELECT SUM(amount) FROM silver.transactions) AS VARCHAR) AS silver, \
                    CAST((SELECT SUM(txn_count) FROM gold.daily_kpis) AS VARCHAR) AS kpis"
        )
        .await,
        vec![vec!["3.25".to_string(), "1".to_string()]]
    );
    assert_eq!(
        codecs(&silver_table),
        (Some("lz4_raw".to_string()), ["LZ4_RAW".to_string()].into())
    );
}

/// A first load whose write does not find the keys its plan found (here the keys move with `now()`,
/// which each query reads anew) cannot be summed up without a copy of every row: its files are removed
/// and the stage is computed again the general way, every row once.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_whose_keys_moved_since_its_plan_is_computed_again() {
    let scratch = Scratch::new();
    scratch.generate(600, 5, 1, 38);
    scratch.hold_back_all_changes();
    let clean = crate::common::replay(&scratch.transactions_dir());
    let moving = |sql: String| {
        sql.replacen(
            "TRY_CAST(id AS BIGINT)                           AS dms_id",
            "TRY_CAST(id AS BIGINT) + (CAST(date_part('epoch', now()) * 1000000 AS BIGINT) % 1000000) \
             * 1000000000 AS dms_id",
            1,
        )
    };
    let project = scratch.edit_project(&|yaml| yaml, Some(("silver/transactions.sql", &moving)));
    let output =
        scratch.command_in_logging(&project, &["run", "pipelines/t.yaml"], "medallion=debug");
    assert_success(&output);
    assert!(
        text(&output).contains("the first load's rows differ from its plan's; computing it again")
            && silver_step(&output, "computing"),
        "{}",
        text(&output)
    );
    let silver = scratch.table("silver", "transactions");
    assert_eq!(
        data_files(&silver).len(),
        delta_files_in_log(&silver),
        "no file of the abandoned write is left"
    );
    assert_eq!(
        query(
            &scratch.lake(),
            &["silver.transactions"],
            "SELECT COUNT(*), COUNT(DISTINCT dms_id) FROM silver.transactions",
        )
        .await,
        vec![vec![clean.len().to_string(), clean.len().to_string()]]
    );
}

/// A first load holding a key twice (a DMS full load delivered with its first changes) is computed into
/// scratch and written after, as every later batch is, and equals a replay of the files.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_holding_a_key_twice_goes_the_general_way() {
    let scratch = Scratch::new();
    scratch.generate(800, 5, 2, 36);
    let output = run_logged(&scratch);
    assert_success(&output);
    assert!(
        !silver_step(&output, "writing the first load") && silver_step(&output, "computing"),
        "{}",
        text(&output)
    );
    let live = crate::common::replay(&scratch.transactions_dir());
    let total: rust_decimal::Decimal = live.values().map(|t| t.amount).sum();
    assert_eq!(
        query(
            &scratch.lake(),
            &["silver.transactions"],
            "SELECT COUNT(*), COUNT(DISTINCT dms_id), CAST(SUM(amount) AS VARCHAR) FROM silver.transactions",
        )
        .await,
        vec![vec![live.len().to_string(), live.len().to_string(), total.to_string()]]
    );
}
