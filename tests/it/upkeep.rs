//! Upkeep (`medallion maintain`): vacuum deletes what no version within the retention reads (data files
//! a compaction replaced, deletion vectors superseded, leftovers of an interrupted write), keeps every
//! version the pipeline promises readable, and waits for a run to end.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::common::{
    Scratch, assert_success, delta_version, restore_with_python, run_python, text, walk,
};

/// The reference pipeline with Silver created with deletion vectors.
fn silver_with_vectors(yaml: String) -> String {
    let plain = "    mode: cdc\n    zorder_by: [dms_id]\n";
    assert!(yaml.contains(plain), "the reference Silver stage changed");
    yaml.replacen(
        plain,
        "    mode: cdc\n    deletion_vectors: true\n    zorder_by: [dms_id]\n",
        1,
    )
}

/// Sets the modification time of every file under `dir`, its log included, `days` back: as if all of
/// it had been written then.
fn age(dir: &Path, days: u64) {
    let then = SystemTime::now() - Duration::from_secs(days * 24 * 3600);
    let mut files = walk(dir);
    files.extend(
        std::fs::read_dir(dir.join("_delta_log"))
            .expect("log")
            .map(|e| e.expect("entry").path()),
    );
    for file in files.into_iter().filter(|f| f.is_file()) {
        std::fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(then))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

/// The deletion vector files version `version` of `table` reads, by its log (no checkpoint yet). A
/// file is known by its path and its vector: a commit may remove one and add the same path with
/// another vector (a restore does).
fn vectors_read_at(table: &Path, version: u64) -> Vec<PathBuf> {
    let logical = |action: &serde_json::Value| {
        let vector = &action["deletionVector"];
        (
            action["path"].as_str().expect("path").to_string(),
            vector["pathOrInlineDv"].as_str().map(str::to_string),
            vector["offset"].as_i64(),
        )
    };
    let mut live = std::collections::BTreeSet::new();
    for v in 0..=version {
        let commit = std::fs::read_to_string(table.join(format!("_delta_log/{v:020}.json")))
            .expect("commit");
        for line in commit.lines() {
            let action: serde_json::Value = serde_json::from_str(line).expect("action");
            if let Some(add) = action.get("add") {
                live.insert(logical(add));
            } else if let Some(remove) = action.get("remove") {
                live.remove(&logical(remove));
            }
        }
    }
    let mut vectors: Vec<PathBuf> = live
        .into_iter()
        .filter_map(|(_, vector, _)| vector)
        .map(|id| {
            let id = uuid::Uuid::from_slice(&z85::decode(id).expect("z85")).expect("uuid");
            table.join(format!("deletion_vector_{id}.bin"))
        })
        .collect();
    vectors.sort();
    vectors.dedup();
    vectors
}

/// Silver's row count and sum of amounts.
const SILVER_SUMS: &str = "SELECT COUNT(*), SUM(amount) FROM silver.transactions";

/// The first row `sql` gives over the scratch lake, as CSV, read at `at` (`--version N`,
/// `--as-of T`, or nothing for the latest).
fn sql_row(scratch: &Scratch, sql: &str, at: &[&str]) -> String {
    let lake = scratch.lake().display().to_string();
    let mut args = vec!["sql", sql, "--lake", &lake, "--format", "csv"];
    args.extend(at);
    let output = scratch.command(&args);
    assert_success(&output);
    text(&output).lines().nth(1).unwrap_or_default().to_string()
}

/// The KPI sums at `version` of `gold.daily_kpis`.
fn read_kpis(scratch: &Scratch, version: u64) -> String {
    let sql = "SELECT SUM(txn_count), SUM(total_amount) FROM gold.daily_kpis";
    sql_row(scratch, sql, &["--version", &version.to_string()])
}

/// The files of `table` whose name starts with `prefix`, sorted.
fn files(table: &Path, prefix: &str) -> Vec<PathBuf> {
    walk(table)
        .into_iter()
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn vacuum_deletes_replaced_files_superseded_vectors_and_leftovers_but_not_a_promised_version()
{
    let scratch = Scratch::new();
    scratch.generate(3_000, 40, 6, 17);
    let held = scratch.hold_back_changes(2);
    let project = scratch.edit_project(&silver_with_vectors, None);
    let command = |args: &[&str]| scratch.command_in(&project, args);
    let silver = scratch.table("silver", "transactions");
    let read_at = |at: &[&str]| sql_row(&scratch, SILVER_SUMS, at);
    let read = |version: Option<u64>| match version {
        Some(v) => read_at(&["--version", &v.to_string()]),
        None => read_at(&[]),
    };

    // Two daily batches after the load mark rows with deletion vectors.
    assert_success(&command(&["run", "pipelines/t.yaml"]));
    let mut days = Vec::new();
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("deliver the day's file");
        assert_success(&command(&["run", "pipelines/t.yaml"]));
        days.push(delta_version(&silver).expect("silver"));
    }
    assert!(
        !files(&silver, "deletion_vector_").is_empty(),
        "no deletion vector written"
    );
    let promised = delta_version(&silver).expect("silver");
    let then = read(Some(promised));
    let first_day = read(Some(days[0]));
    assert_ne!(first_day, then);

    // All of that was written 40 days ago (the pipeline promises 30 days of backfills); then
    // another tool restores Silver to its first day, which adds files again with vectors of then,
    // a compaction rewrites the files without their vectors, and an interrupted write left a data
    // file and a vector that no commit names, as old.
    let data = files(&silver, "part-");
    let vectors = files(&silver, "deletion_vector_");
    std::fs::copy(
        &data[0],
        silver.join("part-00000-00000000-0000-0000-0000-000000000000-c000.zstd.parquet"),
    )
    .expect("leftover data file");
    std::fs::copy(
        &vectors[0],
        silver.join("deletion_vector_00000000-0000-0000-0000-000000000000.bin"),
    )
    .expect("leftover vector");
    age(&silver, 40);
    restore_with_python(&silver, days[0]);
    let restored = delta_version(&silver).expect("silver");
    assert_success(&command(&["maintain", "pipelines/t.yaml", "--optimize"]));
    assert!(delta_version(&silver) > Some(restored), "nothing compacted");
    let now = read(None);
    assert_eq!(now, first_day, "restore and compaction changed the rows");

    // A dry run lists what would go and deletes nothing.
    let before: Vec<PathBuf> = walk(&silver);
    let dry = command(&["maintain", "pipelines/t.yaml", "--vacuum", "--dry-run"]);
    assert_success(&dry);
    let row = text(&dry)
        .lines()
        .find(|l| l.starts_with("silver.transactions "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no row for silver.transactions:\n{}", text(&dry)));
    assert_eq!(walk(&silver), before, "a dry run deleted files");

    // The vacuum deletes the leftovers (and any vector only versions before the window read), and
    // keeps what the version current 30 days ago reads: it is still readable, and reads the same.
    let vacuum = command(&["maintain", "pipelines/t.yaml", "--vacuum"]);
    assert_success(&vacuum);
    let vacuumed = |output: &str| -> u64 {
        let row = output
            .lines()
            .find(|l| l.starts_with("silver.transactions "))
            .unwrap_or_else(|| panic!("no row for silver.transactions:\n{output}"));
        row.split_whitespace()
            .nth(5)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no vacuumed count in {row:?}"))
    };
    assert!(vacuumed(&row) >= 2, "{row}");
    assert_eq!(
        vacuumed(&row),
        vacuumed(&text(&vacuum)),
        "the dry run listed another set"
    );
    for leftover in [
        "part-00000-00000000-0000-0000-0000-000000000000-c000.zstd.parquet",
        "deletion_vector_00000000-0000-0000-0000-000000000000.bin",
    ] {
        assert!(!silver.join(leftover).exists(), "{leftover} kept");
    }
    assert_eq!(read(None), now);
    assert_eq!(read(Some(promised)), then, "the promised version broke");
    assert_eq!(
        read(Some(restored)),
        first_day,
        "the restore's version broke"
    );
    let thirty_days_ago = (chrono::Utc::now() - chrono::Duration::days(30)).to_rfc3339();
    assert_eq!(read_at(&["--as-of", &thirty_days_ago]), then);
    // Exactly the vectors those two versions read are left (those only older ones read went);
    // the restore's are old, and some of them no other kept version reads.
    let promised_vectors = vectors_read_at(&silver, promised);
    let restored_vectors = vectors_read_at(&silver, restored);
    assert!(!promised_vectors.is_empty());
    assert!(
        restored_vectors
            .iter()
            .any(|v| !promised_vectors.contains(v)),
        "the restore reads no vector of its own: {restored_vectors:?}"
    );
    let mut kept = promised_vectors;
    kept.extend(restored_vectors);
    kept.sort();
    kept.dedup();
    assert_eq!(files(&silver, "deletion_vector_"), kept);

    // Once the compaction itself is 40 days old, no version within the window reads a vector: none is
    // left, and the table reads the same. (The data files it replaced stay until 30 days after the
    // compaction, by the time its commit recorded.)
    age(&silver, 40);
    assert_success(&command(&["maintain", "pipelines/t.yaml", "--vacuum"]));
    assert_eq!(files(&silver, "deletion_vector_"), Vec::<PathBuf>::new());
    assert_eq!(read(None), now);

    // While a run holds the pipeline's lock, maintain waits, then gives up and changes nothing.
    let locks = scratch.lake().join("_medallion/locks");
    std::fs::create_dir_all(&locks).expect("locks");
    std::fs::write(
        locks.join("transactions.lock"),
        format!("{} elsewhere 2026-12-07T00:00:00Z\n", std::process::id()),
    )
    .expect("lock");
    let leftover = silver.join("part-00000-00000000-0000-0000-0000-000000000001-c000.zstd.parquet");
    std::fs::copy(&files(&silver, "part-")[0], &leftover).expect("leftover data file");
    age(&silver, 40);
    let before = walk(&scratch.lake());
    let held = command(&["maintain", "pipelines/t.yaml", "--vacuum", "--optimize"]);
    assert_eq!(held.status.code(), Some(4), "{}", text(&held));
    assert!(text(&held).contains("holds the lock"), "{}", text(&held));
    assert_eq!(
        walk(&scratch.lake()),
        before,
        "files changed under the lock"
    );
}

/// Rewrites the times the log of `table` records `days` back, as `age` does the files': when each
/// file was written (its add's `modificationTime`) and removed (its remove's `deletionTimestamp`).
fn age_log(table: &Path, days: i64) {
    let shift = days * 24 * 3600 * 1000;
    for entry in std::fs::read_dir(table.join("_delta_log")).expect("log") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let commit = std::fs::read_to_string(&path).expect("commit");
        let aged: Vec<String> = commit
            .lines()
            .map(|line| {
                let mut action: serde_json::Value = serde_json::from_str(line).expect("action");
                for (kind, field) in [("add", "modificationTime"), ("remove", "deletionTimestamp")]
                {
                    if let Some(when) = action.get_mut(kind).and_then(|a| a.get_mut(field)) {
                        *when = (when.as_i64().expect("time") - shift).into();
                    }
                }
                action.to_string()
            })
            .collect();
        std::fs::write(&path, aged.join("\n") + "\n").expect("aged commit");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn vacuum_keeps_the_old_files_a_restore_within_the_retention_added_again() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 30, 4, 29);
    let held = scratch.hold_back_changes(1);
    let kpis = scratch.table("gold", "daily_kpis");
    let read = |version: u64| read_kpis(&scratch, version);
    assert_success(&scratch.run());
    let first = delta_version(&kpis).expect("kpis");
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("deliver the day's file");
        assert_success(&scratch.run());
    }
    let second = delta_version(&kpis).expect("kpis");
    assert_ne!(read(first), read(second), "the day changed no KPI");

    // All of it 40 days old, the log's times included; then another tool restores the table to its first
    // version (its files come back, old) and to its second again (they are removed again).
    age_log(&kpis, 40);
    age(&kpis, 40);
    for version in [first, second] {
        restore_with_python(&kpis, version);
    }
    let restored_first = delta_version(&kpis).expect("kpis") - 1;
    let expected = (read(first), read(second));
    assert_eq!(read(restored_first), expected.0);

    // The version of the first restore is within the retention: its files, removed 40 days ago by
    // the second version and again now, stay.
    assert_success(&scratch.command(&["maintain", "pipelines/transactions.yaml", "--vacuum"]));
    assert_eq!(
        read(restored_first),
        expected.0,
        "the restore's version broke"
    );
    assert_eq!(read(second), expected.1);
}

/// The files of partial aggregates in `folder`, sorted.
fn partials(folder: &Path) -> Vec<PathBuf> {
    if !folder.exists() {
        return Vec::new();
    }
    let mut found = walk(folder);
    found.sort();
    found
}

/// Sets `file`'s modification time `days` back: as if a run last used it then.
fn last_used(file: &Path, days: u64) {
    let then = SystemTime::now() - Duration::from_secs(days * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(file)
        .and_then(|f| f.set_modified(then))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

/// The files and vacuumed columns of `maintain`'s row for the partials.
fn partials_row(output: &str) -> (u64, u64) {
    let row = output
        .lines()
        .find(|l| l.starts_with("_medallion/partials "))
        .unwrap_or_else(|| panic!("no row for the partials:\n{output}"));
    let column = |n: usize| -> u64 {
        row.split_whitespace()
            .nth(n)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no count {n} in {row:?}"))
    };
    (column(1), column(5))
}

#[tokio::test(flavor = "multi_thread")]
async fn vacuum_deletes_the_partial_aggregates_no_check_used_for_a_week() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 30, 4, 31);
    let held = scratch.hold_back_changes(1);
    assert_success(&scratch.run());
    let folder = scratch.lake().join("_medallion/partials");
    let used = partials(&folder);
    assert!(!used.is_empty(), "the reference checks kept no partial");
    let maintain = |extra: &[&str]| {
        let mut args = vec!["maintain", "pipelines/transactions.yaml", "--vacuum"];
        args.extend(extra);
        let output = scratch.command(&args);
        assert_success(&output);
        text(&output)
    };

    // The partials of a check since removed, last used eight days ago.
    let stale =
        folder.join("0000000000000000000000000000000000000000000000000000000000000000.arrow");
    std::fs::copy(&used[0], &stale).expect("a stale partial");
    last_used(&stale, 8);
    let before = walk(&folder);
    let dry = maintain(&["--dry-run"]);
    assert_eq!(partials_row(&dry), (used.len() as u64 + 1, 1), "{dry}");
    assert_eq!(walk(&folder), before, "a dry run deleted partials");

    let vacuum = maintain(&[]);
    assert_eq!(
        partials_row(&vacuum),
        (used.len() as u64 + 1, 1),
        "{vacuum}"
    );
    assert_eq!(
        partials(&folder),
        used,
        "the partials the checks use went too"
    );

    // None used for a week: all go, and the next day's run computes them again and its checks pass.
    for file in &used {
        last_used(file, 8);
    }
    let vacuum = maintain(&[]);
    assert_eq!(
        partials_row(&vacuum),
        (used.len() as u64, used.len() as u64),
        "{vacuum}"
    );
    assert_eq!(partials(&folder), Vec::<PathBuf>::new());
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("deliver the day's file");
    }
    assert_success(&scratch.run());
    assert_eq!(partials(&folder), used, "the checks kept other partials");
}

/// A table's properties, as Python `deltalake` reads them.
fn properties(table: &Path) -> std::collections::BTreeMap<String, String> {
    let script = format!(
        "import json\nfrom deltalake import DeltaTable\n\
         print(json.dumps(DeltaTable({:?}).metadata().configuration))\n",
        table.display().to_string()
    );
    serde_json::from_str(run_python(&script).trim()).expect("properties as JSON")
}

/// The properties of every Delta table under `lake`, by path from it, as Python `deltalake` reads
/// them.
fn all_properties(
    lake: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    let script = format!(
        "import json, os\nfrom deltalake import DeltaTable\nlake = {:?}\nfound = {{}}\n\
         for folder, dirs, _ in os.walk(lake):\n    if '_delta_log' in dirs:\n        \
         found[os.path.relpath(folder, lake)] = DeltaTable(folder).metadata().configuration\n\
         print(json.dumps(found))\n",
        lake.display().to_string()
    );
    serde_json::from_str(run_python(&script).trim()).expect("properties as JSON")
}

/// Asserts that `table`'s properties keep 45 days of its history for every Delta tool.
fn assert_keeps_45_days(table: &Path) {
    let kept = properties(table);
    for (property, value) in [
        ("delta.enableExpiredLogCleanup", "false"),
        ("delta.logRetentionDuration", "interval 45 days"),
        ("delta.deletedFileRetentionDuration", "interval 45 days"),
    ] {
        assert_eq!(
            kept.get(property).map(String::as_str),
            Some(value),
            "{}: {kept:?}",
            table.display()
        );
    }
}

/// The number in the `log` column of `table`'s row of `maintain`'s output.
fn log_entries_removed(output: &str, table: &str) -> u64 {
    let row = output
        .lines()
        .find(|l| l.starts_with(&format!("{table} ")))
        .unwrap_or_else(|| panic!("no row for {table}:\n{output}"));
    row.split_whitespace()
        .nth(7)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no log count in {row:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promised_version_older_than_deltas_log_retention_stays_readable_until_maintain_lets_it_go()
 {
    let scratch = Scratch::new();
    scratch.generate(2_000, 30, 4, 31);
    let held = scratch.hold_back_changes(3);
    let promise_45_days = |yaml: String| {
        let promise = "  time_travel_days: 7 ";
        assert!(yaml.contains(promise), "the reference maintenance changed");
        // One row in 50 quarantined, so that there is a quarantine table.
        let mcc = r#"expr: "_op = 'D' OR mcc IS NOT NULL""#;
        assert!(yaml.contains(mcc), "the reference expectations changed");
        yaml.replacen(promise, "  time_travel_days: 45 ", 1)
            .replacen(
                mcc,
                r#"expr: "_op = 'D' OR (mcc IS NOT NULL AND dms_id % 50 <> 0)""#,
                1,
            )
    };
    let project = scratch.edit_project(&promise_45_days, None);
    let command = |args: &[&str]| scratch.command_in(&project, args);
    let silver = scratch.table("silver", "transactions");
    let read_at = |at: &[&str]| sql_row(&scratch, SILVER_SUMS, at);
    let read = |version: u64| read_at(&["--version", &version.to_string()]);
    let days_ago = |days: i64| (chrono::Utc::now() - chrono::Duration::days(days)).to_rfc3339();

    assert_success(&command(&["run", "pipelines/t.yaml"]));
    let load = delta_version(&silver).expect("silver");
    let kpis = scratch.table("gold", "daily_kpis");
    let kpis_load = delta_version(&kpis).expect("kpis");
    let read_kpis = |version: u64| read_kpis(&scratch, version);
    let kpis_at_load = read_kpis(kpis_load);
    std::fs::rename(&held[0].0, &held[0].1).expect("deliver the day's file");
    assert_success(&command(&["run", "pipelines/t.yaml"]));
    let day = delta_version(&silver).expect("silver");
    let (at_load, at_day) = (read(load), read(day));
    assert_ne!(at_load, at_day, "the day changed nothing");

    // Every table of the lake turns delta-rs's log cleanup off; the stages' tables, with their
    // tombstones and quarantine, keep 45 days of history for every Delta tool.
    let all = all_properties(&scratch.lake());
    assert!(all.len() > 10, "{:?}", all.keys());
    for (table, properties) in &all {
        assert_eq!(
            properties
                .get("delta.enableExpiredLogCleanup")
                .map(String::as_str),
            Some("false"),
            "{table}: {properties:?}"
        );
        let state =
            table.starts_with("_medallion/") && !table.starts_with("_medallion/tombstones/");
        if !state {
            assert_keeps_45_days(&scratch.lake().join(table));
        }
    }
    assert!(all.contains_key("_medallion/tombstones/silver/transactions"));
    assert!(
        all.keys().any(|table| table.starts_with("quarantine/")),
        "no quarantine table: {:?}",
        all.keys()
    );

    // 35 days later (past Delta's 30 days of log, within the 45 promised), after a checkpoint, the
    // next day's run commits: delta-rs's cleanup after that commit would have deleted the log of
    // both versions before the checkpoint's.
    age(&silver, 35);
    assert_success(&command(&["maintain", "pipelines/t.yaml", "--checkpoint"]));
    std::fs::rename(&held[1].0, &held[1].1).expect("deliver the day's file");
    assert_success(&command(&["run", "pipelines/t.yaml"]));
    let latest = read_at(&[]);
    assert_eq!(read(load), at_load, "the loaded version is gone");
    assert_eq!(read(day), at_day);
    assert_eq!(read_at(&["--as-of", &days_ago(34)]), at_day);
    let dry = command(&["maintain", "pipelines/t.yaml", "--vacuum", "--dry-run"]);
    assert_success(&dry);
    assert_eq!(log_entries_removed(&text(&dry), "silver.transactions"), 0);

    // Once all of it is 100 days old, only the version current 45 days ago is promised: the log
    // before its checkpoint goes, as the dry run counts it; the promised version reads the same.
    age(&silver, 100);
    let before = walk(&silver);
    let dry = command(&["maintain", "pipelines/t.yaml", "--vacuum", "--dry-run"]);
    assert_success(&dry);
    assert_eq!(walk(&silver), before, "a dry run deleted files");
    let first_commit = silver.join(format!("_delta_log/{load:020}.json"));
    assert!(first_commit.exists(), "a dry run cleaned the log");
    let counted = log_entries_removed(&text(&dry), "silver.transactions");
    assert!(counted >= day, "{}", text(&dry));
    let vacuum = command(&["maintain", "pipelines/t.yaml", "--vacuum"]);
    assert_success(&vacuum);
    assert_eq!(
        log_entries_removed(&text(&vacuum), "silver.transactions"),
        counted,
        "the dry run counted another set"
    );
    assert!(!first_commit.exists());
    assert_eq!(read_at(&[]), latest);
    assert_eq!(read_at(&["--as-of", &days_ago(45)]), latest);
    let lake = scratch.lake().display().to_string();
    let gone = scratch.command(&[
        "sql",
        "SELECT COUNT(*) FROM silver.transactions",
        "--lake",
        &lake,
        "--version",
        &load.to_string(),
    ]);
    assert!(!gone.status.success(), "version {load} still reads");
    let oldest = std::fs::read_dir(silver.join("_delta_log"))
        .expect("log")
        .filter_map(|e| {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            name.strip_suffix(".checkpoint.parquet")?
                .parse::<u64>()
                .ok()
        })
        .min()
        .expect("a checkpoint");
    assert!(
        text(&gone).contains(&format!(
            "version {load} is no longer in the table's log (cleaned by `maintain --vacuum` \
             or another writer); the table's log holds versions {oldest} ("
        )),
        "{}",
        text(&gone)
    );
    let unwritten = scratch.command(&[
        "sql",
        "SELECT COUNT(*) FROM silver.transactions",
        "--lake",
        &lake,
        "--version",
        "999",
    ]);
    assert!(
        text(&unwritten).contains("version 999 is not written yet; the table's log holds versions"),
        "{}",
        text(&unwritten)
    );
    // Told before delta-rs tries them: no error of its own in the kernel's words.
    for refused in [&gone, &unwritten] {
        assert!(!text(refused).contains("kernel"), "{}", text(refused));
    }
    let before_all = scratch.command(&[
        "sql",
        "SELECT COUNT(*) FROM silver.transactions",
        "--lake",
        &lake,
        "--as-of",
        &days_ago(200),
    ]);
    assert!(
        !before_all.status.success(),
        "read before the table's history"
    );
    assert!(
        text(&before_all).contains("before the table's history; the table's log holds versions"),
        "{}",
        text(&before_all)
    );
    let rows = run_python(&format!(
        "from deltalake import DeltaTable\nprint(DeltaTable({:?}).to_pyarrow_table().num_rows)\n",
        silver.display().to_string()
    ));
    assert_eq!(
        Some(rows.trim()),
        latest.split(',').next(),
        "Python deltalake reads another table"
    );

    // A table whose properties another tool lowered (or an older medallion created without them),
    // its log 35 days old and checkpointed since: a run's commit leaves its log alone (delta-rs's
    // cleanup would delete the loaded version's), and the next `maintain` sets them again.
    run_python(&format!(
        "from deltalake import DeltaTable\nDeltaTable({:?}).alter.set_table_properties({{\
         'delta.enableExpiredLogCleanup': 'true', 'delta.logRetentionDuration': 'interval 30 days', \
         'delta.deletedFileRetentionDuration': 'interval 7 days'}}, raise_if_not_exists=False)\n",
        kpis.display().to_string()
    ));
    assert_eq!(
        properties(&kpis)
            .get("delta.enableExpiredLogCleanup")
            .map(String::as_str),
        Some("true")
    );
    age(&kpis, 35);
    run_python(&format!(
        "from deltalake import DeltaTable\nDeltaTable({:?}).create_checkpoint()\n",
        kpis.display().to_string()
    ));
    let checkpointed = delta_version(&kpis).expect("kpis");
    std::fs::rename(&held[2].0, &held[2].1).expect("deliver the day's file");
    assert_success(&command(&["run", "pipelines/t.yaml"]));
    assert!(
        delta_version(&kpis) > Some(checkpointed),
        "the run did not commit"
    );
    assert_eq!(
        read_kpis(kpis_load),
        kpis_at_load,
        "the run cleaned the log"
    );
    assert_success(&command(&["maintain", "pipelines/t.yaml", "--checkpoint"]));
    assert_keeps_45_days(&kpis);
}
