//! Crash consistency: `medallion run` stopped by SIGKILL at random moments and aborted at named points
//! (between the commits a run makes), then run again until it succeeds. After every trial every table
//! reads, Silver has no duplicate key, no Bronze row landed twice, and Silver and Gold equal a clean run.
//!
//! `MEDALLION_CRASH_TRIALS` sets the random-kill trials (default 4 in CI; the opt-in long run uses 50):
//! `MEDALLION_CRASH_TRIALS=50 bash .ci/test crash`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::common::{BIN, Scratch, assert_success, query, repo, text};

type Snapshot = (Vec<Vec<String>>, Vec<Vec<String>>, Vec<Vec<String>>);

async fn snapshot(lake: &Path) -> Snapshot {
    let silver = query(
        lake,
        &["silver.transactions", "silver.cards", "silver.users"],
        "SELECT (SELECT COUNT(*) FROM silver.transactions) AS n, \
                (SELECT COUNT(DISTINCT dms_id) FROM silver.transactions) AS k, \
                (SELECT CAST(SUM(amount) AS VARCHAR) FROM silver.transactions) AS s, \
                (SELECT COUNT(*) FROM silver.cards) AS c, (SELECT COUNT(*) FROM silver.users) AS u",
    )
    .await;
    let gold = query(
        lake,
        &["gold.daily_kpis"],
        "SELECT CAST(txn_date AS VARCHAR) AS d, txn_count, CAST(total_amount AS VARCHAR) AS t, refund_count \
         FROM gold.daily_kpis ORDER BY txn_date",
    )
    .await;
    let facts = query(
        lake,
        &["gold.fact_transactions", "bronze.transactions"],
        "SELECT (SELECT COUNT(*) FROM gold.fact_transactions) AS f, \
                (SELECT COUNT(*) FROM (SELECT _source_file, _source_row FROM bronze.transactions \
                   GROUP BY _source_file, _source_row HAVING COUNT(*) > 1)) AS dup",
    )
    .await;
    (silver, gold, facts)
}

const READ_ALL: &str = r#"
import glob, os, sys
from deltalake import DeltaTable
tables = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(sys.argv[1], "*", "*", "_delta_log")))
for table in tables:
    DeltaTable(table).to_pyarrow_table()
print(len(tables))
sys.stdout.flush()
os._exit(0)
"#;

/// Every Delta table of the lake reads in Python `deltalake`.
fn assert_readable_by_python(lake: &Path) {
    let tables: usize = crate::common::run_python_with(READ_ALL, &[lake.as_os_str()])
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(tables >= 15, "{tables} tables read");
}

fn run(scratch: &Scratch, crash_at: Option<&str>) -> std::process::Child {
    let mut command = Command::new(BIN);
    command
        .args(["run", "pipelines/transactions.yaml"])
        .current_dir(repo())
        .env("MEDALLION_LANDING", scratch.landing())
        .env("MEDALLION_LAKE", scratch.lake())
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(point) = crash_at {
        command.env("MEDALLION_CRASH_AT", point);
    }
    command.spawn().expect("start medallion")
}

/// Runs to success (a killed run leaves a stale lock, which the next run breaks).
fn converge(scratch: &Scratch) {
    let output = run(scratch, None).wait_with_output().expect("run");
    assert_success(&output);
}

/// A lake with the first run done and two change files held back, and the clean result after them.
async fn prepared(
    seed: u64,
) -> (
    Scratch,
    Vec<(std::path::PathBuf, std::path::PathBuf)>,
    Snapshot,
) {
    let clean = Scratch::new();
    clean.generate(2_000, 12, 3, seed);
    assert_success(&clean.run());
    let want = snapshot(&clean.lake()).await;
    let scratch = Scratch::new();
    scratch.generate(2_000, 12, 3, seed);
    let held = scratch.hold_back_changes(2);
    assert_success(&scratch.run());
    (scratch, held, want)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_named_point_converges_to_the_clean_result() {
    for point in medallion::crash::POINTS {
        let (scratch, held, want) = prepared(41).await;
        for (aside, original) in &held {
            std::fs::rename(aside, original).expect("deliver");
        }
        let crashed = run(&scratch, Some(point))
            .wait_with_output()
            .expect("crash run");
        assert!(
            !crashed.status.success(),
            "{point}: the run was to abort: {}",
            text(&crashed)
        );
        assert!(
            text(&crashed).contains(&format!("crash point `{point}` reached")),
            "{point}: {}",
            text(&crashed)
        );
        converge(&scratch);
        assert_eq!(
            snapshot(&scratch.lake()).await,
            want,
            "after a crash at `{point}`"
        );
        // And once more: nothing left to do, nothing changes.
        converge(&scratch);
        assert_eq!(
            snapshot(&scratch.lake()).await,
            want,
            "re-run after `{point}`"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_converges_to_the_clean_result() {
    let trials: u64 = std::env::var("MEDALLION_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut killed_mid_run = 0;
    for trial in 0..trials {
        let (scratch, held, want) = prepared(42).await;
        for (aside, original) in &held {
            std::fs::rename(aside, original).expect("deliver");
        }
        // Delays spread over a run's length (a few seconds here), deterministic per trial.
        let delay = Duration::from_millis(100 + (trial * 7919) % 1900);
        let mut child = run(&scratch, None);
        std::thread::sleep(delay);
        if child.try_wait().expect("poll").is_none() {
            killed_mid_run += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        converge(&scratch);
        assert_eq!(
            snapshot(&scratch.lake()).await,
            want,
            "trial {trial}: killed after {delay:?}"
        );
        assert_readable_by_python(&scratch.lake());
    }
    eprintln!("crash trials: {trials} ran, {killed_mid_run} killed mid-run");
    assert!(
        trials == 0 || killed_mid_run > 0,
        "no trial killed a run in progress"
    );
}
