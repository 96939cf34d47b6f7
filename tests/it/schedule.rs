//! Scheduling: date-range backfills that resume after SIGKILL and skip what is done, dry runs, forced
//! redos, and the run lock between concurrent runs.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{BIN, Scratch, assert_success, query, repo, text};

/// (rows, distinct keys, sum(amount)) of Silver and the daily KPIs of Gold.
async fn snapshot(lake: &Path) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let silver = query(
        lake,
        &["silver.transactions"],
        "SELECT COUNT(*) AS n, COUNT(DISTINCT dms_id) AS k, CAST(SUM(amount) AS VARCHAR) AS s FROM silver.transactions",
    )
    .await;
    let gold = query(
        lake,
        &["gold.daily_kpis"],
        "SELECT CAST(txn_date AS VARCHAR) AS d, txn_count, CAST(total_amount AS VARCHAR) AS t FROM gold.daily_kpis ORDER BY txn_date",
    )
    .await;
    (silver, gold)
}

/// The dates of the change files in the landing folder.
fn change_dates(scratch: &Scratch) -> Vec<String> {
    let mut dates: Vec<String> = std::fs::read_dir(scratch.transactions_dir())
        .expect("landing")
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let digits = name.get(..8)?;
            digits
                .chars()
                .all(|c| c.is_ascii_digit())
                .then(|| format!("{}-{}-{}", &digits[..4], &digits[4..6], &digits[6..8]))
        })
        .collect();
    dates.sort();
    dates.dedup();
    dates
}

fn backfill(scratch: &Scratch, from: &str, to: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args([
            "backfill",
            "pipelines/transactions.yaml",
            "--from",
            from,
            "--to",
            to,
        ])
        .args(extra)
        .current_dir(repo())
        .env("MEDALLION_LANDING", scratch.landing())
        .env("MEDALLION_LAKE", scratch.lake())
        .env("RUST_LOG", "warn");
    command
}

fn commits(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("_delta_log"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_backfill_resumes_and_equals_a_clean_run() {
    // The clean reference: everything in one run.
    let clean = Scratch::new();
    clean.generate(3_000, 20, 8, 31);
    assert_success(&clean.run());
    let want = snapshot(&clean.lake()).await;

    let scratch = Scratch::new();
    scratch.generate(3_000, 20, 8, 31);
    let dates = change_dates(&scratch);
    assert!(dates.len() >= 8, "{dates:?}");
    let (from, to) = (dates[0].as_str(), dates[dates.len() - 1].as_str());

    // Kill the backfill once a few dates are done.
    let mut child = backfill(&scratch, from, to, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start backfill");
    let units = scratch.lake().join("_medallion/backfill_units");
    let clock = Instant::now();
    while commits(&units) < 4 && clock.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let done_before = commits(&units).saturating_sub(1);
    assert!(
        done_before >= 3 && done_before < dates.len(),
        "killed in the middle: {done_before} units done"
    );

    // The same command again finishes the job, skipping the finished dates.
    let output = backfill(&scratch, from, to, &[]).output().expect("resume");
    assert_success(&output);
    let summary = text(&output);
    let skipped = summary.lines().filter(|l| l.contains("  skip")).count();
    assert!(skipped >= done_before, "finished dates skipped: {summary}");
    assert!(summary.contains("ran: succeeded"), "{summary}");
    assert_eq!(
        snapshot(&scratch.lake()).await,
        want,
        "resumed backfill = one clean run"
    );
    let duplicates = query(
        &scratch.lake(),
        &["bronze.transactions"],
        "SELECT COUNT(*) FROM (SELECT _source_file, _source_row FROM bronze.transactions \
         GROUP BY _source_file, _source_row HAVING COUNT(*) > 1)",
    )
    .await;
    assert_eq!(
        duplicates,
        vec![vec!["0".to_string()]],
        "no Bronze row landed twice"
    );

    // Dry run: nothing left to do. A second backfill changes nothing; --force redoes, same result.
    let dry = backfill(&scratch, from, to, &["--dry-run"])
        .output()
        .expect("dry run");
    assert_success(&dry);
    assert!(!text(&dry).contains("would run"), "{}", text(&dry));
    let silver = scratch.table("silver", "transactions");
    let before = commits(&silver);
    assert_success(&backfill(&scratch, from, to, &[]).output().expect("again"));
    assert_eq!(commits(&silver), before, "a second backfill writes nothing");
    let forced = backfill(&scratch, from, to, &["--force"])
        .output()
        .expect("force");
    assert_success(&forced);
    assert_eq!(
        text(&forced).matches("ran: succeeded").count(),
        dates.len(),
        "{}",
        text(&forced)
    );
    assert_eq!(
        snapshot(&scratch.lake()).await,
        want,
        "forced redo changes no number"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_lists_exactly_the_dates_that_would_run() {
    let scratch = Scratch::new();
    scratch.generate(1_000, 10, 4, 32);
    let dates = change_dates(&scratch);
    let (from, to) = (dates[0].as_str(), dates[1].as_str());
    let dry = backfill(&scratch, from, to, &["--dry-run"])
        .output()
        .expect("dry");
    assert_success(&dry);
    let lines: Vec<String> = text(&dry)
        .lines()
        .filter(|l| l.contains("would run"))
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 2, "{}", text(&dry));
    assert!(lines[0].starts_with(from) && lines[0].contains("never ran"));
    assert!(
        !scratch.lake().join("silver").exists(),
        "a dry run writes nothing"
    );
    assert_success(
        &backfill(&scratch, from, from, &[])
            .output()
            .expect("first date"),
    );
    let dry = backfill(&scratch, from, to, &["--dry-run"])
        .output()
        .expect("dry");
    let text = text(&dry);
    assert!(
        text.lines()
            .any(|l| l.starts_with(from) && l.contains("skip")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(to) && l.contains("would run")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_runs_one_waits_out_with_exit_code_4() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 10, 2, 33);
    let start = || {
        Command::new(BIN)
            .args(["run", "pipelines/transactions.yaml"])
            .current_dir(repo())
            .env("MEDALLION_LANDING", scratch.landing())
            .env("MEDALLION_LAKE", scratch.lake())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start run")
    };
    let first = start();
    std::thread::sleep(Duration::from_millis(300));
    let second = start();
    let first = first.wait_with_output().expect("first");
    let second = second.wait_with_output().expect("second");
    assert_success(&first);
    assert_eq!(second.status.code(), Some(4), "{}", text(&second));
    assert!(
        text(&second).contains("another run of pipeline `transactions` holds the lock"),
        "{}",
        text(&second)
    );
    let keys = query(
        &scratch.lake(),
        &["silver.transactions"],
        "SELECT COUNT(*) = COUNT(DISTINCT dms_id) FROM silver.transactions",
    )
    .await;
    assert_eq!(keys, vec![vec!["true".to_string()]]);
    // With a timeout the second run waits for the first and then runs (finding nothing new).
    let first = start();
    std::thread::sleep(Duration::from_millis(100));
    let waiting = Command::new(BIN)
        .args(["run", "pipelines/transactions.yaml", "--lock-timeout", "60"])
        .current_dir(repo())
        .env("MEDALLION_LANDING", scratch.landing())
        .env("MEDALLION_LAKE", scratch.lake())
        .output()
        .expect("waiting run");
    assert_success(&first.wait_with_output().expect("first"));
    assert_success(&waiting);
}

#[tokio::test(flavor = "multi_thread")]
async fn select_runs_a_stage_with_its_upstream_or_downstream() {
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 34);
    let output = scratch.command(&[
        "run",
        "pipelines/transactions.yaml",
        "--select",
        "+silver_cards",
    ]);
    assert_success(&output);
    let summary = text(&output);
    assert!(
        summary.contains("bronze_cards") && summary.contains("silver_cards"),
        "{summary}"
    );
    assert!(
        !summary.contains("silver_transactions") && !summary.contains("gold_dim_card"),
        "{summary}"
    );
    let output = scratch.command(&[
        "run",
        "pipelines/transactions.yaml",
        "--select",
        "silver_cards+",
    ]);
    assert_success(&output);
    assert!(text(&output).contains("gold_dim_card"), "{}", text(&output));
    let wrong = scratch.command(&["run", "pipelines/transactions.yaml", "--select", "nope+"]);
    assert_eq!(wrong.status.code(), Some(2));
    assert!(text(&wrong).contains("no stage `nope`"));
}
