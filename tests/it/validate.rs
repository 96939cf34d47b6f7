//! `medallion validate`: every problem at once, with file and line, exit code 2; exact text in snapshots.

use std::process::Command;

use crate::common::{BIN, repo};

fn validate(project: &str, file: &str) -> (Option<i32>, String, String) {
    let output = Command::new(BIN)
        .args(["validate", file])
        .current_dir(repo().join(project))
        .output()
        .expect("run medallion");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn reports_misspelled_key_missing_sql_and_cycle_together() {
    let (code, stdout, stderr) = validate("tests/fixtures/invalid", "pipelines/broken.yaml");
    assert_eq!(code, Some(2), "stdout: {stdout}\nstderr: {stderr}");
    insta::assert_snapshot!("broken_pipeline", stderr);
}

#[test]
fn reference_pipeline_is_valid() {
    let (code, stdout, stderr) = validate(".", "pipelines/transactions.yaml");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "pipeline `transactions` is valid: 4 source(s), 15 stage(s)"
    );
}

#[test]
fn unknown_table_and_duplicate_target_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::create_dir_all(dir.path().join("sql")).unwrap();
    std::fs::write(
        dir.path().join("sql/a.sql"),
        "-- a\nSELECT * FROM silver.nowhere\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("sql/b.sql"), "-- b\nSELECT 1 AS x\n").unwrap();
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        "name: p\nstages:\n  - name: a\n    layer: gold\n    sql: sql/a.sql\n    target: gold.t\n  - name: b\n    layer: gold\n    sql: sql/b.sql\n    target: gold.t\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["validate", "pipelines/p.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    insta::assert_snapshot!("unknown_table_and_duplicate_target", stderr);
}

#[test]
fn run_refuses_an_invalid_pipeline_with_exit_code_2() {
    let output = Command::new(BIN)
        .args(["run", "pipelines/broken.yaml"])
        .current_dir(repo().join("tests/fixtures/invalid"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("stages form a cycle: gold_a -> gold_b -> gold_a")
    );
    assert!(
        !repo().join("tests/fixtures/invalid/lake").exists(),
        "nothing was written"
    );
}
