//! Quality gates: KPI checks and reconciliation stop a stage before it publishes, warnings do not, and run
//! history (`medallion history`, `_medallion/runs`) records what happened.

use std::process::Command;

use crate::common::{Scratch, assert_success, delta_version, python, query, repo, text};

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
    let project = scratch.dir.path().join("project");
    let history = scratch.command_in(
        &project,
        &["history", "pipelines/t.yaml", "--format", "json"],
    );
    assert_success(&history);
    let runs: serde_json::Value = serde_json::from_slice(&history.stdout).expect("history json");
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
    let output = Command::new(python())
        .args(["-c", RUNS_SCRIPT])
        .arg(scratch.lake())
        .current_dir(repo())
        .output()
        .expect("python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: Vec<String> = String::from_utf8_lossy(&output.stdout)
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
